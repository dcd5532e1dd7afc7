"""fa_jax.nnx: converted NNX models against the core functional path and NumPy closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import fa_jax
import fa_jax.nnx as fnnx
from fa_jax.models import mlp

SIZES = (5, 7, 6, 3)


class MLP(nnx.Module):
    def __init__(self, sizes, *, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def mse(y, t):
    return 0.5 * jnp.sum((y - t) ** 2) / y.shape[0]


def batch(seed=1, n=8):
    kx, kt = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, SIZES[0])), jax.random.normal(kt, (n, SIZES[-1]))


def build(rule, seed=0, x=None):
    model = MLP(SIZES, rngs=nnx.Rngs(seed))
    return fnnx.convert(model, rule, key=jax.random.key(100 + seed), inputs=x)


def core_params(model):
    return [{"kernel": layer.kernel[...], "bias": layer.bias[...]} for layer in model.layers]


def dfa_blocks(model):
    """The per-tap B_l (c, d_l) held by the converted root."""
    projection = np.asarray(model.fa_dfa_feedback[...])
    offsets = np.cumsum([tap.size for tap in model.fa_taps])[:-1]
    return np.split(projection, offsets, axis=1)


def core_feedback(rule, model):
    if rule == "fa":
        return fa_jax.FAFeedback([{"kernel": layer.fa_feedback[...], "bias": None} for layer in model.layers])
    if rule == "dfa":
        taps = tuple(fa_jax.TapSpec(f"layer_{i}", tap.shape) for i, tap in enumerate(model.fa_taps))
        return fa_jax.DFAFeedback(model.fa_dfa_feedback[...], taps, (SIZES[-1],))
    return None


def numpy_feedback(rule, model):
    if rule == "fa":
        return [np.asarray(layer.fa_feedback[...]) for layer in model.layers]
    if rule == "dfa":
        return dfa_blocks(model)
    return None


def assert_matches_core_and_numpy(rule, loss, got, params, core_feedback, numpy_feedback, x, t):
    """``got`` (list of {"kernel", "bias"}) equals the core's tanh-MLP gradients and the NumPy closed form."""
    core_loss, core = fa_jax.value_and_grad(mlp("tanh"), mse, rule)(params, core_feedback, x, t)
    want_loss, want = reference.gradients(params, x, t, "tanh", rule, numpy_feedback)
    np.testing.assert_allclose(loss, core_loss, rtol=1e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for g, c, w in zip(got, core, want):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(g[name], c[name], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(g[name], w[name], rtol=1e-4, atol=1e-5)


def nnx_grads(model, x, t, jit):
    grad = nnx.value_and_grad(lambda m: mse(m(x), t))
    return (nnx.jit(grad) if jit else grad)(model)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "shallow"])
def test_mlp_matches_core_and_numpy(rule, jit):
    x, t = batch()
    model = build(rule, x=x)
    loss, grads = nnx_grads(model, x, t, jit)
    got = [{"kernel": grads["layers"][i]["kernel"][...], "bias": grads["layers"][i]["bias"][...]} for i in range(3)]

    params = core_params(model)
    assert_matches_core_and_numpy(rule, loss, got, params, core_feedback(rule, model), numpy_feedback(rule, model), x, t)
    if rule in ("fa", "dfa"):  # and not BP: the hidden gradients differ
        _, bp = reference.gradients(params, x, t, "tanh", "bp")
        assert not np.allclose(got[0]["kernel"], bp[0]["kernel"], atol=1e-3)


