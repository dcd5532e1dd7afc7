"""Unmodified models from plain JAX, Equinox, Flax NNX and Flax Linen, trained under several rules.

    python benchmarks/real_models.py            # 300 steps each, every model x bp, fa, dfa, usf
    python benchmarks/real_models.py --quick    # a smoke run

Each model is written the way its framework's docs write it, with nothing from fa_jax inside
(the NNX one holds LoRA layers and a tied head, the Linen one boxed params and dropout, the
plain-JAX Transformer a ``lax.scan`` over stacked blocks). fa_jax reads each program; the table
gives the training loss at the start and the end (the mean of the first and last 20 steps),
and the test accuracy, on real data that ships with scikit-learn (the 8×8 digits) and, for the
language model, CPython's own ``textwrap.py``. It writes ``benchmarks/results/real_models.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap as textwrap_module
import time

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import fa_jax as fj
import fa_jax.linen
import fa_jax.nnx

HERE = os.path.dirname(os.path.abspath(__file__))
RULES = ("bp", "fa", "dfa", "usf")


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def digits():
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], data.target[order].astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


# --- the models, as their frameworks write them -----------------------------------------------


def plain_mlp():
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = [64, 128, 128, 10]
    params = [
        {"w": jax.random.normal(k, (m, n)) / m**0.5, "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def model(p, x):
        h = x.reshape(x.shape[0], -1)
        for layer in p[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return h @ p[-1]["w"] + p[-1]["b"]

    return params, model


def plain_cnn():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "c1": jax.random.normal(k1, (16, 1, 3, 3)) / 3,
        "c2": jax.random.normal(k2, (32, 16, 3, 3)) / 12,
        "w": jax.random.normal(k3, (32 * 4 * 4, 10)) / 23,
    }

    def model(p, x):  # NCHW, OIHW: lax.conv's defaults
        h = jax.nn.relu(jax.lax.conv(x[:, None], p["c1"], (1, 1), "SAME"))
        h = jax.nn.relu(jax.lax.conv(h, p["c2"], (2, 2), "SAME"))
        return h.reshape(h.shape[0], -1) @ p["w"]

    return params, model


def scanned_mlp():
    """Four equal hidden layers stacked and run by ``lax.scan`` (one feedback per layer)."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "inp": jax.random.normal(k1, (64, 64)) / 8,
        "stack": jax.random.normal(k2, (4, 64, 64)) / 8,
        "out": jax.random.normal(k3, (64, 10)) / 8,
    }

    def model(p, x):
        h = jnp.tanh(x.reshape(x.shape[0], -1) @ p["inp"])
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"])
        return h @ p["out"]

    return params, model


def equinox_mlp():
    net = eqx.nn.MLP(64, 10, 128, 2, activation=jax.nn.relu, key=jax.random.key(0))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x.reshape(x.shape[0], -1))


def equinox_cnn():
    keys = jax.random.split(jax.random.key(0), 3)
    net = [
        eqx.nn.Conv2d(1, 16, 3, padding=1, key=keys[0]),
        eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=keys[1]),
        eqx.nn.Linear(32 * 4 * 4, 10, key=keys[2]),
    ]
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def model(p, x):
        c1, c2, lin = eqx.combine(p, static)
        return jax.vmap(lambda img: lin(jax.nn.relu(c2(jax.nn.relu(c1(img[None])))).reshape(-1)))(x)

    return params, model


