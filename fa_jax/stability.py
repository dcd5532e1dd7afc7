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

import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fa_jax import _checks
from fa_jax._feedback import by_path
from fa_jax._grad import forward, value_and_grad
from fa_jax.alignment import Cosine, cosine
from fa_jax.rules import Rule, get_rule

Update = Callable[[Any], tuple[jax.Array, Any]]

__all__ = [
    "BoundUpdate",
    "as_update",
    "update_jacobian",
    "jacobian_eigenvalues",
    "arnoldi_eigenvalues",
    "FixedPoint",
    "find_fixed_point",
    "StabilityReport",
    "stability_report",
    "backward_map",
    "BackwardAlignment",
    "backward_alignment",
    "perturbation_directions",
    "Perturbation",
    "perturbation_test",
]


class BoundUpdate:
    """``update(params) -> (loss, g)``: a pure ``core(params, args)`` bound to ``args``.

    What :func:`as_update` returns. The functions of this module compile ``core``
    once and pass ``args`` (feedback, batch, step) as arguments, so a sweep over seeds
    or feedback draws of one model, loss and rule compiles each program once, not once
    per update. Any other callable ``update(params)`` works too, compiled per object.
    """

    def __init__(self, core: Callable, args: Any):
        self.core, self.args = core, args

    def __call__(self, params):
        return self.core(params, self.args)


def _memo(factory: Callable) -> Callable:
    """``factory`` cached on its (hashable) arguments; unhashable ones (e.g. a closure's cell) build anew."""
    cached = functools.lru_cache(maxsize=64)(factory)

    def get(*key):
        try:
            return cached(*key)
        except TypeError:  # an unhashable model or loss
            return factory(*key)

    return get


def _make_core(model: Callable, loss: Callable, rule: Rule, weight_decay: float) -> Callable:
    grad_fn = value_and_grad(model, loss, rule)

    def core(params, args):
        feedback, inputs, targets, step = args
        value, grads = grad_fn(params, feedback, inputs, targets, step=step)
        if weight_decay:
            sq = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
            value = value + 0.5 * weight_decay * sq
            grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        return value, grads

    return core


_core = _memo(_make_core)


def _opaque_core(update: Update) -> Callable:
    return lambda params, args: update(params)


_opaque = _memo(_opaque_core)


def _parts(update: Update) -> tuple[Callable, Any]:
    """``(core, args)`` with ``update(p) = core(p, args)``; ``core`` is what compiled programs are cached on."""
    _checks.check_callable(update, "update")
    if isinstance(update, BoundUpdate):
        return update.core, update.args
    return _opaque(update), ()


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
) -> BoundUpdate:
    """``update(params) -> (loss, g)`` of ``rule`` on one fixed batch, ``g = rule update + λθ``.

    ``g`` is :func:`fa_jax.value_and_grad`'s update. It is differentiable in
    ``params`` in reverse mode, so ``jax.jacrev(update)`` is the Jacobian of the
    update map, for every rule: a tap rule's cut is a ``custom_vjp`` identity (not
    a ``stop_gradient``), so ``jacrev`` follows how a block's input and the error
    depend on upstream weights, and a feedback product's backward is an ordinary
    function of W, B and the activations.

    Updates built from the same ``model``, ``loss``, ``rule`` and ``weight_decay``
    share their compiled programs in this module (feedback and batch are arguments).

    Args:
      model, loss, rule, feedback: as for :func:`fa_jax.value_and_grad` (``feedback``
        from :func:`fa_jax.init_feedback`; ``None`` for BP).
      inputs, targets: the fixed batch.
      weight_decay: ``λ``; adds ``λ/2 ‖θ‖²`` to the loss and ``λθ`` to every
        update, so cross-entropy problems get isolated fixed points.
      step: the training step, for rules that redraw feedback every step (brSF);
        the update is then the one of that step, held fixed.
    """
    rule = get_rule(rule)
    _checks.check_callable(model, "model")
    _checks.check_callable(loss, "loss")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"weight_decay: expected a number >= 0, given {weight_decay!r}")
    if step is not None:
        _checks.check_step_value(step, "step")
    return BoundUpdate(_core(model, loss, rule, float(weight_decay)), (feedback, inputs, targets, step))


