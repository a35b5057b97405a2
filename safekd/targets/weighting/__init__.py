"""Teacher-weighting operators at token / task / context scale, the safety prior, and their composition."""
from safekd.weighting.aekd import AEKD, capped_min_norm, kd_logit_gradients
from safekd.weighting.base import AXIOM_NAMES, DeclaredConstants, WeightOperator, mix_softmax, template_bounds
from safekd.weighting.compose import Composition, compose
from safekd.weighting.context import DomainPosterior
from safekd.weighting.safety import SafetyPrior, ordinal_rank
from safekd.weighting.static import Static, Uniform
from safekd.weighting.task import Routing, TaskQuality
from safekd.weighting.token import CAMKD, AgreementSoftmax, ConfidenceSoftmax, EntropySoftmax, GoldLikelihood, MTBert

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
