"""A rule written in the tests only: scaled sign feedback, ``B = α · sign(W)``.

It shows what a new rule is: one class implementing :class:`fa_jax.Rule` (what stands
for W in the input gradient) plus its closed form. Nothing else in fa_jax knows it, yet
``tests/test_conformance.py`` runs it through every entry point (core, NNX, Linen, the
optax transform, the runner). ``tests/conftest.py`` registers it for the whole suite.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

import fa_jax as fj
import reference


@fj.register
@dataclasses.dataclass(frozen=True)
class ScaledSign(fj.Rule):
    """``δ_l = (δ_{l+1} (α sign(W_{l+1}))ᵀ) ⊙ f'(a_l)``: the sign of W at a fixed magnitude α."""

    scale: float = 0.5
    name = "scaled_sign"
    reads_weight = True

    def init_weight(self, spec, *, key):
        return ()  # nothing to store: B is built from W in the backward

    def backward_matrix(self, weight, feedback, *, spec, step):
        return self.scale * jnp.sign(weight)


def closed_form(rule, params, feedback, x, t, activation, step):
    """The MLP update of ``rule`` in NumPy (tests/reference.py): ``B_l = α · sign(W_l)``."""
    chain = [rule.scale * np.sign(np.asarray(layer["kernel"], np.float64)) for layer in params]
    return reference.gradients(params, x, t, activation, chain=chain)
