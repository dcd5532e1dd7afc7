"""fa_jax: train any JAX model without weight transport (BP, FA, DFA and their family).

The public surface: the rules (:mod:`fa_jax.rules`), :func:`value_and_grad`,
:func:`init_feedback`, :func:`update_feedback`, :func:`apply`, :func:`tap`,
:func:`plan`, the feedback initializers, and the adapters ``fa_jax.nnx`` and
``fa_jax.linen`` (imported on use). Everything else is private.
"""

# Diagnostics and the optax transform (matplotlib helpers stay in fa_jax.plotting, imported on demand).
from fa_jax import alignment, models, rules, stability, transform
from fa_jax._engine._taps import tap
from fa_jax._feedback import Feedback, init_feedback, shard_feedback, update_feedback
from fa_jax._grad import apply, forward, value_and_grad
from fa_jax._plan import Plan, plan
from fa_jax._specs import TapSpec, WeightSpec, layer_key
from fa_jax.initializers import Tiled, kaiming, launay2019, nokland_zero_hidden, tinydfa_uniform, widest_tap, xavier
from fa_jax.rules import BP, BRSF, DFA, DRTP, FA, FRSF, RULES, USF, KolenPollack, Rule, Shallow, get_rule, register

__version__ = "0.2.0"

__all__ = [
    "Rule",
    "RULES",
    "get_rule",
    "register",
    "rules",
    "BP",
    "FA",
    "DFA",
    "Shallow",
    "USF",
    "FRSF",
    "BRSF",
    "KolenPollack",
    "DRTP",
    "value_and_grad",
    "forward",
    "apply",
    "init_feedback",
    "update_feedback",
    "shard_feedback",
    "Feedback",
    "tap",
    "plan",
    "Plan",
    "WeightSpec",
    "TapSpec",
    "layer_key",
    "tinydfa_uniform",
    "launay2019",
    "xavier",
    "kaiming",
    "Tiled",
    "widest_tap",
    "nokland_zero_hidden",
    "models",
    "alignment",
    "stability",
    "transform",
]
