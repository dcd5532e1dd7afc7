"""B conventions (TinyDFA, Launay 2019, Xavier, Kaiming, Nøkland zero init), regenerate-from-key for
every rule, and B stored in bf16 while the model runs in float32."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax import models

SIZES = (6, 9, 5, 4)
MODEL = models.mlp("tanh")


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def data(sizes=SIZES, batch=5):
    kx, kt = jax.random.split(jax.random.key(7))
    return jax.random.normal(kx, (batch, sizes[0])), jax.random.normal(kt, (batch, sizes[-1]))


def test_tinydfa_uniform_range_and_scale():
    b = np.asarray(fa_jax.tinydfa_uniform(256)(jax.random.key(0), (10, 64), jnp.float32))
    assert b.min() >= -1 / 16 and b.max() < 1 / 16
    np.testing.assert_allclose(b.std(), (1 / math.sqrt(3)) / 16, rtol=0.05)  # U[-1,1) has std 1/sqrt(3)
    own = np.asarray(fa_jax.tinydfa_uniform()(jax.random.key(0), (10, 64), jnp.float32))
    np.testing.assert_allclose(own * 8, b * 16, rtol=1e-6)  # widest=None: divide by the matrix's own width


def test_launay2019_std_per_layer():
    init = fa_jax.launay2019(widest=400)
    for c, d in [(10, 400), (10, 100), (20, 25)]:
        b = np.asarray(init(jax.random.key(d), (c, d), jnp.float32))
        want = math.sqrt(400 / d) / math.sqrt(d * c)  # N(0,1)/sqrt(dc) rescaled by sqrt(d_max/d)
        np.testing.assert_allclose(b.std(), want, rtol=0.1)
        assert abs(b.mean()) < 4 * want / math.sqrt(c * d)


@pytest.mark.parametrize(
    "name, bound",
    [("xavier", lambda i, o: math.sqrt(6 / (i + o))), ("kaiming", lambda i, o: math.sqrt(6 / i))],
    ids=["xavier", "kaiming"],
)
def test_xavier_and_kaiming_bounds(name, bound):
    init = getattr(fa_jax, name)()
    for shape, (fan_in, fan_out) in [((50, 30), (50, 30)), ((3, 3, 8, 16), (72, 144))]:
        b = np.asarray(init(jax.random.key(1), shape, jnp.float32))
        limit = bound(fan_in, fan_out)
        assert np.abs(b).max() <= limit and np.abs(b).max() > 0.9 * limit
        np.testing.assert_allclose(b.std(), limit / math.sqrt(3), rtol=0.1)


def test_bad_widths_raise():
    with pytest.raises(ValueError, match="widest"):
        fa_jax.launay2019(0)
    with pytest.raises(ValueError, match="widest"):
        fa_jax.tinydfa_uniform(2.5)


def test_widest_tap():
    x, _ = data()
    params = models.init_mlp(SIZES, key=jax.random.key(0))
    assert fa_jax.widest_tap(MODEL, params, x) == 9


def test_nokland_zero_hidden_lets_dfa_train_where_bp_cannot():
    sizes = (6, 8, 8, 8, 4)
    x, y = data(sizes)
    params = fa_jax.nokland_zero_hidden(models.init_mlp(sizes, key=jax.random.key(0)), model=MODEL, inputs=x)
    assert all(float(jnp.abs(layer["kernel"]).max()) == 0.0 for layer in params[:-1])
    assert float(jnp.abs(params[-1]["kernel"]).max()) > 0.0
    assert all(float(jnp.abs(layer["bias"]).max()) == 0.0 for layer in params)  # biases as they were (zeros)
    _, bp = jax.jit(fa_jax.value_and_grad(MODEL, mse, "bp"))(params, None, x, y)
    feedback = fa_jax.init_feedback("dfa", params, key=jax.random.key(1), model=MODEL, inputs=x)
    _, dfa = jax.jit(fa_jax.value_and_grad(MODEL, mse, "dfa"))(params, feedback, x, y)
    # BP: δ_1 = δ_2 W_2ᵀ ⊙ f' = 0 since W_2 = 0. DFA: δ_1 = e B_1 ⊙ f' ≠ 0.
    assert float(jnp.abs(bp[0]["kernel"]).max()) == 0.0
    assert float(jnp.abs(dfa[0]["kernel"]).max()) > 1e-4
    with pytest.raises(ValueError, match="two weights"):
        fa_jax.nokland_zero_hidden(params[-1:], model=MODEL, inputs=jnp.ones((2, 8)))


def _feedback_and_grads(rule, params, x, y, key, dtype=None):
    feedback = fa_jax.init_feedback(rule, params, key=key, model=MODEL, inputs=x, dtype=dtype)
    _, grads = jax.jit(fa_jax.value_and_grad(MODEL, mse, rule))(params, feedback, x, y, step=2)
    return feedback, grads


REGENERABLE = [
    (fa_jax.FA(), fa_jax.FA(regenerate=True)),
    (fa_jax.FRSF(), fa_jax.FRSF(regenerate=True)),
    (fa_jax.DFA(), fa_jax.DFA(regenerate=True)),
    (fa_jax.DFA(shared_prefix=True), fa_jax.DFA(shared_prefix=True, regenerate=True)),
    (
        fa_jax.DRTP(shared_prefix=True, init=fa_jax.launay2019(9)),
        fa_jax.DRTP(shared_prefix=True, regenerate=True, init=fa_jax.launay2019(9)),
    ),
]


@pytest.mark.parametrize(
    "stored, regenerated", REGENERABLE, ids=["fa", "frsf", "dfa", "dfa-shared", "drtp-shared-launay"]
)
def test_regenerate_from_key_equals_stored(stored, regenerated):
    """Every rule with a random matrix can keep only keys and redraw B in the step: same numbers."""
    params = models.init_mlp(SIZES, key=jax.random.key(0))
    x, y = data()
    if stored.name == "drtp":
        y = jax.nn.one_hot(jnp.arange(5) % 4, 4)
    fb_stored, g_stored = _feedback_and_grads(stored, params, x, y, jax.random.key(3))
    fb_regen, g_regen = _feedback_and_grads(regenerated, params, x, y, jax.random.key(3))
    keys = [leaf for leaf in jax.tree.leaves(fb_regen) if fa_jax._checks.is_key(leaf)]
    assert keys and not any(fa_jax._checks.is_key(leaf) for leaf in jax.tree.leaves(fb_stored))
    for a, b in zip(jax.tree.leaves(g_stored), jax.tree.leaves(g_regen), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_rules_without_a_random_matrix_need_nothing_stored():
    """uSF keeps its scale s, brSF only keys; Kolen–Pollack's B is learned and must be stored."""
    params = models.init_mlp(SIZES, key=jax.random.key(0))
    x, _ = data()
    usf = fa_jax.init_feedback("usf", params, key=jax.random.key(1), model=MODEL, inputs=x)
    assert [leaf.shape for leaf in usf.weights.values()] == [(), (), ()]
    np.testing.assert_allclose(float(usf.weights["1/kernel"]), np.sqrt(2 / (9 + 5)), rtol=1e-6)  # a (9, 5) kernel
    brsf = fa_jax.init_feedback("brsf", params, key=jax.random.key(1), model=MODEL, inputs=x)
    assert all(fa_jax._checks.is_key(leaf) for leaf in jax.tree.leaves(brsf))
    kp = fa_jax.init_feedback("kp", params, key=jax.random.key(1), model=MODEL, inputs=x)
    assert not any(fa_jax._checks.is_key(leaf) for leaf in jax.tree.leaves(kp))


