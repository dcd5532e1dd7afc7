"""Learning rules: one protocol (:class:`Rule`), one module per rule.

Importing this package registers every rule, so ``get_rule(name)`` finds it.
"""

from fa_jax.rules._base import RULES, Rule, get_rule, register
from fa_jax.rules.bp import BP
from fa_jax.rules.dfa import DFA, Shallow
from fa_jax.rules.drtp import DRTP
from fa_jax.rules.fa import FA
from fa_jax.rules.kolen_pollack import KolenPollack
from fa_jax.rules.sign import BRSF, FRSF, USF

__all__ = [
    "RULES",
    "Rule",
    "get_rule",
    "register",
    "BP",
    "FA",
    "DFA",
    "Shallow",
    "USF",
    "FRSF",
    "BRSF",
    "KolenPollack",
    "DRTP",
]
