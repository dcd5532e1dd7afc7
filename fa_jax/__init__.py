"""fa_jax: train neural networks without weight transport (BP, FA, DFA) in JAX."""

from fa_jax import models
from fa_jax._feedback import (
    DFAFeedback,
    FAFeedback,
    TapSpec,
    dfa_matrices,
    init_feedback,
    layer_id,
    layer_key,
    materialize_fa,
)
from fa_jax._grad import project_error, value_and_grad
from fa_jax._model import Bound, FAOps, PlainOps, TapOps, apply
from fa_jax._ops import feedback_bilinear, feedback_conv, feedback_dense, feedback_einsum
from fa_jax._rules import BP, DFA, FA, RULES, Shallow, get_rule
# The rule family; importing registers "usf", "frsf", "brsf", "kp", "drtp" in RULES.
from fa_jax._sign import BRSF, FRSF, USF
from fa_jax._kolen_pollack import KolenPollack, kolen_pollack_update, update_feedback
from fa_jax._drtp import DRTP
from fa_jax._feedback_init import Tiled, kaiming, launay2019, nokland_zero_hidden, tinydfa_uniform, widest_tap, xavier
# Diagnostics (matplotlib helpers stay in fa_jax.plotting, imported on demand).
from fa_jax import alignment, stability

__version__ = "0.1.0"

__all__ = [
    "BP", "DFA", "FA", "RULES", "Shallow", "get_rule", "models",
    "value_and_grad", "init_feedback", "apply", "project_error",
    "FAFeedback", "DFAFeedback", "TapSpec", "dfa_matrices", "materialize_fa", "layer_id", "layer_key",
    "Bound", "PlainOps", "FAOps", "TapOps",
    "feedback_dense", "feedback_conv", "feedback_einsum", "feedback_bilinear",
    "USF", "FRSF", "BRSF", "KolenPollack", "DRTP", "kolen_pollack_update", "update_feedback",
    "tinydfa_uniform", "launay2019", "xavier", "kaiming", "widest_tap", "nokland_zero_hidden", "Tiled",
    "alignment", "stability",
]
