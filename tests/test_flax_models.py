"""Macro and micro DFA taps on small Transformers (NNX and Linen) whose modules are called with keyword arguments.

Launay et al. 2020: ``macro`` taps each block's output, ``micro`` also each attention
module's output inside the block. Below the last tap nothing is backpropagated from the
output; after it (final LayerNorm, head) the gradient is exactly backprop's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fa_jax as fj
import fa_jax.linen as flinen
import fa_jax.nnx as fnnx
from fa_jax._feedback import by_path
from flax_models import CNN, Block, LinenBlock, LinenCNN, LinenTransformer, Transformer

VOCAB, SEQ, DIM = 16, 6, 8
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, VOCAB, (3, SEQ)).astype(np.int32)
TARGETS = RNG.integers(0, VOCAB, (3, SEQ)).astype(np.int32)


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def small():
    return Transformer(vocab=VOCAB, seq=SEQ, dim=DIM, heads=2, depth=2, rngs=nnx.Rngs(0))


@nnx.jit
def nnx_grads(model):
    return nnx.value_and_grad(lambda m: xent(m(TOKENS), TARGETS))(model)


EXPECTED = {
    "macro": ["blocks/0", "blocks/1"],
    "micro": ["blocks/0/attn", "blocks/0", "blocks/1/attn", "blocks/1"],
}


@pytest.mark.parametrize("taps", ["macro", "micro"])
def test_nnx_transformer_module_taps(taps):
    model = fnnx.convert(small(), "dfa", key=jax.random.key(1), inputs=TOKENS, taps=taps, blocks=Block)
    feedback = model.fa_feedback.get_value()
    assert [t.name for t in feedback.layout.taps] == EXPECTED[taps]
    assert all(t.shape == (DIM,) for t in feedback.layout.taps) and feedback.layout.batch_dims == 2  # per token
    assert type(model.blocks[0]).__name__ == "TappedBlock" and isinstance(model.blocks[0], Block)
    _, got = nnx_grads(model)
    _, bp = nnx_grads(small())
    got, bp = by_path(got), by_path(bp)
    for path in ("head/kernel", "head/bias", "ln/scale"):  # after the last tap: backprop
        np.testing.assert_allclose(got[path], bp[path], rtol=1e-5, atol=1e-7, err_msg=path)
    for path in ("blocks/0/mlp/up/kernel", "embed/embedding", "position"):
        assert np.abs(got[path] - bp[path]).max() > 1e-5, path
    if taps == "micro":  # the pure path cuts at the same marks
        graphdef, params, state = fnnx.split(model)
        _, pure = jax.jit(fnnx.value_and_grad(graphdef, xent))(params, state, TOKENS, TARGETS)
        for path, value in by_path(pure).items():
            np.testing.assert_allclose(value, got[path], rtol=1e-5, atol=1e-7, err_msg=path)


def test_nnx_transformer_trains_under_dfa_macro():
    model = fnnx.convert(small(), fj.DFA(), key=jax.random.key(1), inputs=TOKENS, taps="macro", blocks=["blocks/0",
                                                                                                         "blocks/1"])
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = jax.tree.map(np.asarray, fnnx.feedback_of(model))

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(lambda m: xent(m(TOKENS), TARGETS))(m)
        fnnx.optimizer_update(opt, m, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses
    for a, b in zip(jax.tree.leaves(fnnx.feedback_of(model)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("taps", ["macro", "micro"])
def test_linen_transformer_module_taps(taps):
    model = LinenTransformer(vocab=VOCAB, seq=SEQ, dim=DIM, heads=2, depth=2)
    variables = model.init(jax.random.key(0), TOKENS)
    adapted = flinen.adapt(model, "dfa", taps=taps, blocks=LinenBlock)
    feedback = adapted.init_feedback(variables, TOKENS, key=jax.random.key(1))
    names = [t.name for t in feedback.layout.taps]
    if taps == "macro":
        assert names == ["LinenBlock_0", "LinenBlock_1"]
    else:
        attention = "MultiHeadDotProductAttention_0"
        assert names == [f"LinenBlock_0/{attention}", "LinenBlock_0", f"LinenBlock_1/{attention}", "LinenBlock_1"]
    grad = jax.jit(jax.grad(lambda p, f: xent(adapted.apply({"params": p}, f, TOKENS), TARGETS)))
    got = by_path(grad(variables["params"], feedback))
    bp = by_path(jax.jit(jax.grad(lambda p: xent(model.apply({"params": p}, TOKENS), TARGETS)))(variables["params"]))
    for path in ("Dense_0/kernel", "LayerNorm_0/scale"):
        np.testing.assert_allclose(got[path], bp[path], rtol=1e-5, atol=1e-7, err_msg=path)
    assert np.abs(got["LinenBlock_0/Dense_0/kernel"] - bp["LinenBlock_0/Dense_0/kernel"]).max() > 1e-5


def test_cnn_layer_taps_nnx_and_linen():
    x = RNG.standard_normal((4, 8, 8, 1)).astype(np.float32)
    model = fnnx.convert(CNN(width=2, rngs=nnx.Rngs(0)), "dfa", key=jax.random.key(1), inputs=x)
    assert [t.name for t in model.fa_feedback.get_value().layout.taps] == ["conv2/kernel:in", "head/kernel:in"]
    linen = LinenCNN(width=2)
    variables = linen.init(jax.random.key(0), x)
    feedback = flinen.adapt(linen, "dfa").init_feedback(variables, x, key=jax.random.key(1))
    assert [t.name for t in feedback.layout.taps] == ["Conv_1/kernel:in", "Dense_0/kernel:in"]
    assert feedback.layout.taps[0].shape == (4, 4, 2)  # a feature map, after the batch dim
