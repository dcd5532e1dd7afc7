"""fa_jax.linen: adapted Linen models against NumPy closed forms, backprop, and the traps of interception."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax as fj
import fa_jax.linen as flinen
from closed_forms import CLOSED_FORMS
from fa_jax._feedback import by_path

SIZES = (5, 7, 6, 3)
# Test programs are small: compiling them is what costs, and an unoptimised XLA backend halves that.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for size in SIZES[1:-1]:
            x = jnp.tanh(nn.Dense(size)(x))
        return nn.Dense(SIZES[-1])(x)


def mse(y, t):
    return 0.5 * jnp.sum((y - t) ** 2) / y.shape[0]


def data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, SIZES[0])).astype(np.float32),
        rng.standard_normal((n, SIZES[-1])).astype(np.float32),
    )


def layers_of(tree):
    return [tree[f"Dense_{i}"] for i in range(len(SIZES) - 1)]


def closed_form(rule, params, feedback, x, t, step=None):
    rule = fj.get_rule(rule)
    weights = {p.replace("Dense_", "", 1): leaf for p, leaf in feedback.weights.items()}
    feedback = dataclasses.replace(feedback, weights=weights)
    return CLOSED_FORMS[rule.name](rule, layers_of(params), feedback, x, t, "tanh", step)


def assert_layers_close(got, want, rtol=2e-5, atol=1e-6):
    for g, w in zip(layers_of(got), want, strict=True):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(g[name], w[name], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def mlp_case():
    x, t = data()
    variables = MLP().init(jax.random.key(0), x)
    return variables, x, t


# Every registered rule through adapted.value_and_grad, eager and jitted: tests/test_conformance.py.
# Here the differentiable adapted.apply, with a step (brSF) and targets (DRTP) passed at call time.
@pytest.mark.parametrize("rule, jit", [("fa", True), ("brsf", True), ("drtp", True), ("dfa", False)])
def test_apply_matches_closed_form(rule, jit, mlp_case):
    variables, x, t = mlp_case
    adapted = flinen.adapt(MLP(), rule)
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(1))
    step = 4 if adapted.rule.needs_step else None

    def loss(params):
        return mse(adapted.apply({"params": params}, feedback, x, step=step, targets=t), t)

    grad = jax.value_and_grad(loss)
    value, grads = (globals()["jit"](grad) if jit else grad)(variables["params"])
    want_loss, want = closed_form(rule, variables["params"], feedback, x, t, step)
    np.testing.assert_allclose(value, want_loss, rtol=1e-5)
    assert_layers_close(grads, want)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_pure_value_and_grad_matches_closed_form_and_vmaps(rule, mlp_case):
    variables, x, t = mlp_case
    adapted = flinen.adapt(MLP(), rule)
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(1))
    grad_fn = jit(adapted.value_and_grad(mse))
    value, grads = grad_fn(variables["params"], feedback, x, t)
    want_loss, want = closed_form(rule, variables["params"], feedback, x, t)
    np.testing.assert_allclose(value, want_loss, rtol=1e-5)
    assert_layers_close(grads, want)
    if rule != "dfa":
        return
    # A seed sweep: feedback drawn per key, vmapped.
    keys = jax.random.split(jax.random.key(5), 2)
    many = jax.vmap(lambda k: adapted.init_feedback(variables, x, key=k))(keys)
    _, swept = jax.vmap(grad_fn, in_axes=(None, 0, None, None))(variables["params"], many, x, t)
    for i in range(2):
        one = jax.tree.map(lambda leaf, i=i: leaf[i], many)
        _, want = grad_fn(variables["params"], one, x, t)
        for a, b in zip(jax.tree.leaves(swept), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7)


class Boxed(nn.Module):
    """Logically partitioned params (as Flax's examples box them), dropout and batch statistics."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        h = jnp.tanh(nn.Dense(8, kernel_init=init)(x))
        h = nn.Dropout(0.3, deterministic=not train)(h)
        h = nn.BatchNorm(use_running_average=not train)(h)
        h = jnp.tanh(
            nn.Dense(6, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")))(h)
        )
        return nn.Dense(3)(h)


@pytest.fixture(scope="module")
def boxed_case():
    x, _ = data(6)
    t = np.random.default_rng(3).standard_normal((6, 3)).astype(np.float32)
    variables = Boxed().init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    assert isinstance(variables["params"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
    return variables, x, t


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_boxed_params_with_dropout_and_batch_stats(rule, boxed_case):
    variables, x, t = boxed_case
    adapted = flinen.adapt(Boxed(), rule)
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(2), mutable=["batch_stats"])  # no rngs needed
    rngs = {"dropout": jax.random.key(9)}

    @jit
    def grads(params, feedback):
        def loss(p):
            y, updates = adapted.apply({**variables, "params": p}, feedback, x, rngs=rngs, mutable=["batch_stats"])
            return mse(y, t), updates

        return jax.grad(loss, has_aux=True)(params)

    def bp_loss(p):
        y, updates = Boxed().apply({**variables, "params": p}, x, rngs=rngs, mutable=["batch_stats"])
        return mse(y, t), updates

    got, updates = grads(variables["params"], feedback)
    bp, bp_updates = jit(jax.grad(bp_loss, has_aux=True))(variables["params"])
    assert isinstance(got["Dense_0"]["kernel"], nn.LogicallyPartitioned)
    # same dropout mask, same statistics
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(bp_updates), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    got, bp = by_path(got), by_path(bp)
    assert np.abs(got["Dense_0/kernel"] - bp["Dense_0/kernel"]).max() > 1e-4
    np.testing.assert_allclose(got["Dense_2/kernel"], bp["Dense_2/kernel"], rtol=1e-5, atol=1e-7)
    if rule == "fa":  # B = W is backprop, to the last bit
        params = by_path(variables["params"])
        with_w = dataclasses.replace(feedback, weights={p: params[p] for p in feedback.weights})
        exact = by_path(grads(variables["params"], with_w)[0])
        for path in bp:
            np.testing.assert_array_equal(exact[path], bp[path], err_msg=path)
    # Eval mode: static flags pass through, and the output is model.apply's.
    y = adapted.apply(variables, feedback, x, train=False)
    np.testing.assert_allclose(y, Boxed().apply(variables, x, train=False), rtol=1e-6)


class RematNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6)(x))
        h = nn.remat(nn.Dense)(6)(h)
        return nn.Dense(3)(jnp.tanh(h))


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_remat_block(rule):
    x, _ = data(4)
    t = np.ones((4, 3), np.float32)
    variables = RematNet().init(jax.random.key(0), x)
    adapted = flinen.adapt(RematNet(), rule)
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(1))
    got = by_path(jax.grad(lambda p: mse(adapted.apply({"params": p}, feedback, x), t))(variables["params"]))
    bp = by_path(jax.grad(lambda p: mse(RematNet().apply({"params": p}, x), t))(variables["params"]))
    remat_kernel = next(p for p in bp if "kernel" in p and p not in ("Dense_0/kernel", "Dense_1/kernel"))
    if rule == "dfa":
        assert [tap.name for tap in feedback.layout.taps] == [f"{remat_kernel}:in", "Dense_1/kernel:in"]
    else:
        assert set(feedback.weights) == {"Dense_0/kernel", remat_kernel, "Dense_1/kernel"}
    assert np.abs(got["Dense_0/kernel"] - bp["Dense_0/kernel"]).max() > 1e-4
    np.testing.assert_allclose(got["Dense_1/kernel"], bp["Dense_1/kernel"], rtol=1e-5, atol=1e-7)


