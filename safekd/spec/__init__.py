"""What a user declares: the spec and its loader (:mod:`safekd.spec.document`), the constraints
(:mod:`safekd.spec.constraints`) and the unsafe set (:mod:`safekd.spec.unsafe`).

Imports only :mod:`safekd.common` and :mod:`solvers`. The names of the old module ``safekd.spec`` (now
:mod:`safekd.spec.document`) are found here too: ``from safekd.spec import Spec`` keeps working.
"""
from safekd._aliases import forwarding

__getattr__, __dir__ = forwarding(__name__)