def test_feedback_is_drawn_from_layer_key_of_its_path():
    key = jax.random.key(7)
    model = fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), "fa", key=key)
    for i, layer in enumerate(model.layers):
        want = fa_jax.FA().init(fa_jax.layer_key(key, f"layers/{i}/kernel"), layer.kernel.shape, jnp.float32)
        np.testing.assert_array_equal(layer.fa_feedback[...], want)
    x, _ = batch()
    dfa = fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), "dfa", key=key, inputs=x)
    assert [t.name for t in dfa.fa_taps] == ["layers/1:in", "layers/2:in"]  # layer 0 reads the model input
    first = fa_jax.DFA().init(fa_jax.layer_key(key, "layers/1:in"), (SIZES[-1], SIZES[1]), jnp.float32)
    np.testing.assert_array_equal(dfa_blocks(dfa)[0], first)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_regenerated_feedback_gives_the_stored_numbers(rule):
    x, t = batch()
    stored = build(rule, x=x)
    regen_rule = fa_jax.FA(regenerate=True) if rule == "fa" else fa_jax.DFA(regenerate=True)
    regen = fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), regen_rule, key=jax.random.key(100), inputs=x)
    assert all(jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) for v in jax.tree.leaves(fnnx.feedback_of(regen)))
    _, want = nnx_grads(stored, x, t, jit=True)
    _, got = nnx_grads(regen, x, t, jit=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def conv_input_gradient_numpy(g, B, stride, padding, in_hw):
    """dx of a 2-D NHWC cross-correlation with B in place of W: dx[n, i·s+di−p, j·s+dj−p, c] += g[n,i,j,o] B[di,dj,c,o]."""
    n, oh, ow, _ = g.shape
    kh, kw, c_in, _ = B.shape
    if padding == "SAME":
        pads = [max((o - 1) * stride + k - size, 0) // 2 for o, k, size in ((oh, kh, in_hw[0]), (ow, kw, in_hw[1]))]
    else:
        pads = [0, 0]
    dx = np.zeros((n, *in_hw, c_in))
    for i in range(oh):
        for j in range(ow):
            for di in range(kh):
                for dj in range(kw):
                    r, c = i * stride + di - pads[0], j * stride + dj - pads[1]
                    if 0 <= r < in_hw[0] and 0 <= c < in_hw[1]:
                        dx[:, r, c, :] += g[:, i, j, :] @ B[di, dj].T
    return dx


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME"), (1, "VALID"), (2, "VALID")])
def test_conv_input_gradient_is_the_transposed_convolution_with_B(stride, padding):
    conv = nnx.Conv(2, 3, (3, 3), strides=stride, padding=padding, rngs=nnx.Rngs(0))
    holder = nnx.Sequential(conv)
    fnnx.convert(holder, "fa", key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 7, 6, 2))
    y, pullback = jax.vjp(lambda x_: holder(x_), x)
    g = jax.random.normal(jax.random.key(3), y.shape)
    (dx,) = pullback(g)
    B = np.asarray(conv.fa_feedback[...], np.float64)
    np.testing.assert_allclose(dx, conv_input_gradient_numpy(np.asarray(g, np.float64), B, stride, padding, (7, 6)),
                               rtol=1e-4, atol=1e-5)
    # lax.conv transpose reference: the VJP of a plain convolution whose kernel is B.
    plain = lambda x_: jax.lax.conv_general_dilated(x_, jnp.asarray(B, jnp.float32), (stride,) * 2, padding,
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(dx, jax.vjp(plain, x)[1](g)[0], rtol=1e-4, atol=1e-5)
    # the kernel gradient stays exact (BP's)
    bp = nnx.Conv(2, 3, (3, 3), strides=stride, padding=padding, rngs=nnx.Rngs(0))
    dw_bp = nnx.grad(lambda m: jnp.sum(m(x) * g))(bp)["kernel"][...]
    dw_fa = nnx.grad(lambda m: jnp.sum(m(x) * g))(holder)["layers"][0]["kernel"][...]
    np.testing.assert_allclose(dw_fa, dw_bp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_optax_chain_trains_and_feedback_is_bit_identical(rule):
    x, t = batch(n=32)
    model = build(rule, x=x)
    before = jax.tree.map(np.array, fnnx.feedback_of(model))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.5))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    assert not jax.tree.leaves(nnx.state(optimizer.opt_state, fnnx.Feedback))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: mse(m(x), t))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(100)]
    assert losses[-1] < 0.5 * losses[0]
    after = fnnx.feedback_of(model)
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_pure_path_vmap_over_8_seeds_equals_single_runs(rule):
    x, t = batch()

    def init(seed):
        model = MLP(SIZES, rngs=nnx.Rngs(jax.random.key(seed)))
        fnnx.convert(model, rule, key=jax.random.fold_in(jax.random.key(100), seed), inputs=x)
        _, params, feedback = fnnx.split(model)
        return params, feedback

    graphdef, _, _ = fnnx.split(build(rule, x=x))
    grad_fn = fnnx.value_and_grad(graphdef, mse)

    def train(params, feedback):  # an SGD step, pure
        for _ in range(1):
            _, grads = grad_fn(params, feedback, x, t)
            params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return grad_fn(params, feedback, x, t)

    seeds = jnp.arange(8)
    params, feedback = jax.vmap(init)(seeds)
    losses, grads = jax.jit(jax.vmap(train))(params, feedback)
    for i in (0, 5):
        single = jax.jit(train)(*init(jnp.int32(i)))
        np.testing.assert_allclose(losses[i], single[0], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(single[1])):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6)
    assert len(set(np.round(np.asarray(losses), 6))) == 8  # seeds differ


