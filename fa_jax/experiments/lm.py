"""Character-level language model: a small causal Transformer on CPython standard-library sources.

Corpus: :data:`fa_jax.experiments.data.STDLIB_FILES` from the running interpreter (ASCII
bytes, vocabulary 128); the last 10% is validation. Model: token + position
embeddings, ``layers`` pre-norm blocks (causal self-attention, GELU MLP), a
linear head. With DFA each block's output is tapped (the "macro" placement of
Launay et al. 2020) and the per-token loss makes taps ``(batch, seq, d)``:
the engine finds ``batch_dims = 2`` (the batch and position axes), so DFA
and DRTP project each token's error or target on its own. Metric: validation bits per character, beside a
unigram model's (character frequencies of the training text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fa_jax import apply, tap
from fa_jax.experiments import data as datasets
from fa_jax.experiments._task import Task, check_count, check_positive_float, check_runner_defaults, cross_entropy


def init_transformer(vocab: int, d: int, layers: int, seq: int, *, key: jax.Array) -> dict:
    """Params: ``embed (vocab, d)``, ``pos (seq, d)``, per block ``qkv (d, 3d)``, ``proj (d, d)``,
    ``up (d, 4d)``, ``down (4d, d)`` (+ biases), ``head (d, vocab)``."""
    keys = iter(jax.random.split(key, 3 + 4 * layers))
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape) / np.sqrt(fan_in)  # noqa: E731
    blocks = [
        {
            "qkv": {"kernel": normal(next(keys), (d, 3 * d), d), "bias": jnp.zeros(3 * d)},
            "proj": {"kernel": normal(next(keys), (d, d), d), "bias": jnp.zeros(d)},
            "up": {"kernel": normal(next(keys), (d, 4 * d), d), "bias": jnp.zeros(4 * d)},
            "down": {"kernel": normal(next(keys), (4 * d, d), 4 * d), "bias": jnp.zeros(d)},
        }
        for _ in range(layers)
    ]
    return {
        "embed": 0.1 * jax.random.normal(next(keys), (vocab, d)),
        "pos": 0.1 * jax.random.normal(next(keys), (seq, d)),
        "blocks": blocks,
        "head": {"kernel": normal(next(keys), (d, vocab), d), "bias": jnp.zeros(vocab)},
    }


def _norm(x):
    return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)


def _dense(x: jax.Array, layer: dict) -> jax.Array:
    """``x W + b`` over any leading dims: ``(..., d_in) -> (..., d_out)``."""
    return x @ layer["kernel"] + layer["bias"]


def transformer(heads: int):
    """``model(params, tokens (b, t)) -> logits (b, t, vocab)``; each block's output is tapped ``block_<i>``."""

    def model(params, tokens):
        t = tokens.shape[-1]
        x = params["embed"][tokens] + params["pos"][:t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for index, block in enumerate(params["blocks"]):
            q, k, v = jnp.split(_dense(_norm(x), block["qkv"]), 3, axis=-1)
            split = lambda a: a.reshape(*a.shape[:-1], heads, -1)  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
            attention = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(x.shape)
            x = x + _dense(mixed, block["proj"])
            hidden = jax.nn.gelu(_dense(_norm(x), block["up"]))
            x = tap(x + _dense(hidden, block["down"]), name=f"block_{index}")
        return _dense(_norm(x), params["head"])

    return model


def unigram_bits(train: np.ndarray, valid: np.ndarray, vocab: int) -> float:
    """Bits per character of add-one-smoothed training character frequencies on ``valid``."""
    counts = np.bincount(train, minlength=vocab) + 1.0
    return float(-np.mean(np.log2(counts / counts.sum())[valid]))


def make_task(
    *, d: int = 32, layers: int = 2, heads: int = 2, seq: int = 32, batch_size: int = 16, learning_rate: float = 3e-3,
    max_chars: int | None = 200_000, valid_windows: int = 64, steps: int = 400, eval_every: int = 100, seeds: int = 4,
) -> Task:
    """The LM task: d=32, 2 blocks, 2 heads, context 32, batch 16, Adam 3e-3, 400 steps.

    Raises:
      TypeError, ValueError: a bad option, named.
    """
    d, layers, heads, seq = (check_count(v, k) for k, v in (("d", d), ("layers", layers), ("heads", heads), ("seq", seq)))
    if d % heads:
        raise ValueError(f"heads: {heads} heads must divide d={d}")
    batch_size, valid_windows = check_count(batch_size, "batch_size"), check_count(valid_windows, "valid_windows")
    learning_rate = check_positive_float(learning_rate, "learning_rate")
    if max_chars is not None:
        max_chars = check_count(max_chars, "max_chars", minimum=2 * (seq + 1) * 10)
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    text = datasets.load_text(max_chars=max_chars)
    starts = np.linspace(0, len(text.valid) - seq - 1, valid_windows).astype(np.int32)
    arrays = {
        "train": jnp.asarray(text.train),
        "valid": jnp.asarray(np.stack([text.valid[s : s + seq + 1] for s in starts])),
    }
    net = transformer(heads)
    n_windows = len(text.train) - seq - 1

    def batch(data, key, step):
        starts = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, n_windows)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data["train"], s, seq + 1))(starts)
        return windows[:, :-1], windows[:, 1:]

    def evaluate(params, data):
        logits = apply(net, params, data["valid"][:, :-1])
        return cross_entropy(logits, data["valid"][:, 1:]) / np.log(2.0)

    return Task(
        name="lm", metric="valid_bits_per_char", higher_is_better=False, data=arrays,
        init_params=lambda *, key: init_transformer(text.vocab_size, d, layers, seq, key=key), model=net,
        loss=cross_entropy, batch=batch, evaluate=evaluate, optimizer=optax.adam(learning_rate),
        steps=steps, eval_every=eval_every, seeds=seeds,
        baselines={"unigram": unigram_bits(text.train, text.valid, text.vocab_size)},
        description=f"CPython stdlib sources ({len(text.train):,} train / {len(text.valid):,} valid chars, "
        f"{len(text.files)} files), Transformer d={d} x{layers} blocks, {heads} heads, context {seq}, "
        f"Adam {learning_rate}, batch {batch_size}",
        options={"d": d, "layers": layers, "heads": heads, "seq": seq, "batch_size": batch_size,
                 "learning_rate": learning_rate, "max_chars": max_chars, "valid_windows": valid_windows},
    )