BF16_RULES = [fa_jax.FA(), fa_jax.FRSF(), fa_jax.KolenPollack(), fa_jax.DFA(shared_prefix=True), fa_jax.DRTP()]


@pytest.mark.parametrize(
    "rule", BF16_RULES, ids=lambda r: f"{r.name}{'-shared' if getattr(r, 'shared_prefix', False) else ''}"
)
def test_bf16_feedback_with_float32_model(rule):
    """B stored in bf16 (half the memory), params, activations and grads in float32.

    The gradients equal a float32 run whose B is the bf16 B upcast: the only change is
    B's rounding, and nothing is computed in bf16.
    """
    params = models.init_mlp(SIZES, key=jax.random.key(0))
    x, y = data()
    if rule.name == "drtp":
        y = jax.nn.one_hot(jnp.arange(5) % 4, 4)
    fb16, g16 = _feedback_and_grads(rule, params, x, y, jax.random.key(3), dtype=jnp.bfloat16)
    matrices = [leaf for leaf in jax.tree.leaves(fb16)]
    assert matrices and all(m.dtype == jnp.bfloat16 for m in matrices)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    fb32 = jax.tree.map(lambda m: m.astype(jnp.float32), fb16)
    _, g32 = jax.jit(fa_jax.value_and_grad(MODEL, mse, rule))(params, fb32, x, y)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if rule.name == "kp":  # the learned B stays bf16 through its update
        updates = jax.tree.map(lambda g: -0.1 * g, g16)
        assert all(
            m.dtype == jnp.bfloat16 for m in jax.tree.leaves(fa_jax.update_feedback(rule, fb16, updates, params))
        )