class LoRAClassifier(nnx.Module):
    """LoRA adapters on a frozen-size base, an embedding table reused as the output head (tied)."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(64, 32, rngs=rngs)
        self.lora = nnx.LoRALinear(32, 32, lora_rank=4, rngs=rngs)
        self.classes = nnx.Embed(10, 32, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.inp(x.reshape(x.shape[0], -1)))
        h = jax.nn.relu(self.lora(h))
        return self.classes.attend(h)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        dense = lambda n: nn.Dense(
            n, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("in", "out"))
        )
        h = nn.relu(dense(128)(x.reshape(x.shape[0], -1)))
        h = nn.Dropout(0.1, deterministic=not train)(h)
        return dense(10)(nn.relu(dense(128)(h)))


def plain_transformer(vocab, d=32, seq=32, layers=2):
    ks = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda shape, fan: jax.random.normal(next(ks), shape) / fan**0.5
    params = {
        "embed": normal((vocab, d), d),
        "pos": normal((seq, d), d),
        "blocks": {
            "scale": jnp.ones((layers, d)),
            "qkv": normal((layers, d, 3 * d), d),
            "out": normal((layers, d, d), d),
            "up": normal((layers, d, 4 * d), d),
            "down": normal((layers, 4 * d, d), 4 * d),
        },
    }

    def model(p, ids):
        t = ids.shape[1]
        h = p["embed"][ids] + p["pos"][:t]

        def block(h, q):
            n = h - h.mean(-1, keepdims=True)
            n = n * jax.lax.rsqrt((n * n).mean(-1, keepdims=True) + 1e-6) * q["scale"]
            qs, ks_, vs = jnp.split(n @ q["qkv"], 3, axis=-1)
            scores = jnp.einsum("bqd,bkd->bqk", qs, ks_) / d**0.5
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
            h = h + jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores), vs) @ q["out"]
            return fj.tap(h + jax.nn.gelu(h @ q["up"]) @ q["down"], "block"), None

        h, _ = jax.lax.scan(block, h, p["blocks"])
        return h @ p["embed"].T  # tied head

    return params, model


# --- training ---------------------------------------------------------------------------------


def train(name, params, model, rule, batches, evaluate, steps, learning_rate):
    feedback = fj.init_feedback(rule, params, key=jax.random.key(1), model=model, inputs=batches(0)[0])
    grad_fn = fj.value_and_grad(model, cross_entropy, rule)
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(p, s, fb, t, x, y):
        value, grads = grad_fn(p, fb, x, y, step=t)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, fj.update_feedback(rule, fb, updates, p), value

    state, losses = tx.init(params), []
    for t in range(steps):
        x, y = batches(t)
        params, state, feedback, value = step(params, state, feedback, t, x, y)
        losses.append(float(value))
    window = max(1, min(20, steps // 5))
    return {
        "model": name,
        "rule": rule,
        "loss_start": float(np.mean(losses[:window])),
        "loss_end": float(np.mean(losses[-window:])),
        "metric": float(evaluate(params, model)),
        "finite": bool(np.isfinite(losses).all()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "real_models.json"))
    args = parser.parse_args(argv)
    steps = 6 if args.quick else args.steps
    (x_train, y_train), (x_test, y_test) = digits()

    def digit_batches(t, size=64):
        rows = np.random.default_rng(t).integers(0, len(x_train), size)
        return jnp.asarray(x_train[rows]), jnp.asarray(y_train[rows])

    def accuracy(params, model):
        return jnp.mean(jnp.argmax(model(params, jnp.asarray(x_test)), -1) == y_test)

    nnx_model = LoRAClassifier(nnx.Rngs(0))
    graphdef, nnx_params, nnx_rest = nnx.split(nnx_model, nnx.Param, ...)
    linen = LinenNet()
    linen_params = linen.init(jax.random.key(0), jnp.ones((1, 8, 8)))["params"]
    models = {
        "plain JAX MLP (relu)": plain_mlp(),
        "plain JAX CNN (NCHW)": plain_cnn(),
        "plain JAX lax.scan stack": scanned_mlp(),
        "Equinox MLP": equinox_mlp(),
        "Equinox CNN": equinox_cnn(),
        "NNX LoRA + tied head": (nnx_params, lambda p, x: nnx.merge(graphdef, p, nnx_rest)(x)),
        "Linen boxed + dropout": (
            linen_params,
            lambda p, x: linen.apply({"params": p}, x, rngs={"dropout": jax.random.key(3)}),
        ),
    }
    text = open(textwrap_module.__file__).read()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    split = int(0.9 * len(ids))

    def text_batches(t, size=32, seq=32):
        starts = np.random.default_rng(t).integers(0, split - seq - 1, size)
        window = np.stack([ids[s : s + seq + 1] for s in starts])
        return jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])

    def bits_per_char(params, model):
        starts = np.arange(split, len(ids) - 33, 32)[:64]
        window = np.stack([ids[s : s + 33] for s in starts])
        logits = model(params, jnp.asarray(window[:, :-1]))
        return cross_entropy(logits, jnp.asarray(window[:, 1:])) / np.log(2)

    rows = []
    started = time.perf_counter()
    for name, (params, model) in models.items():
        for rule in RULES:
            rows.append(train(name, params, model, rule, digit_batches, accuracy, steps, 1e-3))
            print(
                f"{name:<26} {rule:<6} loss {rows[-1]['loss_start']:.3f} -> {rows[-1]['loss_end']:.3f}  "
                f"test accuracy {rows[-1]['metric']:.3f}",
                flush=True,
            )
    lm_params, lm = plain_transformer(len(chars))
    for rule in RULES:
        rows.append(train("plain JAX Transformer LM", lm_params, lm, rule, text_batches, bits_per_char, steps, 3e-3))
        print(
            f"{'plain JAX Transformer LM':<26} {rule:<6} loss {rows[-1]['loss_start']:.3f} -> "
            f"{rows[-1]['loss_end']:.3f}  valid bits/char {rows[-1]['metric']:.3f}",
            flush=True,
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"steps": steps, "rows": rows, "seconds": time.perf_counter() - started}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