def _make_flat(core: Callable) -> Callable:
    """``flat_g(v, params, args)``: the update as a function of the flat parameter vector ``v``."""

    def flat_g(v, params, args):
        unravel = ravel_pytree(params)[1]
        return ravel_pytree(core(unravel(v), args)[1])[0]

    return flat_g


def _make_jacobian(core: Callable) -> Callable:
    flat_g = _make_flat(core)
    return jax.jit(lambda params, args: jax.jacrev(flat_g)(ravel_pytree(params)[0], params, args))


_jacobian = _memo(_make_jacobian)
_evaluate = _memo(jax.jit)


def _flat_update(update: Update, params: Any):
    flat, unravel = ravel_pytree(params)
    return flat, lambda v: ravel_pytree(update(unravel(v))[1])[0]


def update_jacobian(update: Update, params: Any) -> jax.Array:
    """``J = ∂g/∂θ``, shape ``(n, n)`` with ``n`` the number of parameters (``ravel_pytree`` order).

    Row ``i`` is the derivative of update entry ``i``. Costs ``n`` VJPs
    (``jax.jacrev``); use :func:`arnoldi_eigenvalues` when ``n`` is large.
    """
    core, args = _parts(update)
    return _jacobian(core)(params, args)


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
    steps: jax.Array  # accepted steps of both kinds
    converged: jax.Array  # update_norm < tol
    newton: int = 0  # accepted Newton steps among ``steps`` (0: the rule's own steps got there)
    rule_norm: Any = None  # ‖g‖ where the rule's own steps stopped, before any Newton step