@pytest.mark.parametrize("fan_in", [1, 4, 5, 8, 13])
@pytest.mark.parametrize("use_jit", [False, True])
def test_tiled_input_gradient_is_g_times_b_transposed(fan_in, use_jit):
    """The tile loop's dx equals NumPy ``g @ B.T`` for one tile, whole tiles and a ragged last tile."""
    init, shape = fa_jax.Tiled(rows=4), (fan_in, 6)
    key, g = jax.random.key(7), jax.random.normal(jax.random.key(8), (2, 3, 6))
    dense_input_gradient = (
        jax.jit(init.dense_input_gradient, static_argnums=2) if use_jit else init.dense_input_gradient
    )
    dx = dense_input_gradient(key, g, shape)
    b = np.asarray(init(key, shape, jnp.float32))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(g) @ b.T, rtol=1e-5, atol=1e-6)
    assert dx.shape == (2, 3, fan_in)


@pytest.mark.parametrize("distribution", ["truncated_normal", "uniform"])
def test_tiled_regeneration_equals_stored_and_keeps_scale(distribution):
    """fa_jax.Tiled: B drawn in row tiles; regenerated dx = g Bᵀ tile by tile equals the stored B's."""
    init = fa_jax.Tiled(rows=3, distribution=distribution)  # 9 and 5 rows: ragged last tiles
    b = np.asarray(fa_jax.Tiled(rows=64, distribution=distribution)(jax.random.key(0), (512, 300), jnp.float32))
    np.testing.assert_allclose(b.std(), 1 / math.sqrt(512), rtol=0.03)  # LeCun: std 1/sqrt(fan_in) for the whole B
    params = models.init_mlp(SIZES, key=jax.random.key(0))
    x, y = data()
    x3 = jnp.stack([x, -x])  # (2, batch, features): the tiled dx keeps leading dims
    cases = [(x3, jnp.stack([y, y]))] if distribution == "uniform" else [(x, y)]
    for inputs, targets in cases:
        fb_stored, g_stored = _feedback_and_grads(fa_jax.FA(init=init), params, inputs, targets, jax.random.key(3))
        _, g_regen = _feedback_and_grads(
            fa_jax.FA(init=init, regenerate=True), params, inputs, targets, jax.random.key(3)
        )
        for a, c in zip(jax.tree.leaves(g_stored), jax.tree.leaves(g_regen), strict=True):
            np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    assert fb_stored.weights["1/kernel"].shape == (9, 5)
    with pytest.raises(ValueError, match=r"Tiled\.rows"):
        fa_jax.Tiled(rows=0)
    with pytest.raises(ValueError, match="dense kernels"):
        init(jax.random.key(0), (3, 3, 4, 5))
