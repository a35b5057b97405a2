"""How the target is built: signals (:mod:`~safekd.targets.signals`), teacher-weighting operators and their
composition (:mod:`~safekd.targets.weighting`), pooling, divergences, vocabulary mapping, sparse top-k teacher
distributions and their caches, derived teachers, the axiom checker, and the target pipeline that puts them
together (:mod:`safekd.targets.pipeline`).

Imports only :mod:`safekd.spec`, :mod:`safekd.common` and :mod:`solvers`. The names of the old module
``safekd.targets`` (now :mod:`safekd.targets.pipeline`) are found here too: ``from safekd.targets import Targets``
keeps working.
"""
from safekd._aliases import forwarding

__getattr__, __dir__ = forwarding(__name__)