def _check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A finite real number ``> 0`` (``>= 0`` with ``allow_zero``); bools and arrays of several values refused."""
    if isinstance(value, (bool, np.bool_)) or not (
        isinstance(value, numbers.Real) or (_checks.is_array(value) and value.shape == ())
    ):
        raise TypeError(f"{name}: expected a real number, given {_checks.describe(value)}")
    number = float(value)
    if not np.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite number {'>= 0' if allow_zero else '> 0'}, given {value!r}")
    return number


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _make_descent(core: Callable) -> Callable:
    """``run(params, args, η, tol, max_steps)``: ``θ ← θ - η g`` in one ``lax.while_loop``.

    η, tol and max_steps are traced: one compilation serves every setting.
    """

    def run(theta, args, learning_rate, tol, max_steps):
        def cond(state):
            _, _, step, gnorm, _ = state
            return (step < max_steps) & (gnorm >= tol)

        def body(state):
            theta, grads, step, _, _ = state
            theta = jax.tree.map(lambda p, g: p - learning_rate * g, theta, grads)
            value, grads = core(theta, args)
            return theta, grads, step + 1, _norm(grads), value

        value, grads = core(theta, args)
        return jax.lax.while_loop(cond, body, (theta, grads, jnp.asarray(0), _norm(grads), value))

    return jax.jit(run)


def _make_measure(core: Callable, residual: Callable | None) -> Callable:
    """``measure(v, template, args) -> (loss, ‖g‖, ‖e‖)`` at the flat point ``v`` (``template`` gives the structure)."""

    def measure(v, template, args):
        params = ravel_pytree(template)[1](v)
        value, grads = core(params, args)
        error = jnp.nan if residual is None else jnp.linalg.norm(jnp.ravel(residual(params)))
        return value, _norm(grads), error

    return jax.jit(measure)


def _make_linearise_residual(residual: Callable) -> Callable:
    def linearise(v, template):
        unravel = ravel_pytree(template)[1]
        flat_e = lambda w: jnp.ravel(residual(unravel(w)))
        return flat_e(v), jax.jacrev(flat_e)(v)

    return jax.jit(linearise)


def _make_linearise_update(core: Callable) -> Callable:
    flat_g = _make_flat(core)
    return jax.jit(lambda v, template, args: (flat_g(v, template, args), jax.jacrev(flat_g)(v, template, args)))


_descent = _memo(_make_descent)
_measure = _memo(_make_measure)
_linearise_residual = _memo(_make_linearise_residual)
_linearise_update = _memo(_make_linearise_update)


def _newton_candidates(jac: np.ndarray, g: np.ndarray) -> list[np.ndarray]:
    """Steps ``δ`` (``θ ← θ - δ``) to try: Newton's ``J⁺g`` with the pseudo-inverse cut at several ranks.

    Near a manifold of fixed points ``J`` has, besides the singular values of the
    fixed point, many of the size of the residual ``‖g‖``: the full pseudo-inverse
    takes huge steps along those. Cutting ``J⁺`` at ``σ > c · σ_max`` for
    ``c = 10⁻¹⁴ … 10⁻¹`` gives Newton steps on the leading subspaces, one of
    which separates the two (the caller keeps the one that lowers ``‖g‖`` most).
    """
    u, s, vt = np.linalg.svd(jac, full_matrices=False)
    coeffs = (u.T @ g) / np.where(s > 0, s, 1)
    out, ranks = [], set()
    for cut in (1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        rank = int(np.sum(s > cut * s[0])) if s.size and s[0] > 0 else 0
        if rank and rank not in ranks:
            ranks.add(rank)
            out.append(vt[:rank].T @ coeffs[:rank])
    return out


def find_fixed_point(
    update: Update,
    params: Any,
    *,
    learning_rate: float,
    tol: float = 1e-5,
    max_steps: int = 10_000,
    newton_steps: int = 0,
    residual: Callable | None = None,
) -> FixedPoint:
    """Run ``θ ← θ - η g(θ)`` until ``‖g(θ)‖ < tol`` or ``max_steps`` (one ``lax.while_loop``).

    ``tol`` applies to the update direction ``g``, not to the step ``η g``, so it
    does not depend on the learning rate. ``‖g‖ < 1e-8`` needs float64
    (``jax.enable_x64``): in float32 ``g`` is rounding noise well above that.

    ``newton_steps``: if the rule has not converged, polish with up to this many
    Newton steps ``θ ← θ - J⁺g`` on the dense update Jacobian ``J`` (small models
    only), the pseudo-inverse cut at several ranks (a singular ``J`` on a manifold
    of fixed points is fine), each also tried at half and an eighth of its length:
    the candidate with the smallest ``‖g‖`` is taken if it lowers ``‖g‖``; when
    none does the polish ends at the best point. Near slow directions
    the rule itself needs ``~1/(η λ_min)`` steps; the polish converges
    quadratically to a nearby fixed point, stable or not, which is what a
    stability analysis needs (check it with :func:`stability_report`). ``steps``
    counts the accepted steps of both kinds, ``newton`` the polishing ones.

    ``residual``: ``residual(params) -> e``, the output error ``y - t`` of a
    squared-error problem. Every error-driven rule's update is then
    ``g = B̃ᵀ e / N`` (:func:`backward_map`), which vanishes where ``e = 0``. The
    polish then takes Gauss–Newton steps on ``e`` instead,
    ``θ ← θ - α J_e⁺ e`` (``J_e = ∂e/∂θ``, the minimum-norm step, ``α`` halved
    until ``‖e‖`` falls): they converge quadratically to the zero-loss manifold
    even where ``J`` has no gap between its fixed-point and residual-sized
    singular values (over-parameterised networks). The landing point is a fixed
    point of every such rule near where the rule's own steps stopped, not
    necessarily the one they would have reached; whether it is one is still
    judged by the rule's own ``‖g‖ < tol``.

    Raises:
      ValueError / TypeError naming the argument: ``learning_rate <= 0``, ``tol < 0``,
      a non-integer or negative ``max_steps`` or ``newton_steps``.
    """
    learning_rate = _check_positive(learning_rate, "learning_rate")
    tol = _check_positive(tol, "tol", allow_zero=True)
    max_steps = _checks.check_int(max_steps, "max_steps", minimum=0)
    newton_steps = _checks.check_int(newton_steps, "newton_steps", minimum=0)
    _checks.check_floating_tree(params, "params")

    core, args = _parts(update)
    theta, _, steps, gnorm, value = _descent(core)(params, args, learning_rate, tol, max_steps)
    rule_norm, accepted = gnorm, 0
    if residual is not None:
        _checks.check_callable(residual, "residual")
    if newton_steps and not gnorm < tol:
        flat, unravel = ravel_pytree(theta)
        measure = _measure(core, residual)
        if residual is not None:
            linearise = _linearise_residual(residual)
            for _ in range(newton_steps):
                e, jac = (np.asarray(a, np.float64) for a in linearise(flat, theta))
                step_dir = np.linalg.lstsq(jac, e, rcond=None)[0]
                enorm = np.linalg.norm(e)
                for halvings in range(8):
                    candidate = flat - jnp.asarray(step_dir / 2**halvings, flat.dtype)
                    candidate_value, candidate_norm, candidate_e = measure(candidate, theta, args)
                    if candidate_e < enorm:  # NaN compares False: refused
                        break
                else:  # no step length lowered ‖e‖: stop at the last point
                    break
                flat, value, gnorm = candidate, candidate_value, candidate_norm
                steps, accepted = steps + 1, accepted + 1
                if gnorm < tol:
                    break
        else:
            linearise = _linearise_update(core)
            for _ in range(newton_steps):
                g, jac = (np.asarray(a, np.float64) for a in linearise(flat, theta, args))
                best = None
                for candidate_step in _newton_candidates(jac, g):
                    for halvings in (0, 1, 3):  # a short line search along each
                        candidate = flat - jnp.asarray(candidate_step / 2**halvings, flat.dtype)
                        candidate_value, candidate_norm, _ = measure(candidate, theta, args)
                        if candidate_norm < (gnorm if best is None else best[2]):  # NaN compares False: refused
                            best = (candidate, candidate_value, candidate_norm)
                if best is None:  # no candidate lowered ‖g‖: keep the best point
                    break
                flat, value, gnorm = best
                steps, accepted = steps + 1, accepted + 1
                if gnorm < tol:
                    break
        theta = unravel(flat)
    return FixedPoint(theta, value, gnorm, steps, gnorm < tol, accepted, rule_norm)


class StabilityReport(NamedTuple):
    """Linear stability of ``dθ/dt = -g(θ)`` at a point, beside the alignment there.

    ``max_real`` is the largest real part of the eigenvalues of ``-J``; the point
    is linearly stable when it is ``< 0`` (``stable`` allows a relative ``tol``).
    ``alignment``: cosine of ``g`` and the BP gradient at the point (``NaN`` at an
    exact fixed point of zero loss, where both vanish: use :func:`backward_alignment`
    there); ``linearised_alignment``: mean over random directions ``δ`` of
    ``cos(J δ, H δ)``, the alignment of the two linearised flows.

    Eigenvalues with ``|λ| <= tol · max|λ|`` count as zero (``zero_eigenvalues``):
    at a fixed point of zero loss they are the directions along the manifold of
    fixed points, where a kick is neither returned nor amplified. ``margin`` is the
    smallest real part of the other eigenvalues of ``J``: ``> 0`` every direction
    off the manifold returns, at rate ``margin`` for the slowest; ``< 0`` some
    direction is left. ``largest_real`` (the stiffest return) bounds the step:
    the discrete rule ``θ ← θ - η g`` also needs ``|1 - η λ| < 1``.
    """

    eigenvalues: np.ndarray  # of J, ascending real part
    max_real: float
    stable: bool
    loss: float
    update_norm: float
    asymmetry: float  # ‖J - Jᵀ‖ / ‖J‖; 0 under BP
    alignment: float | None
    linearised_alignment: float | None
    zero_eigenvalues: int = 0
    margin: float = float("nan")
    largest_real: float = float("nan")
    jacobian: np.ndarray | None = None  # J itself, (n, n)


def _spectrum_summary(eig: np.ndarray, tol: float) -> tuple[int, float, float]:
    radius = float(np.max(np.abs(eig))) if eig.size else 0.0
    zero = np.abs(eig) <= tol * radius
    rest = eig[~zero]
    margin = float(np.min(rest.real)) if rest.size else float("nan")
    largest = float(np.max(eig.real)) if eig.size else float("nan")
    return int(np.sum(zero)), margin, largest


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
        radius (a zero eigenvalue is marginal, e.g. along a manifold of fixed points);
        the same relative ``tol`` says which eigenvalues count as zero.
    """
    tol = _check_positive(tol, "tol", allow_zero=True)
    core, args = _parts(update)
    value, grads = _evaluate(core)(params, args)
    jac = np.asarray(update_jacobian(update, params), dtype=np.float64)
    if not np.all(np.isfinite(jac)):
        raise ValueError("params: the update Jacobian has NaN or Inf entries there (params from a diverged run?)")
    eig = np.linalg.eigvals(jac)
    eig = eig[np.argsort(eig.real, kind="stable")]
    max_real = float(np.max(-eig.real))
    asymmetry = float(np.linalg.norm(jac - jac.T) / max(np.linalg.norm(jac), np.finfo(np.float64).tiny))
    flat_g = ravel_pytree(grads)[0]
    alignment = linearised = None
    if bp_update is not None:
        bp_core, bp_args = _parts(bp_update)
        _, bp_grads = _evaluate(bp_core)(params, bp_args)
        alignment = float(cosine(flat_g, ravel_pytree(bp_grads)[0]).cosine)
        hessian = np.asarray(update_jacobian(bp_update, params), dtype=np.float64)
        key = jax.random.key(0) if key is None else key
        deltas = np.asarray(jax.random.normal(key, (directions, jac.shape[0])), dtype=np.float64)
        a, b = deltas @ jac.T, deltas @ hessian.T
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        linearised = float(np.mean(cos))
    zeros, margin, largest = _spectrum_summary(eig, tol)
    return StabilityReport(
        eigenvalues=eig,
        max_real=max_real,
        stable=bool(max_real <= tol * float(np.max(np.abs(eig)))),
        loss=float(value),
        update_norm=float(jnp.linalg.norm(flat_g)),
        asymmetry=asymmetry,
        alignment=alignment,
        linearised_alignment=linearised,
        zero_eigenvalues=zeros,
        margin=margin,
        largest_real=largest,
        jacobian=jac,
    )


