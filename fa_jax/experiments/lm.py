"""Character-level language model: a small causal Transformer on CPython standard-library sources.

Corpus: :data:`fa_jax.experiments.data.STDLIB_FILES` from the running interpreter (ASCII
bytes, vocabulary 128); the last 10% is the test text. Model: token + position
embeddings, ``layers`` pre-norm blocks (causal self-attention, GELU MLP), a
linear head. With DFA each block's output is tapped (the "macro" placement of
Launay et al. 2020) and the per-token loss makes taps ``(batch, seq, d)``:
the engine finds ``batch_dims = 2`` (the batch and position axes), so DFA
and DRTP project each token's error or target on its own. Metric: bits per character on the
test text, beside a unigram model's (character frequencies of the training text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import apply, tap
from fa_jax.experiments import data as datasets
from fa_jax.experiments._task import (
    Task,
    check_count,
    check_runner_defaults,
    check_split,
    cross_entropy,
    describe_optimizer,
    holdout,
    make_optimizer,
    metric_name,
    protocol_options,
)


def init_transformer(vocab: int, d: int, layers: int, seq: int, *, key: jax.Array) -> dict:
    """Params: ``embed (vocab, d)``, ``pos (seq, d)``, per block ``qkv (d, 3d)``, ``proj (d, d)``,
    ``up (d, 4d)``, ``down (4d, d)`` (+ biases), ``head (d, vocab)``."""
    keys = iter(jax.random.split(key, 3 + 4 * layers))
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape) / np.sqrt(fan_in)
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


TAPS = ("macro", "micro")
#: The default recipe: Adam 3e-3 for every rule.
DEFAULTS = {"learning_rate": 3e-3, "b2": 0.999, "weight_decay": 0.0, "plateau": 1.0}
#: ``recipe="paper"``: BP's Adam β2 0.98 for rules that keep backpropagation between layers; for rules
#: that cut at taps a lower step, β2 0.999 and reduce-on-plateau (Launay et al. 2020, appendix).
PAPER = {"other": {"b2": 0.98}, "cuts": {"learning_rate": 1e-3, "b2": 0.999, "plateau": 0.5}}


def transformer(heads: int, taps: str = "macro"):
    """``model(params, tokens (b, t)) -> logits (b, t, vocab)``.

    ``taps="macro"``: each block's output is tapped ``block_<i>``; ``"micro"``: the residual
    stream after attention (``block_<i>_attention``) and after the MLP (``block_<i>_mlp``).
    """
    micro = taps == "micro"

    def model(params, tokens):
        t = tokens.shape[-1]
        x = params["embed"][tokens] + params["pos"][:t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for index, block in enumerate(params["blocks"]):
            q, k, v = jnp.split(_dense(_norm(x), block["qkv"]), 3, axis=-1)
            split = lambda a: a.reshape(*a.shape[:-1], heads, -1)
            q, k, v = split(q), split(k), split(v)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
            attention = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(x.shape)
            x = x + _dense(mixed, block["proj"])
            if micro:
                x = tap(x, name=f"block_{index}_attention")
            hidden = jax.nn.gelu(_dense(_norm(x), block["up"]))
            x = tap(x + _dense(hidden, block["down"]), name=f"block_{index}_mlp" if micro else f"block_{index}")
        return _dense(_norm(x), params["head"])

    return model


def unigram_bits(train: np.ndarray, valid: np.ndarray, vocab: int) -> float:
    """Bits per character of add-one-smoothed training character frequencies on ``valid``."""
    counts = np.bincount(train, minlength=vocab) + 1.0
    return float(-np.mean(np.log2(counts / counts.sum())[valid]))


def make_task(
    *,
    d: int = 32,
    layers: int = 2,
    heads: int = 2,
    seq: int = 32,
    taps: str = "macro",
    batch_size: int = 16,
    learning_rate: float | None = None,
    b2: float | None = None,
    weight_decay: float | None = None,
    plateau: float | None = None,
    recipe: str = "default",
    rule=None,
    split: str = "test",
    max_chars: int | None = 200_000,
    valid_windows: int = 64,
    steps: int = 400,
    eval_every: int = 100,
    seeds: int = 4,
) -> Task:
    """The LM task: d=32, 2 blocks, 2 heads, context 32, batch 16, Adam 3e-3, 400 steps.

    The last 10% of the corpus is the test text. ``split="validation"`` trains on the first
    90% of the training text and scores the last 10% of it (the test text is not in its
    data). Optimizer options and ``recipe="paper"``: see the module docstring and
    :func:`fa_jax.experiments._task.protocol_options`.

    Raises:
      TypeError, ValueError: a bad option, named.
    """
    d, layers, heads, seq = (
        check_count(v, k) for k, v in (("d", d), ("layers", layers), ("heads", heads), ("seq", seq))
    )
    if d % heads:
        raise ValueError(f"heads: {heads} heads must divide d={d}")
    if taps not in TAPS:
        raise ValueError(f"taps: expected one of {TAPS}, given {taps!r}")
    batch_size, valid_windows = check_count(batch_size, "batch_size"), check_count(valid_windows, "valid_windows")
    if max_chars is not None:
        max_chars = check_count(max_chars, "max_chars", minimum=2 * (seq + 1) * 10)
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    split = check_split(split)
    optimizer = protocol_options(
        "lm",
        recipe=recipe,
        rule=rule,
        learning_rate=learning_rate,
        b2=b2,
        weight_decay=weight_decay,
        plateau=plateau,
        eval_every=eval_every,
        default=DEFAULTS,
        paper=PAPER,
    )
    text = datasets.load_text(max_chars=max_chars)
    train, scored = text.train, text.valid
    if split == "validation":  # the end of the training text; the test text never enters
        held = holdout(len(train), "split='validation'")
        train, scored = train[:-held], train[-held:]
    if len(scored) < seq + 2:
        raise ValueError(
            f"max_chars: {max_chars} characters leave {len(scored)} to score, fewer than a context of {seq} + 2"
        )
    starts = np.linspace(0, len(scored) - seq - 1, valid_windows).astype(np.int32)
    arrays = {
        "train": jnp.asarray(train),
        "scored": jnp.asarray(np.stack([scored[s : s + seq + 1] for s in starts])),
    }
    net = transformer(heads, taps)
    n_windows = len(train) - seq - 1

    def batch(data, key, step):
        starts = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, n_windows)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data["train"], s, seq + 1))(starts)
        return windows[:, :-1], windows[:, 1:]

    def evaluate(params, data):
        logits = apply(net, params, data["scored"][:, :-1])
        return cross_entropy(logits, data["scored"][:, 1:]) / np.log(2.0)

    what = "test" if split == "test" else "validation (held out of training)"
    return Task(
        name="lm",
        metric=metric_name("test_bits_per_char", split),
        higher_is_better=False,
        data=arrays,
        init_params=lambda *, key: init_transformer(text.vocab_size, d, layers, seq, key=key),
        model=net,
        loss=cross_entropy,
        batch=batch,
        evaluate=evaluate,
        optimizer=make_optimizer(optimizer),
        steps=steps,
        eval_every=eval_every,
        seeds=seeds,
        baselines={"unigram": unigram_bits(train, scored, text.vocab_size)},
        description=f"CPython stdlib sources ({len(train):,} train / {len(scored):,} {what} chars, "
        f"{len(text.files)} files), Transformer d={d} x{layers} blocks, {heads} heads, context {seq}, {taps} taps, "
        f"{describe_optimizer(optimizer)}, batch {batch_size}",
        options={
            "d": d,
            "layers": layers,
            "heads": heads,
            "seq": seq,
            "taps": taps,
            "batch_size": batch_size,
            "max_chars": max_chars,
            "valid_windows": valid_windows,
            "split": split,
            **optimizer,
        },
    )
