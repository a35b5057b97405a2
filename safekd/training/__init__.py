"""How the student is trained: the distiller (:mod:`~safekd.training.distiller`), a conductor over the target
pipeline, the Lagrangian and the dual state (:mod:`~safekd.training.lagrangian`, :mod:`~safekd.training.dual`),
checkpoints (:mod:`~safekd.training.checkpoint`) and the step log (:mod:`~safekd.training.steplog`).

Imports only :mod:`safekd.targets`, :mod:`safekd.spec`, :mod:`safekd.common` and :mod:`solvers`; inside, the
imports run one way (distiller → lagrangian → dual → checkpoint; steplog → distiller), with no circle.
"""
