"""fa_jax.linen: adapted Linen models against the core functional path and NumPy closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_nnx import assert_matches_core_and_numpy, conv_input_gradient_numpy

import fa_jax
import fa_jax.linen as flinen

SIZES = (5, 7, 6, 3)


class MLP(nn.Module):
    sizes: tuple = SIZES

    @nn.compact
    def __call__(self, x):
        for size in self.sizes[1:-1]:
            x = jnp.tanh(nn.Dense(size)(x))
        return nn.Dense(self.sizes[-1])(x)


def mse(y, t):
    return 0.5 * jnp.sum((y - t) ** 2) / y.shape[0]


def batch(seed=1, n=8):
    kx, kt = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, SIZES[0])), jax.random.normal(kt, (n, SIZES[-1]))


def setup(rule, seed=0, x=None, **kw):
    model = MLP()
    x = batch()[0] if x is None else x
    variables = model.init(jax.random.key(seed), x)
    adapted = flinen.adapt(model, rule, **kw)
    return model, variables, adapted, adapted.init_feedback(variables, x, key=jax.random.key(100 + seed))


def as_list(params):
    return [{"kernel": params[f"Dense_{i}"]["kernel"], "bias": params[f"Dense_{i}"]["bias"]} for i in range(3)]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "shallow"])
def test_mlp_matches_core_and_numpy(rule, jit):
    x, t = batch()
    _, variables, adapted, feedback = setup(rule)
    grad = jax.value_and_grad(lambda p: mse(adapted.apply({"params": p}, feedback, x), t))
    loss, grads = (jax.jit(grad) if jit else grad)(variables["params"])
    got = as_list(grads)

    params = as_list(variables["params"])
    if rule == "fa":
        core_fb = fa_jax.FAFeedback([{"kernel": feedback.kernels[f"Dense_{i}"]["kernel"], "bias": None} for i in range(3)])
        np_fb = [np.asarray(b["kernel"]) for b in core_fb.kernels]
    elif rule == "dfa":
        assert [t.name for t in feedback.taps] == ["Dense_1:in", "Dense_2:in"]
        taps = tuple(fa_jax.TapSpec(f"layer_{i}", t.shape) for i, t in enumerate(feedback.taps))
        core_fb = fa_jax.DFAFeedback(feedback.projection, taps, feedback.output_shape)
        np_fb = [np.asarray(b) for b in fa_jax.dfa_matrices(core_fb)]
    else:
        core_fb = np_fb = None
    assert_matches_core_and_numpy(rule, loss, got, params, core_fb, np_fb, x, t)


def test_fa_feedback_lives_outside_params_and_uses_layer_keys():
    key = jax.random.key(100)
    _, variables, _, feedback = setup("fa")
    for i in range(3):
        kernel = variables["params"][f"Dense_{i}"]["kernel"]
        want = fa_jax.FA().init(fa_jax.layer_key(key, f"Dense_{i}/kernel"), kernel.shape, kernel.dtype)
        np.testing.assert_array_equal(feedback.kernels[f"Dense_{i}"]["kernel"], want)
        assert feedback.kernels[f"Dense_{i}"]["bias"] is None


class ConvNet(nn.Module):
    stride: int = 2
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (3, 3), strides=self.stride, padding=self.padding)(x)


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "VALID")])
def test_conv_input_gradient_is_the_transposed_convolution_with_B(stride, padding):
    x = jax.random.normal(jax.random.key(2), (2, 7, 6, 2))
    model = ConvNet(stride, padding)
    variables = model.init(jax.random.key(0), x)
    adapted = flinen.adapt(model, "fa")
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(1))
    y, pullback = jax.vjp(lambda x_: adapted.apply(variables, feedback, x_), x)
    g = jax.random.normal(jax.random.key(3), y.shape)
    B = np.asarray(feedback.kernels["Conv_0"]["kernel"], np.float64)
    want = conv_input_gradient_numpy(np.asarray(g, np.float64), B, stride, padding, (7, 6))
    np.testing.assert_allclose(pullback(g)[0], want, rtol=1e-4, atol=1e-5)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
        return nn.DenseGeneral((2, 3), axis=(-2, -1))(nn.LayerNorm()(x))


def test_fa_with_feedback_equal_to_weights_is_bp_through_attention_and_densegeneral():
    x = jax.random.normal(jax.random.key(0), (3, 4, 6))
    model = Attention()
    variables = model.init(jax.random.key(1), x)
    adapted = flinen.adapt(model, "fa")
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(2))
    assert len([b for b in jax.tree.leaves(feedback.kernels) if b is not None]) == 5  # q, k, v, out, head
    objective = lambda fb: lambda p: jnp.sum(jnp.sin(adapted.apply({"params": p}, fb, x)))
    weights = fa_jax.FAFeedback(jax.tree.map(lambda b, w: None if b is None else w, feedback.kernels,
                                             variables["params"], is_leaf=lambda v: v is None))
    bp_grad = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x))))
    bp, same, fa = jax.jit(lambda p: (bp_grad(p), jax.grad(objective(weights))(p), jax.grad(objective(feedback))(p)))(
        variables["params"])  # one compile for the three
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(bp)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(fa["MultiHeadDotProductAttention_0"]["query"]["kernel"],
                           bp["MultiHeadDotProductAttention_0"]["query"]["kernel"], atol=1e-4)


def test_a_jit_cache_hit_outside_the_adapter_raises_instead_of_computing_bp():
    x, t = batch()
    model, variables, adapted, feedback = setup("fa")
    cached = jax.jit(model.apply)
    cached(variables, x)  # traced here, outside any interceptor
    with pytest.raises(ValueError, match="never used.*cached trace"):
        flinen.adapt(cached, "fa").apply(variables, feedback, x)
    with pytest.raises(ValueError, match="no layer it can handle.*cached trace"):
        flinen.adapt(cached, "fa").init_feedback(variables, x, key=jax.random.key(0))
    _, _, dfa, dfa_feedback = setup("dfa")
    with pytest.raises(ValueError, match="no DFA tap ran.*cached trace"):
        flinen.adapt(cached, "dfa").apply(variables, dfa_feedback, x)
    # the right way round: jit the adapted function; it traces inside the interceptor
    fn = lambda p: mse(adapted.apply({"params": p}, feedback, x), t)
    jitted = jax.jit(jax.grad(fn))(variables["params"])["Dense_0"]["kernel"]
    np.testing.assert_allclose(jitted, jax.grad(fn)(variables["params"])["Dense_0"]["kernel"], rtol=1e-5, atol=1e-7)
    bp = jax.grad(lambda p: mse(model.apply({"params": p}, x), t))(variables["params"])["Dense_0"]["kernel"]
    assert not np.allclose(jitted, bp, atol=1e-4)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        return jnp.tanh(nn.Dense(5)(carry)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack()(x, None)
        return nn.Dense(3)(x)


class Vmapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        heads = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                        out_axes=1, axis_size=2)(4)
        return nn.Dense(3)(heads(x).reshape(x.shape[0], -1))


@pytest.mark.parametrize("stack", [Scanned, Vmapped])
@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_lifted_layer_stacks_raise_instead_of_sharing_one_B(stack, rule):
    x = jnp.ones((2, 5))
    variables = stack().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="inside nn.scan / nn.vmap.*shared B"):
        flinen.adapt(stack(), rule).init_feedback(variables, x, key=jax.random.key(1))


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_optax_chain_trains_and_feedback_is_bit_identical(rule):
    x, t = batch(n=32)
    _, variables, adapted, feedback = setup(rule, x=x)
    before = jax.tree.map(np.array, feedback)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.5))
    params, state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def step(params, state, feedback):
        loss, grads = jax.value_and_grad(lambda p: mse(adapted.apply({"params": p}, feedback, x), t))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(100):
        params, state, loss = step(params, state, feedback)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    for a, b in zip(jax.tree.leaves(feedback), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_vmap_over_8_seeds_equals_single_runs(rule):
    x, t = batch()
    model = MLP()
    adapted = flinen.adapt(model, rule)

    def init(seed):
        variables = model.init(jax.random.key(seed), x)
        return variables["params"], adapted.init_feedback(variables, x, key=jax.random.fold_in(jax.random.key(100), seed))

    def run(params, feedback):
        loss, grads = jax.value_and_grad(lambda p: mse(adapted.apply({"params": p}, feedback, x), t))(params)
        return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    losses, params = jax.jit(jax.vmap(run))(*jax.vmap(init)(jnp.arange(8)))
    for i in (0, 6):
        loss, single = jax.jit(run)(*init(i))
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6)
    assert len(set(np.round(np.asarray(losses), 6))) == 8


class NoWeights(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm()(x)


def test_errors_are_clear():
    x = jnp.ones((2, 5))
    variables = NoWeights().init(jax.random.key(0), x)
    for rule in ("fa", "dfa"):
        with pytest.raises(ValueError, match="no layer it can handle.*Dense"):
            flinen.adapt(NoWeights(), rule).init_feedback(variables, x, key=jax.random.key(0))
    model, variables, _, _ = setup("bp")
    with pytest.raises(ValueError, match=r"\['Block_3'\] name no module.*Dense_0"):
        flinen.adapt(model, "dfa", taps=["Block_3"]).init_feedback(variables, x, key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs blocks="):
        flinen.adapt(model, "dfa", taps="macro")
    with pytest.raises(TypeError, match="typed PRNG key"):
        flinen.adapt(model, "fa").init_feedback(variables, x, key=3)
    _, _, adapted, _ = setup("fa")
    with pytest.raises(TypeError, match="rule 'fa' needs FAFeedback"):
        adapted.apply(variables, None, x)
    _, _, usf, _ = setup("usf")
    with pytest.raises(TypeError, match="rule 'usf' needs FAFeedback"):
        usf.apply(variables, None, x)


def test_every_registered_rule_adapts():
    """The rule family (uSF, frSF, brSF, KP, DRTP) goes through the adapter like FA and DFA (tests/test_flax_family.py)."""
    x = batch()[0]
    variables = MLP().init(jax.random.key(0), x)
    for name in fa_jax.RULES:
        adapted = flinen.adapt(MLP(), name)
        feedback = adapted.init_feedback(variables, x, key=jax.random.key(1))
        assert adapted.apply(variables, feedback, x).shape == (8, SIZES[-1])


class ScaledDense(nn.Dense):
    """A Dense subclass whose __call__ calls super().__call__: still one layer call."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


class SubclassNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return ScaledDense(3)(jnp.tanh(ScaledDense(4)(x)))


def test_subclass_calling_super_is_one_layer_call():
    x = jnp.ones((2, 5))
    variables = SubclassNet().init(jax.random.key(0), x)
    dfa = flinen.adapt(SubclassNet(), "dfa").init_feedback(variables, x, key=jax.random.key(1))
    assert [t.name for t in dfa.taps] == ["ScaledDense_0:in"]  # the output layer, constructed first
    adapted = flinen.adapt(SubclassNet(), "fa")
    fa = adapted.init_feedback(variables, x, key=jax.random.key(1))
    np.testing.assert_allclose(adapted.apply(variables, fa, x), SubclassNet().apply(variables, x), rtol=1e-6)


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(8)(x))


class _LinenRematNet(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(8)(x))
        block = nn.remat(_LinenBlock) if self.remat else _LinenBlock
        for i in range(2):
            h = block(name=f"Block_{i}")(h)
        return nn.Dense(SIZES[-1])(h)


@pytest.mark.parametrize("rule, taps", [("fa", "layer"), ("dfa", "layer"), ("dfa", ["Block_0", "Block_1"])])
def test_nn_remat_fa_unchanged_and_dfa_taps_inside_it_raise(rule, taps):
    x = jax.random.normal(jax.random.key(0), (4, SIZES[0]))
    t = jax.random.normal(jax.random.key(1), (4, SIZES[-1]))

    def grads(remat):
        model = _LinenRematNet(remat)
        variables = model.init(jax.random.key(2), x)
        adapted = flinen.adapt(model, rule, taps=taps)
        feedback = adapted.init_feedback(variables, x, key=jax.random.key(3))
        return jax.grad(lambda p: mse(adapted.apply({"params": p}, feedback, x), t))(variables["params"])

    if rule == "fa":
        for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    else:  # the intercepted call of an nn.remat module runs in the checkpoint's inner trace
        grads(False)
        with pytest.raises(ValueError, match=r"tap 'Block_0(/Dense_0:in)?' ran inside a JAX transformation"):
            grads(True)


