"""fa_jax.nnx on models whose weight products no layer list would find: every product goes through the rule.

Each model is an ordinary NNX model (LoRA, a tied head, a raw Param matmul, a Linear
subclass calling super(), Einsum, ConvTranspose, an nnx.scan stack, an nnx.remat block).
Its twin, written here in plain JAX, computes the FA-family update independently of the
engine: every weight product ``op(x, W)`` becomes

    op(stop_gradient(x), W) + (op(x, B) - stop_gradient(op(x, B)))

whose value is ``op(x, W)``, whose ``dW`` is exact and whose ``dx`` goes through B
(Lillicrap et al. 2016, eq. 2). With B = W that is backprop, so the adapter with
``Feedback`` holding W must give BP's gradients exactly; with the drawn B (FA) or
``sign(W)·s`` (uSF, Liao et al. 2016) it must give the twin's, and differ from BP.
DFA: the hidden gradients differ from BP's, the layer after the last tap keeps BP's,
and the adapter (stateful and pure) agrees with the core on the plain model.
"""

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fa_jax as fj
import fa_jax.nnx as fnnx
from fa_jax._feedback import by_path

sg = jax.lax.stop_gradient
# Test programs are small: compiling them is what costs, and an unoptimised XLA backend halves that.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def through(x, w, b, op=jnp.matmul):
    """``op(x, w)`` whose input gradient goes through ``b`` (exact dW)."""
    return op(sg(x), w) + (op(x, b) - sg(op(x, b)))


def mse(y, t):
    return 0.5 * jnp.sum((y - t) ** 2) / y.shape[0]


# --------------------------------------------------------------------------- models and their twins


class LoRANet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.LoRALinear(4, 6, lora_rank=2, rngs=rngs)
        self.head = nnx.LoRA(6, 2, 3, rngs=rngs)
        for lora in (self.lin.lora, self.head):  # lora_b starts at zero; make every product matter
            lora.lora_b[...] = jax.random.normal(rngs.params(), lora.lora_b.shape) * 0.5

    def __call__(self, x):
        return self.head(jnp.tanh(self.lin(x)))


def lora_twin(p, x, B):
    h = through(x, p["lin/kernel"], B["lin/kernel"]) + p["lin/bias"]
    h = h + through(through(x, p["lin/lora/lora_a"], B["lin/lora/lora_a"]), p["lin/lora/lora_b"], B["lin/lora/lora_b"])
    h = jnp.tanh(h)
    return through(through(h, p["head/lora_a"], B["head/lora_a"]), p["head/lora_b"], B["head/lora_b"])


class Tied(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 6, rngs=rngs)
        self.mid = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, tokens):
        return self.embed.attend(jnp.tanh(self.mid(self.embed(tokens))))


def tied_twin(p, tokens, B):
    h = jnp.tanh(through(p["embed/embedding"][tokens], p["mid/kernel"], B["mid/kernel"]) + p["mid/bias"])
    return through(h, p["embed/embedding"], B["embed/embedding"], op=lambda a, e: a @ e.T)


class RawParam(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 5, rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (5, 3)) * 0.5)

    def __call__(self, x):
        return jnp.tanh(self.lin(x)) @ self.w[...]


def raw_twin(p, x, B):
    return through(jnp.tanh(through(x, p["lin/kernel"], B["lin/kernel"]) + p["lin/bias"]), p["w"], B["w"])


class Doubled(nnx.Linear):
    def __call__(self, x):
        return 2.0 * super().__call__(x)


