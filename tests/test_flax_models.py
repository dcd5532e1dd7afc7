"""Macro and micro DFA taps on small Transformers (NNX and Linen) whose modules are called with keyword arguments.

Launay et al. 2020: ``macro`` taps each block's output, ``micro`` also each attention
module's output inside the block. Below the last tap nothing is backpropagated from the
output; after it (final LayerNorm, head) the gradient is exactly backprop's.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import fa_jax.linen as flinen
import fa_jax.nnx as fnnx
from fa_jax._feedback import by_path
from flax_models import Block, LinenBlock, LinenTransformer, Transformer

VOCAB, SEQ, DIM = 16, 6, 8
RNG = np.random.default_rng(0)
# These programs are small; compiling them is what costs, and an unoptimised XLA backend halves that.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOKENS = RNG.integers(0, VOCAB, (3, SEQ)).astype(np.int32)
TARGETS = RNG.integers(0, VOCAB, (3, SEQ)).astype(np.int32)


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def small():
    """The Transformer with NumPy-drawn values: its shapes come from nnx.eval_shape, no initializer compiles."""
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: Transformer(vocab=VOCAB, seq=SEQ, dim=DIM, heads=2, depth=1, rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(1)
    return nnx.merge(graphdef, jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), state))


@nnx.jit
def nnx_grads(model):
    return nnx.value_and_grad(lambda m: xent(m(TOKENS), TARGETS))(model)


EXPECTED = {"macro": ["blocks/0"], "micro": ["blocks/0/attn", "blocks/0"]}


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


def test_linen_transformer_micro_taps():
    model = LinenTransformer(vocab=VOCAB, seq=SEQ, dim=DIM, heads=2, depth=1)
    variables = jax.jit(model.init)(jax.random.key(0), TOKENS)
    adapted = flinen.adapt(model, "dfa", taps="micro", blocks=LinenBlock)  # macro: tests/test_linen.py
    feedback = adapted.init_feedback(variables, TOKENS, key=jax.random.key(1))
    names = [t.name for t in feedback.layout.taps]
    assert names == ["LinenBlock_0/MultiHeadDotProductAttention_0", "LinenBlock_0"]
    grad = jax.jit(jax.grad(lambda p, f: xent(adapted.apply({"params": p}, f, TOKENS), TARGETS)), compiler_options=FAST)
    got = by_path(grad(variables["params"], feedback))
    bp = jax.jit(jax.grad(lambda p: xent(model.apply({"params": p}, TOKENS), TARGETS)), compiler_options=FAST)
    bp = by_path(bp(variables["params"]))
    for path in ("Dense_0/kernel", "LayerNorm_0/scale"):
        np.testing.assert_allclose(got[path], bp[path], rtol=1e-5, atol=1e-7, err_msg=path)
    assert np.abs(got["LinenBlock_0/Dense_0/kernel"] - bp["LinenBlock_0/Dense_0/kernel"]).max() > 1e-5
