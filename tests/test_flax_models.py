"""Unmodified Flax models (a CNN on sklearn digits, a 2-block Transformer on stdlib text) train under FA and DFA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fa_jax
import fa_jax.linen as flinen
import fa_jax.nnx as fnnx
from fa_jax import data
from fa_jax.flax_models import CNN, Block, LinenBlock, LinenCNN, LinenTransformer, Transformer

STEPS = 40


def digit_batches(n=STEPS, size=64):
    d = data.load_digits(seed=0)
    rng = np.random.RandomState(0)
    idx = rng.randint(0, len(d.y_train), (n, size))
    return d.x_train.reshape(-1, 8, 8, 1)[idx].astype(np.float32), d.y_train[idx]


def text_batches(n=STEPS, size=16, seq=32):
    text = data.load_text(("textwrap.py",), max_chars=20000).train
    rng = np.random.RandomState(0)
    starts = rng.randint(0, len(text) - seq - 1, (n, size))
    windows = text[starts[..., None] + np.arange(seq + 1)]
    return windows[..., :-1], windows[..., 1:]


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_nnx(model, batches, lr):
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr)), wrt=nnx.Param)
    before = jax.tree.map(np.array, fnnx.feedback_of(model))

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for x, y in zip(*batches)]
    for a, b in zip(jax.tree.leaves(fnnx.feedback_of(model)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    return losses


def train_linen(adapted, variables, feedback, batches, lr):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    params, state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: xent(adapted.apply({"params": p}, feedback, x), y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for x, y in zip(*batches):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    return losses


def falls(losses, fraction):
    start, end = np.mean(losses[:3]), np.mean(losses[-3:])
    assert np.all(np.isfinite(losses))
    assert end < fraction * start, (start, end)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_nnx_cnn_trains_on_digits(rule):
    batches = digit_batches()
    model = fnnx.convert(CNN(rngs=nnx.Rngs(0)), rule, key=jax.random.key(1), inputs=batches[0][0])
    if rule == "dfa":  # taps on the feature map conv2 reads and on the flattened map the head reads
        assert [(t.name, t.shape) for t in model.fa_taps] == [("conv2:in", (4, 4, 8)), ("head:in", (256,))]
    falls(train_nnx(model, batches, 1e-2), 0.5)


@pytest.mark.parametrize("rule,taps", [("fa", None), ("dfa", "macro")])
def test_nnx_transformer_trains_on_text(rule, taps):
    batches = text_batches()
    model = Transformer(rngs=nnx.Rngs(0))
    rule_value = fa_jax.DFA(batch_dims=2) if rule == "dfa" else rule
    fnnx.convert(model, rule_value, key=jax.random.key(1), inputs=batches[0][0], taps=taps or "layer", blocks=Block)
    falls(train_nnx(model, batches, 3e-3 if rule == "dfa" else 1e-2), 0.8)


def test_nnx_transformer_micro_taps_attention_inside_blocks():
    tokens = text_batches(n=1)[0][0]
    model = fnnx.convert(Transformer(rngs=nnx.Rngs(0)), fa_jax.DFA(batch_dims=2), key=jax.random.key(1),
                         inputs=tokens, taps="micro", blocks=Block)
    assert [t.name for t in model.fa_taps] == ["blocks/0/attn", "blocks/0", "blocks/1/attn", "blocks/1"]
    assert model.fa_dfa_feedback.shape == (128, 4 * 32)


def test_nnx_transformer_layer_taps_cover_every_weight_layer():
    tokens = text_batches(n=1)[0][0]
    model = fnnx.convert(Transformer(rngs=nnx.Rngs(0)), fa_jax.DFA(batch_dims=2), key=jax.random.key(1), inputs=tokens)
    names = [t.name for t in model.fa_taps]
    assert len(names) == 2 * 6 + 1  # q, k, v, out, up, down per block, and the head
    assert names[:4] == ["blocks/0/attn/query:in", "blocks/0/attn/key:in", "blocks/0/attn/value:in", "blocks/0/attn/out:in"]
    x, y = text_batches(n=1)
    _, grads = nnx.jit(nnx.value_and_grad(lambda m: xent(m(x[0]), y[0])))(model)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))  # every param receives a signal


def test_shallow_trains_only_the_output_layer():
    batches = digit_batches(n=3)
    model = fnnx.convert(CNN(rngs=nnx.Rngs(0)), "shallow", inputs=batches[0][0])
    _, grads = nnx.jit(nnx.value_and_grad(lambda m: xent(m(batches[0][0]), batches[1][0])))(model)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        is_head = "head" in jax.tree_util.keystr(path)
        assert (float(jnp.abs(g).sum()) > 0) == is_head, path


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_linen_cnn_trains_on_digits(rule):
    batches = digit_batches()
    model = LinenCNN()
    variables = model.init(jax.random.key(0), batches[0][0])
    adapted = flinen.adapt(model, rule)
    feedback = adapted.init_feedback(variables, batches[0][0], key=jax.random.key(1))
    falls(train_linen(adapted, variables, feedback, batches, 1e-2), 0.5)


@pytest.mark.parametrize("rule,taps", [("dfa", "macro")])  # Linen FA through attention: test_linen.py
def test_linen_transformer_trains_on_text(rule, taps):
    batches = text_batches()
    model = LinenTransformer()
    variables = model.init(jax.random.key(0), batches[0][0])
    adapted = flinen.adapt(model, fa_jax.DFA(batch_dims=2) if rule == "dfa" else rule, taps=taps or "layer",
                           blocks=LinenBlock)
    feedback = adapted.init_feedback(variables, batches[0][0], key=jax.random.key(1))
    if taps == "macro":
        assert [t.name for t in feedback.taps] == ["LinenBlock_0", "LinenBlock_1"]
    falls(train_linen(adapted, variables, feedback, batches, 3e-3 if rule == "dfa" else 1e-2), 0.8)


def test_linen_micro_taps_attention_inside_blocks():
    tokens = text_batches(n=1)[0][0]
    model = LinenTransformer()
    variables = model.init(jax.random.key(0), tokens)
    adapted = flinen.adapt(model, fa_jax.DFA(batch_dims=2), taps="micro", blocks=LinenBlock)
    feedback = adapted.init_feedback(variables, tokens, key=jax.random.key(1))
    assert [t.name for t in feedback.taps] == [
        "LinenBlock_0/MultiHeadDotProductAttention_0", "LinenBlock_0",
        "LinenBlock_1/MultiHeadDotProductAttention_0", "LinenBlock_1"]


def readme_snippet(section):
    """The first ```python block under ``## <section>`` in README.md."""
    import pathlib

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 20, section
    return code


@pytest.mark.parametrize("section", ["Flax NNX", "Flax Linen"])
def test_readme_snippet_runs_and_trains(section):
    namespace = {}
    exec(compile(readme_snippet(section), f"README {section}", "exec"), namespace)
    assert float(namespace["loss"]) < 0.8 * np.log(3)  # started near ln 3, the loss of a uniform guess
