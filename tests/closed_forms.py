"""Each registered rule's closed-form MLP update, built from its feedback with NumPy (tests/reference.py).

``CLOSED_FORMS[name](rule, params, feedback, x, t, activation, step)`` returns ``(loss, grads)``
for the MLP of ``fa_jax.models.mlp`` under ``L = ½ Σ (y − t)² / N``. Random matrices are read
from the feedback (or drawn from its keys with the rule's own ``init``, the draw alone being
JAX's); every formula is written here from the papers. A rule added in a test registers its
own entry.
"""

import jax
import jax.numpy as jnp
import numpy as np

import reference


def _kernels(params):
    return [np.asarray(layer["kernel"], np.float64) for layer in params]


def _leaves(feedback, params):
    return [feedback.weights[f"{i}/kernel"] for i in range(len(params))]


def _is_key(leaf):
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _drawn(rule, leaf, shape):
    return np.asarray(rule.init(leaf, shape, jnp.float32) if _is_key(leaf) else leaf, np.float64)


def _direct(rule, feedback):
    """The per-tap ``B_l (c, d_l)``: consecutive column blocks, or TinyDFA's prefixes."""
    layout = feedback.layout
    projection = feedback.taps
    if _is_key(projection):
        from fa_jax.rules import _projection  # only the draw: regenerated feedback = stored feedback

        projection = _projection.draw(layout, projection, rule.init, shared_prefix=rule.shared_prefix)
    projection = np.asarray(projection, np.float64)
    blocks, start = [], 0
    for tap in layout.taps:
        if rule.shared_prefix:
            blocks.append(projection[:, : tap.size])
        else:
            blocks.append(projection[:, start : start + tap.size])
            start += tap.size
    return blocks


def bp(rule, params, feedback, x, t, activation, step):
    return reference.gradients(params, x, t, activation)


def fa(rule, params, feedback, x, t, activation, step):
    chain = [_drawn(rule, leaf, w.shape) for leaf, w in zip(_leaves(feedback, params), _kernels(params), strict=True)]
    return reference.gradients(params, x, t, activation, chain=chain)


def usf(rule, params, feedback, x, t, activation, step):
    kernels = _kernels(params)
    if rule.scale == "xavier":
        chain = [reference.sign_matrix(w) for w in kernels]
    else:
        chain = [np.sign(w) * rule.scale for w in kernels]
    return reference.gradients(params, x, t, activation, chain=chain)


def frsf(rule, params, feedback, x, t, activation, step):
    kernels = _kernels(params)
    chain = [
        reference.sign_matrix(w, _drawn(rule, leaf, w.shape))
        for leaf, w in zip(_leaves(feedback, params), kernels, strict=True)
    ]
    return reference.gradients(params, x, t, activation, chain=chain)


def brsf(rule, params, feedback, x, t, activation, step):
    kernels = _kernels(params)
    chain = [
        reference.sign_matrix(w, rule.init(jax.random.fold_in(leaf, step), w.shape, jnp.float32))
        for leaf, w in zip(_leaves(feedback, params), kernels, strict=True)
    ]
    return reference.gradients(params, x, t, activation, chain=chain)


def dfa(rule, params, feedback, x, t, activation, step):
    return reference.gradients(params, x, t, activation, direct=_direct(rule, feedback))


def drtp(rule, params, feedback, x, t, activation, step):
    return reference.gradients(params, x, t, activation, direct=_direct(rule, feedback), source="target")


def shallow(rule, params, feedback, x, t, activation, step):
    return reference.gradients(params, x, t, activation, frozen=True)


CLOSED_FORMS = {
    "bp": bp,
    "fa": fa,
    "kp": fa,
    "usf": usf,
    "frsf": frsf,
    "brsf": brsf,
    "dfa": dfa,
    "drtp": drtp,
    "shallow": shallow,
}
