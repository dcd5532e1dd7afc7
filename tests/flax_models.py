"""Small, ordinary Flax models (NNX and Linen) used by the Flax tests and benchmarks/step_time_flax.py.

Nothing here knows about feedback: these are the "unmodified models" that
``fa_jax.nnx.convert`` and ``fa_jax.linen.adapt`` train with any rule. Sub-modules
are called with keyword arguments where Flax allows it, as real models do.

* ``CNN``: ``(n, 8, 8, 1) -> (n, classes)``: conv-relu-pool, conv-relu, dense.
* ``Transformer``: a causal character model ``(n, seq) int -> (n, seq, vocab)``:
  embedding + learned positions, pre-LayerNorm blocks (attention, MLP, residuals),
  final LayerNorm and a dense head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class CNN(nnx.Module):
    def __init__(self, classes: int = 10, width: int = 8, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 2 * width, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.relu(self.conv2(x))
        return self.head(x.reshape(x.shape[0], -1))


class MLPBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-LN Transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = MLPBlock(dim, rngs=rngs)

    def __call__(self, x):
        causal = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + self.attn(inputs_q=self.ln1(x), mask=causal)
        return x + self.mlp(x=self.ln2(x))


class Transformer(nnx.Module):
    def __init__(
        self, vocab: int = 128, seq: int = 32, dim: int = 32, heads: int = 2, depth: int = 2, *, rngs: nnx.Rngs
    ):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.position = nnx.Param(jax.random.normal(rngs.params(), (seq, dim)) * 0.02)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position[...][: tokens.shape[1]]
        for block in self.blocks:
            x = block(x=x)
        return self.head(self.ln(x))


class LinenCNN(nn.Module):
    classes: int = 10
    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(self.width, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


class LinenBlock(nn.Module):
    heads: int = 2

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(self.heads)(inputs_q=nn.LayerNorm()(x), mask=causal)
        return x + nn.Dense(dim)(nn.gelu(nn.Dense(4 * dim)(nn.LayerNorm()(x))))


class LinenTransformer(nn.Module):
    vocab: int = 128
    seq: int = 32
    dim: int = 32
    heads: int = 2
    depth: int = 2

    @nn.compact
    def __call__(self, tokens):
        position = self.param("position", nn.initializers.normal(0.02), (self.seq, self.dim))
        x = nn.Embed(self.vocab, self.dim)(tokens) + position[: tokens.shape[1]]
        for _ in range(self.depth):
            x = LinenBlock(self.heads)(x=x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))