def test_kolen_pollack_feedback_learns_with_the_rules_decay(mlp_case):
    variables, x, t = mlp_case
    decay = 0.2
    adapted = flinen.adapt(MLP(), fj.KolenPollack(decay=decay))
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(1))
    params = variables["params"]
    _, grads = adapted.value_and_grad(mse)(params, feedback, x, t)
    updates = jax.tree.map(lambda g: -0.1 * g, grads)
    new = fj.update_feedback(adapted.rule, feedback, updates, params)
    w0, w1 = by_path(params), by_path(jax.tree.map(jnp.add, params, updates))
    for path, b in feedback.weights.items():
        np.testing.assert_allclose(new.weights[path] - w1[path], (1 - decay) * (b - w0[path]), rtol=1e-4, atol=1e-6)
    assert fj.update_feedback("fa", feedback, updates, params) is feedback  # fixed feedback is returned as it is


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(2 * x.shape[-1])(x)))


class Blocks(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        for _ in range(2):
            x = Block()(x=x)
        return nn.Dense(3)(x)


def test_module_taps_and_the_jit_trap():
    x, t = data(4)
    model = Blocks()
    variables = model.init(jax.random.key(0), x)
    adapted = flinen.adapt(model, "dfa", taps="macro", blocks=Block)
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(1))
    assert [tap.name for tap in feedback.layout.taps] == ["Block_0", "Block_1"]
    got = by_path(jit(jax.grad(lambda p: mse(adapted.apply({"params": p}, feedback, x), t)))(variables["params"]))
    bp = by_path(jit(jax.grad(lambda p: mse(model.apply({"params": p}, x), t)))(variables["params"]))
    np.testing.assert_allclose(got["Dense_1/kernel"], bp["Dense_1/kernel"], rtol=1e-5, atol=1e-7)
    assert np.abs(got["Block_0/Dense_0/kernel"] - bp["Block_0/Dense_0/kernel"]).max() > 1e-4
    paths = flinen.adapt(model, "dfa", taps=["Block_1"]).init_feedback(variables, x, key=jax.random.key(1))
    assert [tap.name for tap in paths.layout.taps] == ["Block_1"]
    # A model.apply jitted and traced outside the interceptor never marks its taps: refused, not cut elsewhere.
    jitted = jax.jit(model.apply)
    jitted(variables, x)
    trapped = flinen.adapt(jitted, "dfa", taps="macro", blocks=Block)
    with pytest.raises(ValueError, match=r"none appeared in the traced program.*jitted"):
        trapped.apply(variables, feedback, x)
    # FA reads the jitted program as it is: nothing is intercepted, so nothing is lost.
    fa = flinen.adapt(jitted, "fa")
    fa_feedback = fa.init_feedback(variables, x, key=jax.random.key(1))
    direct = flinen.adapt(model, "fa")
    a = jit(jax.grad(lambda p: mse(fa.apply({"params": p}, fa_feedback, x), t)))(variables["params"])
    b = jit(jax.grad(lambda p: mse(direct.apply({"params": p}, fa_feedback, x), t)))(variables["params"])
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6)


