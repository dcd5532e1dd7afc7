"""Independent NumPy closed-form updates, written from the papers' equations.

MLP: ``a_l = h_{l-1} W_l + b_l``, ``h_l = f(a_l)`` for hidden layers, ``y = a_L``.
Loss ``L = ½ Σ (y - t)² / N``, so the output error is ``e = (y - t) / N``.

* BP:  ``δ_L = e``, ``δ_l = (δ_{l+1} W_{l+1}ᵀ) ⊙ f'(a_l)``
* FA:  ``δ_l = (δ_{l+1} B_{l+1}ᵀ) ⊙ f'(a_l)``              (Lillicrap et al. 2016, eq. 2)
* DFA: ``δ_l = (e B_l) ⊙ f'(a_l)``, ``B_l: (c, d_l)``      (Nøkland 2016, eq. 3)

and for every rule ``∂W_l = h_{l-1}ᵀ δ_l``, ``∂b_l = Σ_n δ_l``.
"""

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


def gradients(params, x, t, activation, rule, feedback=None):
    """``(loss, grads)`` for ``rule`` in {"bp", "fa", "dfa", "shallow"}.

    ``feedback``: FA, a list of B with the kernels' shapes; DFA, a list of B_l (c, d_l).
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
    for l in range(depth - 2, -1, -1):
        if rule == "bp":
            back = deltas[l + 1] @ params[l + 1]["kernel"].T
        elif rule == "fa":
            back = deltas[l + 1] @ np.asarray(feedback[l + 1], np.float64).T
        elif rule == "dfa":
            back = e @ np.asarray(feedback[l], np.float64)
        elif rule == "shallow":
            back = np.zeros_like(pre[l])
        deltas[l] = back * fprime(pre[l])
    grads = [{"kernel": hs[l].T @ deltas[l], "bias": deltas[l].sum(0)} for l in range(depth)]
    return mse(y, t), grads