class Plain(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(x)


def test_errors_are_clear():
    x, _ = batch()
    with pytest.raises(ValueError, match="no layer it can handle.*Linear"):
        fnnx.convert(Plain(nnx.Rngs(0)), "fa", key=jax.random.key(0))
    with pytest.raises(ValueError, match="no layer it can handle"):
        fnnx.convert(Plain(nnx.Rngs(0)), "dfa", key=jax.random.key(0), inputs=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\['layers/9'\] name no module"):
        fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), "dfa", key=jax.random.key(0), inputs=x, taps=["layers/9"])
    with pytest.raises(ValueError, match="needs blocks="):
        fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), "dfa", key=jax.random.key(0), inputs=x, taps="macro")
    with pytest.raises(ValueError, match="needs inputs="):
        fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), "dfa", key=jax.random.key(0))
    with pytest.raises(TypeError, match="typed PRNG key"):
        fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), "fa", key=0)
    model = build("fa")
    with pytest.raises(ValueError, match="already converted"):
        fnnx.convert(model, "fa", key=jax.random.key(0))
    custom = MLP(SIZES, rngs=nnx.Rngs(0))
    custom.layers[1].dot_general = lambda *a, **k: jax.lax.dot_general(*a, **k)
    with pytest.raises(ValueError, match="layer 'layers/1'.*custom"):
        fnnx.convert(custom, "fa", key=jax.random.key(0))
    dfa = build("dfa", x=x)
    with pytest.raises(ValueError, match="outside its converted root"):
        dfa.layers[1](jnp.ones((2, SIZES[1])))  # a tapped layer on its own would silently be BP


def test_shared_prefix_dfa_matches_core():
    x, t = batch()
    rule = fa_jax.DFA(shared_prefix=True)
    model = fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), rule, key=jax.random.key(3), inputs=x)
    assert model.fa_dfa_feedback.shape == (SIZES[-1], max(SIZES[1:-1]))  # one matrix, prefixes per tap
    loss, grads = nnx_grads(model, x, t, jit=True)
    taps = tuple(fa_jax.TapSpec(f"layer_{i}", tap.shape) for i, tap in enumerate(model.fa_taps))
    core_fb = fa_jax.DFAFeedback(model.fa_dfa_feedback[...], taps, (SIZES[-1],), shared_prefix=True)
    _, core = fa_jax.value_and_grad(mlp("tanh"), mse, rule)(core_params(model), core_fb, x, t)
    for i in range(3):
        np.testing.assert_allclose(grads["layers"][i]["kernel"][...], core[i]["kernel"], rtol=1e-5, atol=1e-6)


class Residual(nnx.Module):
    """LayerNorm, dropout and a residual around two linear layers."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(SIZES[0], 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.inner = nnx.Linear(8, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(8, SIZES[-1], rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        h = h + self.drop(jnp.tanh(self.inner(self.norm(h))))
        return self.out(h)


def test_norm_dropout_residual_pass_through_fa_with_B_equal_to_W_is_bp():
    x, t = batch()
    bp = Residual(nnx.Rngs(0))
    fa = fnnx.convert(Residual(nnx.Rngs(0)), "fa", key=jax.random.key(1))
    want = nnx.grad(lambda m: mse(m(x), t))(bp)
    _, fa_grads = nnx_grads(fa, x, t, jit=False)
    assert not np.allclose(fa_grads["inp"]["kernel"][...], want["inp"]["kernel"][...], atol=1e-4)
    same = fnnx.convert(Residual(nnx.Rngs(0)), "fa", key=jax.random.key(1))
    for layer in (same.inp, same.inner, same.out):
        layer.fa_feedback.set_value(layer.kernel[...])
    got = nnx.grad(lambda m: mse(m(x), t))(same)  # same dropout mask: same Rngs seed, first call
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_every_registered_rule_converts():
    """The rule family (uSF, frSF, brSF, KP, DRTP) goes through the adapter like FA and DFA (tests/test_flax_family.py)."""
    for name in fa_jax.RULES:
        model = fnnx.convert(MLP(SIZES, rngs=nnx.Rngs(0)), name, key=jax.random.key(0), inputs=batch()[0])
        assert model(batch()[0]).shape == (8, SIZES[-1])


@nnx.split_rngs(splits=3)
@nnx.vmap(in_axes=(0,), out_axes=0)
def _stacked_linear(rngs):
    return nnx.Linear(SIZES[0], SIZES[0], rngs=rngs)


class Stacked(nnx.Module):
    """Three layers as one stacked nnx.Linear (kernel (3, d, d)) run with nnx.scan."""

    def __init__(self, rngs):
        self.layers = _stacked_linear(rngs)
        self.head = nnx.Linear(SIZES[0], SIZES[-1], rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return jnp.tanh(layer(x))

        return self.head(body(x, self.layers))


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_layer_stacks_raise_instead_of_one_B_for_the_stack(rule):
    with pytest.raises(ValueError, match=r"layer 'layers'.*\(5, 5\), given \(3, 5, 5\).*nnx.scan"):
        fnnx.convert(Stacked(nnx.Rngs(0)), rule, key=jax.random.key(0), inputs=batch()[0])


class AttentionEinsum(nnx.Module):
    """nnx.MultiHeadAttention (four nnx.LinearGeneral) and an nnx.Einsum head."""

    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(2, 6, qkv_features=8, decode=False, rngs=rngs)
        self.head = nnx.Einsum("bsd,dk->bsk", (6, 3), (3,), rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.attn(x))


def test_fa_with_B_equal_to_W_is_bp_through_linear_general_and_einsum():
    x = jax.random.normal(jax.random.key(0), (3, 4, 6))
    objective = lambda m: jnp.sum(jnp.sin(m(x)))
    want = nnx.grad(objective)(AttentionEinsum(nnx.Rngs(0)))
    model = fnnx.convert(AttentionEinsum(nnx.Rngs(0)), "fa", key=jax.random.key(1))
    converted = [p for p, m in nnx.iter_modules(model) if hasattr(m, "fa_feedback")]
    assert sorted(converted) == [("attn", "key"), ("attn", "out"), ("attn", "query"), ("attn", "value"), ("head",)]
    fa = nnx.jit(nnx.grad(objective))(model)
    assert not np.allclose(fa["attn"]["query"]["kernel"][...], want["attn"]["query"]["kernel"][...], atol=1e-4)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "fa_feedback"):
            module.fa_feedback.set_value(module.kernel[...])
    got = nnx.jit(nnx.grad(objective))(model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class _Block(nnx.Module):
    def __init__(self, width, rngs):
        self.lin = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class _RematWrapper(nnx.Module):
    """Applies nnx.remat to its child inside its own call: a tap on the wrapper stays in the model's trace."""

    def __init__(self, block, remat):
        self.block, self.remat = block, remat

    def __call__(self, x):
        return nnx.remat(lambda block, h: block(h))(self.block, x) if self.remat else self.block(x)