# --- the backward map at a fixed point ------------------------------------------------------


def backward_map(
    model: Callable, rule: Rule | str, feedback: Any, params: Any, inputs: Any, *, step: Any = None
) -> jax.Array:
    """The rule's backward map ``B̃``: ``(K, n)``, ``K`` the number of output entries, ``n`` of parameters.

    Row ``k`` is the rule's update of every parameter (``ravel_pytree`` order)
    when the loss's gradient at the outputs is the unit vector ``e_k``: the rule's
    update for an output error ``e`` is ``g = B̃ᵀ e``. Under BP ``B̃ = J_f = ∂y/∂θ``,
    the model's Jacobian; FA replaces every ``Wᵀ`` on the way back by ``Bᵀ``
    (Lillicrap et al. 2016, eq. 2), DFA sends ``e B_l`` to each tap (Nøkland 2016,
    eq. 3). Built by ``jax.jacrev`` of :func:`fa_jax.forward` under the rule.

    At a fixed point of zero loss (``e = 0``) with the squared error
    ``½‖y - t‖²/N``, the update Jacobian is ``J = B̃ᵀ J_f / N`` (the derivative of
    ``B̃`` multiplies ``e = 0``). Its non-zero eigenvalues are those of the
    ``K × K`` matrix ``J_f B̃ᵀ / N``: they depend on how ``B̃`` aligns with
    ``J_f``, the "alignment-dependent eigenvalues" of Chu & Bacho 2023.

    Raises:
      ValueError: for a rule whose update does not vanish with the error (DRTP
        projects the targets: ``rule.needs_targets``), which has no such map.
    """
    rule = get_rule(rule)
    if rule.needs_targets:
        raise ValueError(
            f"rule: {rule.name!r} reads the targets in its backward, so its update is not a linear map of the "
            "output error and has no backward map"
        )
    _checks.check_floating_tree(params, "params")
    return _backward(model, rule)(params, feedback, inputs, step)


