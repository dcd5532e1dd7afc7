"""Fixed points of a learning rule and their linear stability (Chu & Bacho 2023).

A rule defines the update direction ``g(θ)`` (the BP gradient, or FA's / DFA's
substitute) and the dynamics ``θ ← θ - η g(θ)``, in continuous time
``dθ/dt = -g(θ)``. Its fixed points satisfy ``g(θ*) = 0``; Chu & Bacho show
those of FA sit at extrema of the loss and that gradient alignment is a
stability criterion for them.

Linearising at ``θ*`` gives ``dδ/dt = -J δ`` with the **update Jacobian**
``J = ∂g/∂θ``, computed here by reverse mode (``jax.jacrev``) through the
engine's ``custom_vjp``s, the feedback products, the tap cuts and the head, for
every rule (forward mode is unavailable for ``custom_vjp``). ``θ*`` is linearly
stable when every eigenvalue of ``-J`` has a negative real part; under BP ``J``
is the Hessian of the loss and symmetric.

An *update* here is ``update(params) -> (loss, grads)``; :func:`as_update`
builds one from a model, a loss, a rule, its feedback and a batch, for any
model ``model(params, inputs)`` and any rule.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fa_jax import _checks
from fa_jax._grad import value_and_grad
from fa_jax.alignment import cosine
from fa_jax.rules import Rule

Update = Callable[[Any], tuple[jax.Array, Any]]

__all__ = [
    "as_update",
    "update_jacobian",
    "jacobian_eigenvalues",
    "arnoldi_eigenvalues",
    "FixedPoint",
    "find_fixed_point",
    "StabilityReport",
    "stability_report",
]


def as_update(
    model: Callable,
    loss: Callable,
    rule: Rule | str,
    feedback: Any,
    inputs: Any,
    targets: Any,
    *,
    weight_decay: float = 0.0,
    step: Any = None,
) -> Update:
    """``update(params) -> (loss, g)`` of ``rule`` on one fixed batch, ``g = rule update + λθ``.

    ``g`` is :func:`fa_jax.value_and_grad`'s update. It is differentiable in
    ``params`` in reverse mode, so ``jax.jacrev(update)`` is the Jacobian of the
    update map, for every rule: a tap rule's cut is a ``custom_vjp`` identity (not
    a ``stop_gradient``), so ``jacrev`` follows how a block's input and the error
    depend on upstream weights, and a feedback product's backward is an ordinary
    function of W, B and the activations.

    Args:
      model, loss, rule, feedback: as for :func:`fa_jax.value_and_grad` (``feedback``
        from :func:`fa_jax.init_feedback`; ``None`` for BP).
      inputs, targets: the fixed batch.
      weight_decay: ``λ``; adds ``λ/2 ‖θ‖²`` to the loss and ``λθ`` to every
        update, so cross-entropy problems get isolated fixed points.
      step: the training step, for rules that redraw feedback every step (brSF);
        the update is then the one of that step, held fixed.
    """
    grad_fn = value_and_grad(model, loss, rule)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"weight_decay: expected a number >= 0, given {weight_decay!r}")
    if step is not None:
        _checks.check_step_value(step, "step")

    def raw(params):
        return grad_fn(params, feedback, inputs, targets, step=step)

    def update(params):
        value, grads = raw(params)
        if weight_decay:
            sq = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
            value = value + 0.5 * weight_decay * sq
            grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        return value, grads

    return update


def _flat_update(update: Update, params: Any):
    flat, unravel = ravel_pytree(params)
    return flat, lambda v: ravel_pytree(update(unravel(v))[1])[0]


def update_jacobian(update: Update, params: Any) -> jax.Array:
    """``J = ∂g/∂θ``, shape ``(n, n)`` with ``n`` the number of parameters (``ravel_pytree`` order).

    Row ``i`` is the derivative of update entry ``i``. Costs ``n`` VJPs
    (``jax.jacrev``); use :func:`arnoldi_eigenvalues` when ``n`` is large.
    """
    flat, g = _flat_update(update, params)
    return jax.jit(jax.jacrev(g))(flat)


def jacobian_eigenvalues(update: Update, params: Any) -> np.ndarray:
    """All eigenvalues of ``J`` (complex, NumPy), sorted by real part, ascending."""
    jac = np.asarray(update_jacobian(update, params), dtype=np.float64)
    eig = np.linalg.eigvals(jac)
    return eig[np.argsort(eig.real, kind="stable")]


def arnoldi_eigenvalues(
    update: Update, params: Any, *, key: jax.Array, num_iterations: int = 30, shift: float = 0.0
) -> np.ndarray:
    """Ritz values of ``J`` from ``num_iterations`` Arnoldi steps, matrix-free.

    Uses ``v ↦ Jᵀv`` by one reverse-mode VJP of the update per step (``Jᵀ`` has
    the spectrum of ``J``). Arnoldi finds the eigenvalues of ``J - shift·I``
    that are extremal in the complex plane first; to resolve the *leftmost*
    eigenvalues of ``J`` (the unstable directions of ``dθ/dt = -g``), pass
    ``shift`` about the largest real eigenvalue so they become the largest in
    magnitude. Under BP (symmetric ``J``) this is the Lanczos iteration.

    Returns:
      ``num_iterations`` Ritz values of ``J`` (shift added back), sorted by
      real part, ascending.
    """
    flat, g = _flat_update(update, params)
    _, vjp = jax.vjp(g, flat)
    product = jax.jit(lambda v: vjp(v)[0] - shift * v)
    n = flat.size
    steps = min(num_iterations, n)
    basis = np.zeros((steps + 1, n))
    hessenberg = np.zeros((steps + 1, steps))
    start = np.asarray(jax.random.normal(key, (n,)), dtype=np.float64)
    basis[0] = start / np.linalg.norm(start)
    for j in range(steps):
        w = np.array(product(jnp.asarray(basis[j], flat.dtype)), dtype=np.float64)
        for _ in range(2):  # twice-repeated Gram-Schmidt keeps the basis orthogonal in float32
            coeffs = basis[: j + 1] @ w
            w -= coeffs @ basis[: j + 1]
            hessenberg[: j + 1, j] += coeffs
        hessenberg[j + 1, j] = np.linalg.norm(w)
        if hessenberg[j + 1, j] < 1e-10:  # invariant subspace found: the Ritz values are exact
            steps = j + 1
            break
        basis[j + 1] = w / hessenberg[j + 1, j]
    ritz = np.linalg.eigvals(hessenberg[:steps, :steps]) + shift
    return ritz[np.argsort(ritz.real, kind="stable")]


class FixedPoint(NamedTuple):
    """Result of :func:`find_fixed_point`."""

    params: Any  # θ* (or the last iterate)
    loss: jax.Array
    update_norm: jax.Array  # ‖g(θ*)‖
    steps: jax.Array
    converged: jax.Array  # update_norm < tol


def find_fixed_point(
    update: Update,
    params: Any,
    *,
    learning_rate: float,
    tol: float = 1e-5,
    max_steps: int = 10_000,
    newton_steps: int = 0,
) -> FixedPoint:
    """Run ``θ ← θ - η g(θ)`` until ``‖g(θ)‖ < tol`` or ``max_steps`` (one ``lax.while_loop``).

    ``tol`` applies to the update direction ``g``, not to the step ``η g``, so it
    does not depend on the learning rate.

    ``newton_steps``: if the rule has not converged, polish with up to this many
    Newton steps ``θ ← θ - J⁺ g`` on the dense update Jacobian (small models
    only; least squares, so a singular ``J`` on a manifold of fixed points is
    fine). Near slow directions the rule itself needs ``~1/(η λ_min)`` steps;
    Newton converges quadratically to the nearby fixed point, stable or not,
    which is what a stability analysis needs. A Newton step that does not
    lower ``‖g‖`` is refused and ends the polish. ``steps`` counts the
    accepted steps of both kinds.
    """

    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))

    def cond(state):
        _, _, step, gnorm, _ = state
        return (step < max_steps) & (gnorm >= tol)

    def body(state):
        theta, grads, step, _, _ = state
        theta = jax.tree.map(lambda p, g: p - learning_rate * g, theta, grads)
        value, grads = update(theta)
        return theta, grads, step + 1, norm(grads), value

    @jax.jit
    def run(theta):
        value, grads = update(theta)
        return jax.lax.while_loop(cond, body, (theta, grads, jnp.asarray(0), norm(grads), value))

    theta, _, steps, gnorm, value = run(params)
    if newton_steps and not gnorm < tol:
        flat, unravel = ravel_pytree(theta)

        @jax.jit
        def newton(v):
            g = ravel_pytree(update(unravel(v))[1])[0]
            jac = jax.jacrev(lambda w: ravel_pytree(update(unravel(w))[1])[0])(v)
            return v - jnp.linalg.lstsq(jac, g)[0]

        measure = jax.jit(lambda v: (lambda lv: (lv[0], norm(lv[1])))(update(unravel(v))))
        for _ in range(newton_steps):
            candidate = newton(flat)
            candidate_value, candidate_norm = measure(candidate)
            if not candidate_norm < gnorm:  # far from a fixed point Newton can diverge: keep the best point
                break
            flat, value, gnorm, steps = candidate, candidate_value, candidate_norm, steps + 1
            if gnorm < tol:
                break
        theta = unravel(flat)
    return FixedPoint(theta, value, gnorm, steps, gnorm < tol)


class StabilityReport(NamedTuple):
    """Linear stability of ``dθ/dt = -g(θ)`` at a point, beside the alignment there.

    ``max_real`` is the largest real part of the eigenvalues of ``-J``; the point
    is linearly stable when it is ``< 0`` (``stable`` allows a relative ``tol``).
    ``alignment``: cosine of ``g`` and the BP gradient at the point (ill-defined
    where both vanish); ``linearised_alignment``: mean over random directions
    ``δ`` of ``cos(J δ, H δ)``, the alignment of the two linearised flows.
    """

    eigenvalues: np.ndarray  # of J, ascending real part
    max_real: float
    stable: bool
    loss: float
    update_norm: float
    asymmetry: float  # ‖J - Jᵀ‖ / ‖J‖; 0 under BP
    alignment: float | None
    linearised_alignment: float | None


def stability_report(
    update: Update,
    params: Any,
    *,
    bp_update: Update | None = None,
    key: jax.Array | None = None,
    directions: int = 64,
    tol: float = 1e-6,
) -> StabilityReport:
    """Eigenvalues of the dense update Jacobian at ``params`` (e.g. a fixed point) and alignment.

    Args:
      update: the rule's ``update(params) -> (loss, g)``.
      bp_update: the BP update on the same batch; if given, both alignments are reported.
      key: draws the random directions of ``linearised_alignment``.
      tol: ``stable`` is ``max_real <= tol · max|λ|``, relative to the spectral
        radius (a zero eigenvalue is marginal, e.g. along a manifold of fixed points).
    """
    value, grads = jax.jit(update)(params)
    jac = np.asarray(update_jacobian(update, params), dtype=np.float64)
    eig = np.linalg.eigvals(jac)
    eig = eig[np.argsort(eig.real, kind="stable")]
    max_real = float(np.max(-eig.real))
    asymmetry = float(np.linalg.norm(jac - jac.T) / max(np.linalg.norm(jac), np.finfo(np.float64).tiny))
    flat_g = ravel_pytree(grads)[0]
    alignment = linearised = None
    if bp_update is not None:
        _, bp_grads = jax.jit(bp_update)(params)
        alignment = float(cosine(flat_g, ravel_pytree(bp_grads)[0]).cosine)
        hessian = np.asarray(update_jacobian(bp_update, params), dtype=np.float64)
        key = jax.random.key(0) if key is None else key
        deltas = np.asarray(jax.random.normal(key, (directions, jac.shape[0])), dtype=np.float64)
        a, b = deltas @ jac.T, deltas @ hessian.T
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        linearised = float(np.mean(cos))
    return StabilityReport(
        eigenvalues=eig,
        max_real=max_real,
        stable=bool(max_real <= tol * float(np.max(np.abs(eig)))),
        loss=float(value),
        update_norm=float(jnp.linalg.norm(flat_g)),
        asymmetry=asymmetry,
        alignment=alignment,
        linearised_alignment=linearised,
    )
