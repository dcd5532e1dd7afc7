"""fa_jax.nnx on an nnx.Linear MLP: every rule against its NumPy closed form, stateful and pure, eager and jit.

The closed forms are tests/closed_forms.py (from tests/reference.py), fed the feedback the
adapter drew (renamed from ``layers/<i>/kernel`` to the core MLP's ``<i>/kernel``).
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fa_jax as fj
import fa_jax.nnx as fnnx
from closed_forms import CLOSED_FORMS

SIZES = (5, 7, 6, 3)
# Test programs are small: compiling them is what costs, and an unoptimised XLA backend halves that.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)


class MLP(nnx.Module):
    def __init__(self, sizes=SIZES, *, rngs, dtype=jnp.float32):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs, param_dtype=dtype) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x):
        for layer in list(self.layers)[:-1]:
            x = jnp.tanh(layer(x))
        return list(self.layers)[-1](x)


def mse(y, t):
    return 0.5 * jnp.sum((y - t) ** 2) / y.shape[0]


def data(n=8, seed=0, dtype=jnp.float32):
    kx, kt = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, SIZES[0]), dtype), jax.random.normal(kt, (n, SIZES[-1]), dtype)


def layers_of(tree):
    """``[{"kernel", "bias"}, ...]`` of an MLP's params / grads state."""
    pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    return [pure["layers"][i] for i in range(len(SIZES) - 1)]


def core_feedback(feedback):
    """The adapter's feedback keyed like the core MLP (``<i>/kernel``), for the closed forms."""
    weights = {path.removeprefix("layers/"): leaf for path, leaf in feedback.weights.items()}
    return dataclasses.replace(feedback, weights=weights)


def closed_form(rule, model, x, t, step=None):
    rule = fj.get_rule(rule)
    params = layers_of(nnx.state(model, nnx.Param))
    feedback = core_feedback(model.fa_feedback.get_value()) if hasattr(model, "fa_feedback") else None
    return CLOSED_FORMS[rule.name](rule, params, feedback, x, t, "tanh", step)


def assert_layers_close(got, want, rtol=2e-5, atol=1e-6):
    for g, w in zip(layers_of(got), want, strict=True):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(g[name], w[name], rtol=rtol, atol=atol)


def converted(rule, seed=0, **kw):
    x, _ = data()
    return fnnx.convert(MLP(rngs=nnx.Rngs(seed)), rule, key=jax.random.key(seed + 100), inputs=x, **kw)


def stateful_grads(model, x, t, *, jit, step=None):
    def loss_fn(m):
        return mse(fnnx.call(m, x, step=step, targets=t), t)

    grad = nnx.value_and_grad(loss_fn)
    return (nnx.jit(grad) if jit else grad)(model)


# Every registered rule against its closed form, stateful and pure, eager and jitted:
# tests/test_conformance.py (entry points "nnx" and "nnx_pure").


def test_fa_with_w_as_b_is_bp_exactly_and_random_b_is_not():
    x, t = data()
    model = converted("fa")
    plain = MLP(rngs=nnx.Rngs(0))
    _, bp = nnx.value_and_grad(lambda m: mse(m(x), t))(plain)
    _, random_b = stateful_grads(model, x, t, jit=False)
    feedback = model.fa_feedback.get_value()
    params = fj._feedback.by_path(nnx.state(model, nnx.Param))
    model.fa_feedback.set_value(dataclasses.replace(feedback, weights={p: params[p] for p in feedback.weights}))
    _, with_w = stateful_grads(model, x, t, jit=False)
    for a, b in zip(jax.tree.leaves(with_w), jax.tree.leaves(bp), strict=True):
        np.testing.assert_array_equal(a, b)
    first_bp, first_fa = layers_of(bp)[0]["kernel"], layers_of(random_b)[0]["kernel"]
    assert np.abs(np.asarray(first_bp) - np.asarray(first_fa)).max() > 1e-3
    np.testing.assert_array_equal(layers_of(bp)[-1]["kernel"], layers_of(random_b)[-1]["kernel"])