def _make_backward(model: Callable, rule: Rule) -> Callable:
    run = forward(model, rule)

    def matrix(params, feedback, inputs, step):
        flat, unravel = ravel_pytree(params)
        return jax.jacrev(lambda v: jnp.ravel(run(unravel(v), feedback, inputs, step=step)))(flat)

    return jax.jit(matrix)


_backward = _memo(_make_backward)


class BackwardAlignment(NamedTuple):
    """How a rule's backward map ``B̃`` lines up with the true one ``J_f`` (:func:`backward_alignment`)."""

    total: Cosine  # cos(vec B̃, vec J_f), ‖B̃‖/‖J_f‖
    per_layer: dict[str, Cosine]  # the same per parameter leaf (the columns of that leaf)
    gradient_mean: float  # mean over random errors e of cos(B̃ᵀe, J_fᵀe): the update's alignment with BP's
    gradient_min: float  # the smallest of those cosines
    symmetric_min: float  # λ_min of sym(J_f B̃ᵀ) on range(J_f), over σ_max(J_f)²


def _cosine64(a: np.ndarray, b: np.ndarray) -> Cosine:
    """:func:`fa_jax.alignment.cosine` in NumPy float64 (host matrices; no program compiled per shape)."""
    a, b = np.ravel(a), np.ravel(b)
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    if not (norm_a > 0 and norm_b > 0):
        return Cosine(np.float64(np.nan), np.float64(np.nan), np.float64(norm_a / norm_b if norm_b else np.inf))
    unit_a, unit_b = a / norm_a, b / norm_b
    angle = np.degrees(2 * np.arctan2(np.linalg.norm(unit_a - unit_b), np.linalg.norm(unit_a + unit_b)))
    return Cosine(np.float64(unit_a @ unit_b), np.float64(angle), np.float64(norm_a / norm_b))