class _WithUnhandledKernels(nn.Module):
    layer: str

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6)(x))
        if self.layer == "einsum":
            h = jnp.tanh(nn.Einsum((6, 6), "bi,io->bo", name="odd")(h))  # calls jnp.einsum directly
        else:
            h = jnp.tanh(nn.ConvTranspose(6, (1,), name="odd")(h[:, None, :])[:, 0])
        return nn.Dense(SIZES[-1])(h)


@pytest.mark.parametrize("layer", ["einsum", "conv_transpose"])
@pytest.mark.parametrize("rule", ["fa", "brsf", "dfa"])
def test_a_kernel_the_adapter_cannot_intercept_raises_instead_of_silent_bp(rule, layer):
    x = jnp.ones((3, SIZES[0]))
    model = _WithUnhandledKernels(layer)
    variables = model.init(jax.random.key(0), x)
    adapted = flinen.adapt(model, rule)
    with pytest.raises(ValueError, match=rf"rule '{rule}': layer 'odd' \((Einsum|ConvTranspose)\) holds a kernel"):
        adapted.init_feedback(variables, x, key=jax.random.key(1))
    if rule == "dfa":  # whole-block taps: BP inside a block is DFA's design, so this adapts
        flinen.adapt(model, rule, taps=["Dense_0", "odd"]).init_feedback(variables, x, key=jax.random.key(1))