def test_errors(mlp_case):
    variables, x, t = mlp_case
    adapted = flinen.adapt(MLP(), "fa")
    with pytest.raises(TypeError, match="variables"):
        adapted.init_feedback(variables["params"], x, key=jax.random.key(0))
    with pytest.raises(TypeError, match="feedback"):
        adapted.apply(variables, {"B": 1.0}, x)
    with pytest.raises(ValueError, match="taps"):
        flinen.adapt(MLP(), "dfa", taps="nowhere")
    with pytest.raises(ValueError, match="blocks"):
        flinen.adapt(MLP(), "dfa", taps="micro")
    with pytest.raises(ValueError, match=r"\[.Nope_0.\] name no module"):
        flinen.adapt(MLP(), "dfa", taps=["Nope_0"]).init_feedback(variables, x, key=jax.random.key(0))
    drtp = flinen.adapt(MLP(), "drtp")
    feedback = drtp.init_feedback(variables, x, key=jax.random.key(0))
    with pytest.raises(ValueError, match="targets"):
        jax.grad(lambda p: mse(drtp.apply({"params": p}, feedback, x), t))(variables["params"])
    brsf = flinen.adapt(MLP(), "brsf")
    feedback = brsf.init_feedback(variables, x, key=jax.random.key(0))
    with pytest.raises(ValueError, match="step"):
        jax.grad(lambda p: mse(brsf.apply({"params": p}, feedback, x), t))(variables["params"])