def backward_alignment(
    rule_map: jax.Array,
    bp_map: jax.Array,
    params: Any,
    *,
    key: jax.Array | None = None,
    errors: int = 256,
    rank_tol: float = 1e-8,
) -> BackwardAlignment:
    """Alignment of ``B̃`` (the rule's :func:`backward_map`) with ``J_f`` (BP's), defined where ``e = 0``.

    At a fixed point of zero loss the BP gradient vanishes, so the cosine of the
    two updates has no reference; their maps from the error do not. For an output
    error ``e`` the loss changes along the rule's flow as
    ``dL/dt ∝ -eᵀ J_f B̃ᵀ e = -⟨J_fᵀe, B̃ᵀe⟩``: the rule's update for ``e``
    must point within 90° of BP's for the error to shrink (Chu & Bacho 2023).

    * ``gradient_mean``, ``gradient_min``: ``cos(B̃ᵀe, J_fᵀe)`` over ``errors``
      random ``e = J_f u`` (errors the linearised dynamics can produce, ``u`` Gaussian).
    * ``symmetric_min``: the smallest eigenvalue of ``(J_f B̃ᵀ + B̃ J_fᵀ)/2``
      restricted to ``range(J_f)`` (rank by ``rank_tol`` relative to ``σ_max``),
      over ``σ_max(J_f)²``. If it is ``> 0`` every such ``e`` decays and every
      alignment-dependent eigenvalue has a positive real part: a sufficient
      condition for stability, not a necessary one.

    Args:
      rule_map, bp_map: ``(K, n)`` from :func:`backward_map` under the rule and under BP.
      params: the params (their leaves name the column blocks of ``per_layer``).
    """
    a = np.asarray(rule_map, np.float64)
    b = np.asarray(bp_map, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"rule_map, bp_map: expected two (K, n) matrices of one shape, given {a.shape} and {b.shape}")
    leaves = by_path(params)
    sizes = [int(np.size(leaf)) for leaf in leaves.values()]
    if sum(sizes) != a.shape[1]:
        raise ValueError(f"params: {sum(sizes)} parameters, but the maps have {a.shape[1]} columns")
    bounds = np.cumsum([0, *sizes])
    per_layer = {
        path: _cosine64(a[:, lo:hi], b[:, lo:hi]) for path, lo, hi in zip(leaves, bounds[:-1], bounds[1:], strict=True)
    }
    u, s, _ = np.linalg.svd(b, full_matrices=False)
    rank = int(np.sum(s > rank_tol * s[0])) if s.size and s[0] > 0 else 0
    basis = u[:, :rank]
    key = jax.random.key(0) if key is None else key
    draws = np.asarray(jax.random.normal(key, (errors, rank)), np.float64) * s[:rank]  # e = J_f u, in the basis
    e = draws @ basis.T
    ga, gb = e @ a, e @ b
    cos = np.sum(ga * gb, 1) / (np.linalg.norm(ga, axis=1) * np.linalg.norm(gb, axis=1))
    cross = basis.T @ (b @ a.T) @ basis
    symmetric = np.linalg.eigvalsh(0.5 * (cross + cross.T)) if rank else np.array([np.nan])
    return BackwardAlignment(
        total=_cosine64(a, b),
        per_layer=per_layer,
        gradient_mean=float(np.mean(cos)) if rank else float("nan"),
        gradient_min=float(np.min(cos)) if rank else float("nan"),
        symmetric_min=float(symmetric[0] / s[0] ** 2) if rank else float("nan"),
    )


