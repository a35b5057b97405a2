"""Teacher-weighting operators at token / task / context scale, the safety prior, and their composition."""
from safekd.targets.weighting.aekd import AEKD, capped_min_norm, kd_logit_gradients
from safekd.targets.weighting.base import AXIOM_NAMES, DeclaredConstants, WeightOperator, mix_softmax, template_bounds
from safekd.targets.weighting.compose import Composition, compose
from safekd.targets.weighting.context import DomainPosterior
from safekd.targets.weighting.safety import SafetyPrior, ordinal_rank
from safekd.targets.weighting.static import Static, Uniform
from safekd.targets.weighting.task import Routing, TaskQuality
from safekd.targets.weighting.token import CAMKD, AgreementSoftmax, ConfidenceSoftmax, EntropySoftmax, GoldLikelihood, MTBert

__all__ = [
    "AXIOM_NAMES",
    "AEKD",
    "AgreementSoftmax",
    "CAMKD",
    "Composition",
    "ConfidenceSoftmax",
    "DeclaredConstants",
    "DomainPosterior",
    "EntropySoftmax",
    "GoldLikelihood",
    "MTBert",
    "Routing",
    "SafetyPrior",
    "Static",
    "TaskQuality",
    "Uniform",
    "WeightOperator",
    "capped_min_norm",
    "compose",
    "kd_logit_gradients",
    "mix_softmax",
    "ordinal_rank",
    "template_bounds",
]