class _RematNet(nnx.Module):
    def __init__(self, remat, rngs):
        self.inp = nnx.Linear(SIZES[0], 8, rngs=rngs)
        self.blocks = nnx.List([_RematWrapper(_Block(8, rngs), remat) for _ in range(2)])
        self.out = nnx.Linear(8, SIZES[-1], rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.inp(x))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def _remat_grads(rule, remat, **convert_kwargs):
    x, t = batch()
    model = fnnx.convert(_RematNet(remat, nnx.Rngs(0)), rule, key=jax.random.key(1), inputs=x, **convert_kwargs)
    return nnx.value_and_grad(lambda m: mse(m(x), t))(model)[1]


@pytest.mark.parametrize("rule, taps", [("fa", None), ("dfa", ["inp", "blocks/0", "blocks/1"])])
def test_remat_gives_the_same_gradients_when_taps_wrap_it(rule, taps):
    """nnx.remat changes memory, not gradients: FA layers inside it, DFA taps on modules that wrap it."""
    kwargs = {} if taps is None else {"taps": taps}
    plain, remat = _remat_grads(rule, False, **kwargs), _remat_grads(rule, True, **kwargs)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("taps", ["layer", ["inp", "blocks/0/block"]])
def test_dfa_tap_inside_remat_raises_instead_of_a_wrong_gradient(taps):
    # The tap's value would belong to the checkpoint's inner trace: before this check, DFA
    # silently returned gradients that differed from the un-remat'd model's.
    with pytest.raises(ValueError, match=r"tap 'blocks/0/block(/lin:in)?' ran inside a JAX transformation"):
        _remat_grads("dfa", True, taps=taps)


class _WithConvTranspose(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(SIZES[0], 6, rngs=rngs)
        self.up = nnx.ConvTranspose(6, 6, (1,), rngs=rngs)  # calls lax.conv_transpose directly
        self.out = nnx.Linear(6, SIZES[-1], rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.inp(x))
        h = jnp.tanh(self.up(h[:, None, :])[:, 0])
        return self.out(h)


@pytest.mark.parametrize("rule", ["fa", "usf", "kp", "dfa"])
def test_a_kernel_the_adapter_cannot_intercept_raises_instead_of_silent_bp(rule):
    x, _ = batch()
    with pytest.raises(ValueError, match=rf"rule '{rule}': layer 'up' \(ConvTranspose\) holds a kernel .* silently be BP's"):
        fnnx.convert(_WithConvTranspose(nnx.Rngs(0)), rule, key=jax.random.key(1), inputs=x)
    # Whole-block DFA taps leave BP inside blocks by design (Launay et al. 2020): allowed.
    if rule == "dfa":
        fnnx.convert(_WithConvTranspose(nnx.Rngs(0)), rule, key=jax.random.key(1), inputs=x, taps=["inp", "up"])