# --- the perturbation test --------------------------------------------------------------------


def perturbation_directions(
    update: Update,
    params: Any,
    *,
    key: jax.Array,
    random: int = 4,
    eigen: int = 2,
    tol: float = 1e-6,
    report: StabilityReport | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Unit directions to kick ``params`` along: ``random`` Gaussian ones, then eigen-directions of ``J``.

    The eigen-directions are the real parts of the eigenvectors of ``J`` (a
    complex pair spans one real invariant plane) for the ``eigen`` non-zero
    eigenvalues (``|λ| > tol · max|λ|``) with the smallest real parts: the
    least stable directions, which leave first if anything does.

    ``report``: :func:`stability_report` at ``params``, if at hand (its ``J`` and
    eigenvalues are used instead of computing them again). Each eigenvector is
    found by two steps of inverse iteration on ``J - λI``: one linear solve, not a
    full eigen-decomposition.

    Returns:
      ``(directions (random + eigen, n), labels)``; a label gives the eigenvalue.
    """
    _checks.check_int(random, "random", minimum=0)
    _checks.check_int(eigen, "eigen", minimum=0)
    flat, _ = ravel_pytree(params)
    n = flat.size
    out: list[np.ndarray] = []
    labels: list[str] = []
    if random:
        draws = np.asarray(jax.random.normal(key, (random, n)), np.float64)
        out.extend(draws / np.linalg.norm(draws, axis=1, keepdims=True))
        labels.extend(f"random {i}" for i in range(random))
    if eigen:
        if report is None:
            report = stability_report(update, params)
        jac = np.asarray(report.jacobian, np.float64)
        values = np.asarray(report.eigenvalues)
        if jac.shape != (n, n):
            raise ValueError(f"report: its Jacobian has shape {jac.shape}, expected {(n, n)} for these params")
        radius = np.max(np.abs(values))
        order = [i for i in np.argsort(values.real, kind="stable") if abs(values[i]) > tol * radius]
        chosen: list[complex] = []
        seen: list[complex] = []
        for i in order:  # one direction per conjugate pair
            if any(abs(values[i] - np.conj(v)) <= 1e-12 * radius for v in seen):
                continue
            seen.append(values[i])
            chosen.append(values[i])
            if len(chosen) == eigen:
                break
        rng = np.random.RandomState(0)
        for value in chosen:
            shifted = jac - (value + 1e-10 * radius) * np.eye(n)  # a hair off λ: solvable, still dominated by λ
            v: np.ndarray = rng.randn(n).astype(np.complex128)
            for _ in range(2):
                v = np.linalg.solve(shifted, v)
                v /= np.linalg.norm(v)
            v = np.real(v * np.exp(-1j * np.angle(v[np.argmax(np.abs(v))])))  # the real part of the plane
            out.append(v / np.linalg.norm(v))
            labels.append(f"eigen λ={value.real:+.3g}{value.imag:+.3g}j")
    return np.stack(out) if out else np.zeros((0, n)), labels


def _make_perturb(core: Callable, records: int) -> Callable:
    flat_g = _make_flat(core)

    def one(v0, template, args, learning_rate, cap_factor, inner):
        def g(v):
            return flat_g(v, template, args)

        start = jnp.linalg.norm(g(v0))
        cap = cap_factor * start  # far beyond "left": stop there rather than overflow

        def step(_, w):
            grads = g(w)
            escaped = ~(jnp.linalg.norm(grads) < cap)
            return jnp.where(escaped, w, w - learning_rate * grads)

        def chunk(v, _):
            v = jax.lax.fori_loop(0, inner, step, v)
            return v, jnp.linalg.norm(g(v))

        end, norms = jax.lax.scan(chunk, v0, None, length=records)
        return end, jnp.concatenate([start[None], norms])

    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None, None, None)))  # inner traced: any steps, one program


_perturb = _memo(_make_perturb)


class Perturbation(NamedTuple):
    """Result of :func:`perturbation_test`, one entry per direction."""

    labels: list[str]
    initial: np.ndarray  # ‖g‖ just after the kick θ* + ε v
    final: np.ndarray  # ‖g‖ after the rule's steps
    history: np.ndarray  # (directions, records + 1): ‖g‖ along the way
    distance: np.ndarray  # ‖θ_end - θ*‖ / ε
    returned: np.ndarray  # bool: final <= initial / factor
    left: np.ndarray  # bool: final >= initial · factor, or not finite


def perturbation_test(
    update: Update,
    params: Any,
    directions: Any,
    *,
    epsilon: float = 1e-4,
    learning_rate: float,
    steps: int,
    factor: float = 10.0,
    records: int = 50,
    labels: list[str] | None = None,
) -> Perturbation:
    """Kick a fixed point by ``ε v`` and run the rule: does it return?

    From ``θ* + ε v`` for every row ``v`` of ``directions`` (unit vectors, e.g.
    :func:`perturbation_directions`), runs ``steps`` rule steps ``θ ← θ - η g(θ)``
    and follows ``‖g‖``. Near a manifold of fixed points, ``‖g‖ ≈ ‖J δ‖``
    measures how far off the manifold the iterate is (sliding along it changes
    nothing): it shrinks by ``|1 - η λ|`` per step along an eigen-direction of
    ``J``. ``returned``: it fell by ``factor``; ``left``: it grew by ``factor``
    (or overflowed); neither: undecided within ``steps`` (a slow direction, or a
    kick along the manifold, where ``g`` stays ``O(ε²)``). An iterate whose
    ``‖g‖`` passes ``factor³`` times its start stops there (it has left; going
    on would only overflow).

    Needs ``η |λ|² < 2 Re λ`` for every stable eigenvalue, or the discrete steps
    themselves leave a point the continuous flow returns to.
    """
    learning_rate = _check_positive(learning_rate, "learning_rate")
    epsilon = _check_positive(epsilon, "epsilon")
    factor = _check_positive(factor, "factor")
    steps = _checks.check_int(steps, "steps", minimum=1)
    records = _checks.check_int(records, "records", minimum=1)
    flat, _ = ravel_pytree(params)
    directions = np.asarray(directions, np.float64)
    if directions.ndim != 2 or directions.shape[1] != flat.size:
        raise ValueError(f"directions: expected shape (k, {flat.size}), given {directions.shape}")
    records = min(records, steps)
    inner = -(-steps // records)
    core, args = _parts(update)
    starts = jnp.asarray(np.asarray(flat, np.float64)[None] + epsilon * directions, flat.dtype)
    ends, history = _perturb(core, records)(starts, params, args, learning_rate, factor**3, inner)
    history = np.asarray(history, np.float64)
    initial, final = history[:, 0], history[:, -1]
    distance = np.linalg.norm(np.asarray(ends, np.float64) - np.asarray(flat, np.float64)[None], axis=1) / epsilon
    with np.errstate(invalid="ignore"):
        left = ~np.isfinite(final) | (final >= factor * initial)
        returned = np.isfinite(final) & (final <= initial / factor)
    names = list(labels) if labels is not None else [f"direction {i}" for i in range(len(directions))]
    return Perturbation(names, initial, final, history, distance, returned, left)