def test_dfa_taps_and_feedback_outside_params():
    model = converted("dfa")
    feedback = model.fa_feedback.get_value()
    assert [t.name for t in feedback.layout.taps] == ["layers/1/kernel:in", "layers/2/kernel:in"]
    assert feedback.taps.shape == (SIZES[-1], SIZES[1] + SIZES[2])
    assert set(fnnx.feedback_of(model).keys()) == {"fa_feedback"}
    assert "fa_feedback" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_kolen_pollack_shrinks_b_minus_w_by_its_decay_per_step():
    x, t = data()
    decay = 0.25
    model = converted(fj.KolenPollack(decay=decay))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    def gap(m):
        params = fj._feedback.by_path(nnx.state(m, nnx.Param))
        return {p: np.asarray(b) - np.asarray(params[p]) for p, b in m.fa_feedback.get_value().weights.items()}

    @nnx.jit
    def step(m, opt):
        _, grads = nnx.value_and_grad(lambda m: mse(m(x), t))(m)
        fnnx.optimizer_update(opt, m, grads)

    before = gap(model)
    step(model, optimizer)
    after = gap(model)
    for path in before:
        np.testing.assert_allclose(after[path], (1 - decay) * before[path], rtol=1e-4, atol=1e-6)

    # The pure form: update_feedback on the split state, the same factor.
    graphdef, params, state = fnnx.split(model)
    grads = fnnx.value_and_grad(graphdef, mse)(params, state, x, t)[1]
    tx = optax.adamw(1e-2, weight_decay=0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_state = fnnx.update_feedback(model.fa_rule, state, updates, params)
    new_params = optax.apply_updates(params, updates)
    old_b = state["fa_feedback"].get_value().weights
    new_b = new_state["fa_feedback"].get_value().weights
    w0, w1 = fj._feedback.by_path(params), fj._feedback.by_path(new_params)
    for path in old_b:
        np.testing.assert_allclose(new_b[path] - w1[path], (1 - decay) * (old_b[path] - w0[path]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_fixed_feedback_unchanged_by_adamw_with_weight_decay(rule):
    x, t = data()
    model = converted(rule)
    before = jax.tree.map(np.asarray, model.fa_feedback.get_value())
    params_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        _, grads = nnx.value_and_grad(lambda m: mse(m(x), t))(m)
        fnnx.optimizer_update(opt, m, grads)

    for _ in range(20):
        step(model, optimizer)
    after = model.fa_feedback.get_value()
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert all(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(moved, jax.tree.leaves(params_before), strict=True))


def test_brsf_without_step_raises_and_evaluates():
    x, t = data()
    model = converted("brsf")
    assert model(x).shape == (8, SIZES[-1])  # a forward needs no step
    with pytest.raises(ValueError, match="step"):
        nnx.grad(lambda m: mse(m(x), t))(model)
    graphdef, params, state = fnnx.split(model)
    with pytest.raises(ValueError, match="step"):
        fnnx.value_and_grad(graphdef, mse)(params, state, x, t)


def test_drtp_without_targets_raises():
    x, t = data()
    model = converted("drtp")
    with pytest.raises(ValueError, match="targets"):
        nnx.grad(lambda m: mse(m(x), t))(model)


def test_jacrev_of_the_pure_dfa_update_matches_finite_differences():
    with jax.enable_x64(True):
        sizes = (3, 4, 3, 2)
        x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
        t = jax.nn.one_hot(jnp.arange(5) % 2, 2, dtype=jnp.float64)
        model = fnnx.convert(MLP(sizes, rngs=nnx.Rngs(0), dtype=jnp.float64), "dfa", key=jax.random.key(3), inputs=x)
        graphdef, params, state = fnnx.split(model)
        grad_fn = fnnx.value_and_grad(graphdef, mse)
        flat, unravel = jax.flatten_util.ravel_pytree(params)

        def update(vector):
            return jax.flatten_util.ravel_pytree(grad_fn(unravel(vector), state, x, t)[1])[0]

        jacobian = jit(jax.jacrev(update))(flat)
        update = jit(update)
        eps = 1e-6
        numeric = np.stack(
            [(update(flat.at[i].add(eps)) - update(flat.at[i].add(-eps))) / (2 * eps) for i in range(flat.size)], axis=1
        )
        np.testing.assert_allclose(jacobian, numeric, rtol=1e-5, atol=1e-7)
        assert not np.allclose(jacobian, jacobian.T, atol=1e-6)  # not a gradient field


def test_pure_path_vmaps_over_models():
    x, t = data()
    models = [converted("dfa", seed=s) for s in (0, 1)]
    splits = [fnnx.split(m) for m in models]
    graphdef = splits[0][0]
    grad_fn = fnnx.value_and_grad(graphdef, mse)
    params = jax.tree.map(lambda *a: jnp.stack(a), *[s[1] for s in splits])
    state = jax.tree.map(lambda *a: jnp.stack(a), *[s[2] for s in splits])
    losses, grads = jit(jax.vmap(lambda p, s: grad_fn(p, s, x, t)))(params, state)
    for i, (_, p, s) in enumerate(splits):
        loss, want = grad_fn(p, s, x, t)
        np.testing.assert_allclose(losses[i], loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7)


class Stateful(nnx.Module):
    """BatchNorm statistics, dropout with its own rng stream, a call-time flag and a call-time Rngs."""

    def __init__(self, rngs):
        self.a = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.b = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x, *, train: bool = True, rngs: nnx.Rngs | None = None, mode: str = "tanh"):
        h = getattr(jnp, mode)(self.a(x))
        h = self.bn(h, use_running_average=not train)
        return self.b(self.drop(h, deterministic=not train, rngs=rngs))


@pytest.mark.parametrize("rule", ["dfa"])
def test_state_updates_and_call_arguments_pass_through(rule):
    x, t = data()
    model = fnnx.convert(Stateful(nnx.Rngs(0)), rule, key=jax.random.key(1), inputs=x, train=True)
    reference = Stateful(nnx.Rngs(0))
    call_rngs, reference_rngs = nnx.Rngs(dropout=7), nnx.Rngs(dropout=7)

    @nnx.jit
    def loss_of(m, rngs):
        return nnx.value_and_grad(lambda m, r: mse(m(x, train=True, rngs=r, mode="tanh"), t))(m, rngs)

    loss, _ = loss_of(model, call_rngs)
    want = mse(nnx.jit(lambda m, r: m(x, train=True, rngs=r))(reference, reference_rngs), t)
    np.testing.assert_allclose(loss, want, rtol=1e-6)  # same dropout mask, same statistics
    np.testing.assert_allclose(model.bn.mean[...], reference.bn.mean[...], rtol=1e-6)
    assert int(call_rngs.dropout.count[...]) == int(reference_rngs.dropout.count[...]) == 1
    # The model's own stream advances when no rngs are passed; eval mode leaves statistics alone.
    count = int(model.drop.rngs.count[...])
    call = nnx.jit(lambda m, train: m(x, train=train), static_argnums=1)
    call(model, True)
    assert int(model.drop.rngs.count[...]) == count + 1
    mean = np.asarray(model.bn.mean[...])
    call(model, False)
    np.testing.assert_array_equal(model.bn.mean[...], mean)


def test_stateful_pure_and_core_agree():
    x, t = data()
    model = converted("dfa")
    _, stateful = stateful_grads(model, x, t, jit=True)
    graphdef, params, state = fnnx.split(model)
    _, pure = fnnx.value_and_grad(graphdef, mse)(params, state, x, t)
    plain = MLP(rngs=nnx.Rngs(0))
    plain_graphdef, plain_params = nnx.split(plain)
    core_fn = fj.value_and_grad(lambda p, x: nnx.merge(plain_graphdef, p)(x), mse, "dfa")
    _, core = core_fn(plain_params, model.fa_feedback.get_value(), x, t)
    for a, b, c in zip(jax.tree.leaves(stateful), jax.tree.leaves(pure), jax.tree.leaves(core), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)


def test_bp_converts_like_every_rule_and_gives_bp_gradients():
    x, t = data()
    plain = MLP(rngs=nnx.Rngs(0))
    model = fnnx.convert(MLP(rngs=nnx.Rngs(0)), "bp", inputs=x)
    assert fnnx.rule_of(model).name == "bp" and model.fa_feedback.get_value().weights == {}
    assert fnnx.rule_of(plain).name == "bp"  # an unconverted model trains with BP
    got = nnx.grad(lambda m: mse(m(x), t))(model)
    want = nnx.grad(lambda m: mse(m(x), t))(plain)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_errors():
    x, _ = data()
    with pytest.raises(ValueError, match="inputs"):
        fnnx.convert(MLP(rngs=nnx.Rngs(0)), "fa", key=jax.random.key(0))
    with pytest.raises(TypeError, match="model"):
        fnnx.convert(lambda x: x, "fa", key=jax.random.key(0), inputs=x)
    model = converted("fa")
    with pytest.raises(ValueError, match="already converted"):
        fnnx.convert(model, "fa", key=jax.random.key(0), inputs=x)
    with pytest.raises(ValueError, match="taps"):
        fnnx.convert(MLP(rngs=nnx.Rngs(0)), "dfa", key=jax.random.key(0), inputs=x, taps="everywhere")
    with pytest.raises(ValueError, match="blocks"):
        fnnx.convert(MLP(rngs=nnx.Rngs(0)), "dfa", key=jax.random.key(0), inputs=x, taps="macro")
    with pytest.raises(ValueError, match=r"\['nowhere'\] name no module"):
        fnnx.convert(MLP(rngs=nnx.Rngs(0)), "dfa", key=jax.random.key(0), inputs=x, taps=["nowhere"])
    with pytest.raises(ValueError, match="taps='marked'"):
        fnnx.convert(MLP(rngs=nnx.Rngs(0)), fj.DFA(taps="marked"), key=jax.random.key(0), inputs=x, taps="layer")
    with pytest.raises(TypeError, match="key"):
        fnnx.convert(MLP(rngs=nnx.Rngs(0)), "fa", key=0, inputs=x)
    fresh = MLP(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        fnnx.convert(fresh, "dfa", key=jax.random.key(0), inputs=x, taps=["layers/0"], blocks=None, exact=["nope"])
    assert type(fresh) is MLP and not hasattr(fresh.layers[0], "fa_tap")  # a failed convert leaves the model alone


def test_exact_weights_keep_their_transpose():
    x, t = data()
    model = converted("fa", exact=["layers/2/kernel"])
    feedback = model.fa_feedback.get_value()
    assert set(feedback.weights) == {"layers/0/kernel", "layers/1/kernel"} and feedback.exact == ("layers/2/kernel",)
    _, grads = stateful_grads(model, x, t, jit=True)
    params = layers_of(nnx.state(model, nnx.Param))
    chain = {
        "0/kernel": feedback.weights["layers/0/kernel"],
        "1/kernel": feedback.weights["layers/1/kernel"],
        "2/kernel": params[2]["kernel"],
    }  # the exact layer: its own W in the backward
    want = CLOSED_FORMS["fa"](fj.FA(), params, dataclasses.replace(feedback, weights=chain), x, t, "tanh", None)[1]
    assert_layers_close(grads, want)