class Subclassed(nnx.Module):
    def __init__(self, rngs):
        self.a = Doubled(4, 5, rngs=rngs)
        self.b = Doubled(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def subclass_twin(p, x, B):
    h = jnp.tanh(2.0 * (through(x, p["a/kernel"], B["a/kernel"]) + p["a/bias"]))
    return 2.0 * (through(h, p["b/kernel"], B["b/kernel"]) + p["b/bias"])


class Einsums(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Einsum("bi,iho->bho", (4, 2, 3), (2, 3), rngs=rngs)
        self.b = nnx.Einsum("bk,ko->bo", (6, 3), (3,), rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.a(x))
        return self.b(h.reshape(h.shape[0], -1))


def einsum_twin(p, x, B):
    h = jnp.tanh(
        through(x, p["a/kernel"], B["a/kernel"], op=lambda a, k: jnp.einsum("bi,iho->bho", a, k)) + p["a/bias"]
    )
    h = h.reshape(h.shape[0], -1)
    return through(h, p["b/kernel"], B["b/kernel"], op=lambda a, k: jnp.einsum("bk,ko->bo", a, k)) + p["b/bias"]


class Deconv(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.ConvTranspose(1, 3, (3, 3), strides=(2, 2), rngs=rngs)  # the first layer: reads the input
        self.out = nnx.ConvTranspose(3, 2, (2, 2), rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.up(x)))


def _conv_t(strides):
    return lambda a, k: jax.lax.conv_transpose(a, k, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def deconv_twin(p, x, B):
    h = jnp.tanh(through(x, p["up/kernel"], B["up/kernel"], op=_conv_t((2, 2))) + p["up/bias"])
    return through(h, p["out/kernel"], B["out/kernel"], op=_conv_t((1, 1))) + p["out/bias"]


class Block(nnx.Module):
    def __init__(self, dim, rngs):
        self.lin = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, h):
        return jnp.tanh(self.lin(h))


class Scanned(nnx.Module):
    """Three blocks made with nnx.vmap and run with nnx.scan: one stacked kernel (3, 5, 5)."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 5, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(5, rngs)

        self.blocks = make(rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.inp(x))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return self.out(body(h, self.blocks))


def scanned_twin(p, x, B):
    h = jnp.tanh(through(x, p["inp/kernel"], B["inp/kernel"]) + p["inp/bias"])
    for layer in range(3):  # a distinct B per layer
        h = jnp.tanh(
            through(h, p["blocks/lin/kernel"][layer], B["blocks/lin/kernel"][layer]) + p["blocks/lin/bias"][layer]
        )
    return through(h, p["out/kernel"], B["out/kernel"]) + p["out/bias"]


class Remat(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 5, rngs=rngs)
        self.block = Block(5, rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.inp(x))
        h = nnx.remat(lambda block, h: block(h))(self.block, h)
        return self.out(h)


def remat_twin(p, x, B):
    h = jnp.tanh(through(x, p["inp/kernel"], B["inp/kernel"]) + p["inp/bias"])
    h = jnp.tanh(through(h, p["block/lin/kernel"], B["block/lin/kernel"]) + p["block/lin/bias"])
    return through(h, p["out/kernel"], B["out/kernel"]) + p["out/bias"]


RNG = np.random.default_rng(0)  # NumPy data: no XLA compile per shape


def _dense(n):
    return RNG.standard_normal((n, 4)).astype(np.float32)


# name: (model class, inputs, twin, a hidden parameter, the parameter after the last layer tap (None: the tied
# table is read before the first tap and after the last))
CASES = {
    "lora": (LoRANet, _dense(6), lora_twin, "lin/kernel", "head/lora_b"),
    "tied": (Tied, RNG.integers(0, 11, (3, 5)).astype(np.int32), tied_twin, "mid/kernel", None),
    "raw_param": (RawParam, _dense(6), raw_twin, "lin/kernel", "w"),
    "subclass": (Subclassed, _dense(6), subclass_twin, "a/kernel", "b/kernel"),
    "einsum": (Einsums, _dense(6), einsum_twin, "a/kernel", "b/kernel"),
    "conv_transpose": (
        Deconv,
        RNG.standard_normal((2, 4, 4, 1)).astype(np.float32),
        deconv_twin,
        "up/kernel",
        "out/kernel",
    ),
    "scan": (Scanned, _dense(6), scanned_twin, "inp/kernel", "out/kernel"),
    "remat": (Remat, _dense(6), remat_twin, "inp/kernel", "out/kernel"),
}


_forward = nnx.jit(lambda model, x: model(x))


@functools.cache
def _plain(name):
    """The model with NumPy-drawn values (its shapes from nnx.eval_shape: no initializer is compiled)."""
    cls, x, *_ = CASES[name]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    state = jax.tree.map(lambda leaf: (0.5 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), state)
    plain = nnx.merge(graphdef, state)
    t = RNG.standard_normal(_forward(plain, x).shape).astype(np.float32)
    return plain, t


def build(name, rule):
    plain, t = _plain(name)
    model = fnnx.convert(nnx.clone(plain), rule, key=jax.random.key(1), inputs=CASES[name][1])
    return model, plain, CASES[name][1], t


@nnx.jit
def _grads(model, x, t):
    return nnx.grad(lambda m: mse(m(x), t))(model)


def grads_of(model, x, t):
    return by_path(_grads(model, x, t))


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _twin_grads(name, params, x, t, B):
    return jax.grad(lambda p: mse(CASES[name][2](p, x, B), t))(params)


def twin_grads(name, params, x, t, B):
    return by_path(_twin_grads(name, params, x, t, B))


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=rtol, atol=atol, err_msg=path)


@pytest.mark.parametrize("name", list(CASES))
def test_fa_through_every_weight_product(name):
    model, plain, x, t = build(name, "fa")
    params = by_path(nnx.state(plain, nnx.Param))
    twin = jax.jit(CASES[name][2], compiler_options=FAST)(params, x, params)
    np.testing.assert_allclose(twin, _forward(plain, x), rtol=1e-5, atol=1e-6)  # the twin is the model
    feedback = model.fa_feedback.get_value()
    # Every parameter that multiplies an activation or the input has B (the tied table included).
    products = {p for p in params if not p.endswith("bias")}
    assert set(feedback.weights) == products
    bp = grads_of(plain, x, t)
    fa = grads_of(model, x, t)
    assert_close(fa, twin_grads(name, params, x, t, feedback.weights))
    hidden = CASES[name][3]
    assert np.abs(fa[hidden] - bp[hidden]).max() > 1e-4, "random B left the hidden gradient at BP's"
    # B = W: backprop, to the last bit.
    model.fa_feedback.set_value(dataclasses.replace(feedback, weights={p: params[p] for p in feedback.weights}))
    with_w = grads_of(model, x, t)
    for path in bp:
        np.testing.assert_array_equal(with_w[path], bp[path], err_msg=path)


@pytest.mark.parametrize("name", ["lora", "scan"])
def test_usf_through_every_weight_product(name):
    model, plain, x, t = build(name, "usf")
    params = by_path(nnx.state(plain, nnx.Param))
    scales = model.fa_feedback.get_value().weights
    B = {p: jnp.sign(params[p]) * jnp.reshape(s, s.shape + (1,) * (params[p].ndim - s.ndim)) for p, s in scales.items()}
    got = grads_of(model, x, t)
    assert_close(got, twin_grads(name, params, x, t, B))
    hidden = CASES[name][3]
    assert np.abs(got[hidden] - grads_of(plain, x, t)[hidden]).max() > 1e-4


@pytest.mark.parametrize("name", ["lora", "tied", "conv_transpose", "scan", "remat"])
def test_dfa_cuts_every_layer_and_agrees_with_the_core(name):
    model, plain, x, t = build(name, "dfa")
    feedback = model.fa_feedback.get_value()
    assert feedback.layout.taps
    if name == "scan":  # one tap per scanned layer, each with its own B_l
        assert [(tap.name, tap.stack) for tap in feedback.layout.taps] == [
            ("blocks/lin/kernel:in", (3,)),
            ("out/kernel:in", ()),
        ]
    bp = grads_of(plain, x, t)
    dfa = grads_of(model, x, t)
    hidden, last = CASES[name][3], CASES[name][4]
    assert np.abs(dfa[hidden] - bp[hidden]).max() > 1e-4
    if last is not None:
        np.testing.assert_allclose(dfa[last], bp[last], rtol=1e-5, atol=1e-7)
    graphdef, params = nnx.split(plain)
    core = fj.value_and_grad(lambda p, x: nnx.merge(graphdef, p)(x), mse, "dfa")
    assert_close(dfa, by_path(core(params, feedback, x, t)[1]))
    if name == "scan":
        pure_graphdef, pure_params, state = fnnx.split(model)
        pure = jax.jit(fnnx.value_and_grad(pure_graphdef, mse), compiler_options=FAST)(pure_params, state, x, t)[1]
        assert_close(dfa, by_path(pure))


def test_plan_of_a_converted_model_lists_the_tied_table_once_as_feedback():
    _, plain, x, _ = build("tied", "fa")
    graphdef, params = nnx.split(plain)
    text = str(fj.plan(lambda p, x: nnx.merge(graphdef, p)(x), params, x, "fa"))
    assert "embed/embedding" in text and "feedback" in text
