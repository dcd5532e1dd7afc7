"""Independent NumPy closed-form updates, written from the papers' equations.

MLP: ``a_l = h_{l-1} W_l + b_l``, ``h_l = f(a_l)`` for hidden layers, ``y = a_L``.
Loss ``L = ½ Σ (y - t)² / N``, so the output error is ``e = (y - t) / N``.

* BP:   ``δ_L = e``, ``δ_l = (δ_{l+1} W_{l+1}ᵀ) ⊙ f'(a_l)``
* FA family: ``δ_l = (δ_{l+1} B_{l+1}ᵀ) ⊙ f'(a_l)``      (Lillicrap et al. 2016, eq. 2) with
  B random (FA), ``sign(W)·√(2/(fan_in+fan_out))`` (uSF), ``|M| ⊙ sign(W)`` (frSF, brSF;
  Liao et al. 2016), or the learned B (Kolen–Pollack, Akrout et al. 2019)
* DFA:  ``δ_l = (e B_l) ⊙ f'(a_l)``, ``B_l: (c, d_l)``    (Nøkland 2016, eq. 3)
* DRTP: ``δ_l = ((y*/N) B_l) ⊙ f'(a_l)``                 (Frenkel et al. 2021, eq. 6, scaled like the loss)
* shallow: ``δ_l = 0`` for hidden layers

and for every rule ``∂W_l = h_{l-1}ᵀ δ_l``, ``∂b_l = Σ_n δ_l``.
"""

import math

import numpy as np

ACTIVATION = {
    "tanh": (np.tanh, lambda a: 1.0 - np.tanh(a) ** 2),
    "relu": (lambda a: np.maximum(a, 0.0), lambda a: (a > 0).astype(a.dtype)),
    "sigmoid": (lambda a: 1 / (1 + np.exp(-a)), lambda a: np.exp(-a) / (1 + np.exp(-a)) ** 2),
    "linear": (lambda a: a, lambda a: np.ones_like(a)),
}


def forward(params, x, activation):
    f, _ = ACTIVATION[activation]
    hs, pre = [x], []
    for i, layer in enumerate(params):
        a = hs[-1] @ layer["kernel"] + layer["bias"]
        pre.append(a)
        hs.append(a if i == len(params) - 1 else f(a))
    return hs, pre


def mse(y, t):
    return 0.5 * np.sum((y - t) ** 2) / y.shape[0]


def gradients(params, x, t, activation, *, chain=None, direct=None, source="error", frozen=False):
    """``(loss, grads)`` in float64.

    Args:
      chain: per layer, the matrix standing for ``W_l`` in the backward (FA family); ``None`` for BP.
      direct: per hidden layer, ``B_l`` of shape ``(c, d_l)`` (DFA, DRTP).
      source: ``"error"`` projects ``e`` (DFA), ``"target"`` projects ``t / N`` (DRTP).
      frozen: hidden layers get no signal (shallow).
    """
    params = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    _, fprime = ACTIVATION[activation]
    hs, pre = forward(params, x, activation)
    y = hs[-1]
    e = (y - t) / y.shape[0]
    depth = len(params)
    deltas = [None] * depth
    deltas[-1] = e
    for layer in range(depth - 2, -1, -1):
        if frozen:
            back = np.zeros_like(pre[layer])
        elif direct is not None:
            signal = e if source == "error" else t / y.shape[0]
            back = signal @ np.asarray(direct[layer], np.float64)
        else:
            matrix = params[layer + 1]["kernel"] if chain is None else np.asarray(chain[layer + 1], np.float64)
            back = deltas[layer + 1] @ matrix.T
        deltas[layer] = back * fprime(pre[layer])
    grads = [{"kernel": hs[layer].T @ deltas[layer], "bias": deltas[layer].sum(0)} for layer in range(depth)]
    return mse(y, t), grads


def sign_matrix(weight, magnitude=None):
    """Liao et al. 2016: ``sign(W)·√(2/(fan_in+fan_out))`` (uSF) or ``|M| ⊙ sign(W)`` (frSF, brSF)."""
    weight = np.asarray(weight, np.float64)
    if magnitude is None:
        return np.sign(weight) * math.sqrt(2.0 / (weight.shape[0] + weight.shape[1]))
    return np.abs(np.asarray(magnitude, np.float64)) * np.sign(weight)
