"""Any JAX model, unmodified: the engine reads the program and routes every weight product.

References here are independent of the engine: layer-by-layer backward passes written with
``jax.vjp`` of single layers (B in place of W for the input gradient), unrolled twins of
scanned models, and NumPy closed forms (tests/reference.py).
"""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fa_jax as fj
from closed_forms import CLOSED_FORMS
from fa_jax.models import init_mlp, mlp


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def as_bp(params, feedback):
    """Feedback whose every B is the weight itself: FA must then be BP exactly."""
    by_path = fj._feedback.by_path(params)
    return fj.Feedback({path: by_path[path] for path in feedback.weights})


def assert_close(got, want, tol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def assert_differ(got, want):
    assert any(
        not np.allclose(g, w, atol=1e-5) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )


# --------------------------------------------------------------------------- a plain-JAX CNN (NCHW)


def conv(x, w, stride=1):
    return jax.lax.conv(x, w, (stride, stride), "SAME")  # NCHW input, OIHW kernel: lax.conv's defaults


def cnn(params, x):
    h1 = jnp.tanh(conv(x, params["c1"]) + params["b1"][:, None, None])
    h2 = jnp.tanh(conv(h1, params["c2"], 2) + params["b2"][:, None, None])
    return h2.reshape(h2.shape[0], -1) @ params["w"] + params["b"]


def cnn_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "c1": jax.random.normal(k1, (3, 2, 3, 3)) * 0.4,
        "b1": jnp.full((3,), 0.1),
        "c2": jax.random.normal(k2, (4, 3, 3, 3)) * 0.3,
        "b2": jnp.full((4,), -0.1),
        "w": jax.random.normal(k3, (4 * 3 * 3, 5)) * 0.2,
        "b": jnp.zeros((5,)),
    }


def cnn_reference(params, x, t, backward):
    """FA / DFA for ``cnn``, one layer at a time: ``backward`` maps the name of a layer to what its ``dx`` uses."""
    a1 = conv(x, params["c1"]) + params["b1"][:, None, None]
    h1 = jnp.tanh(a1)
    a2 = conv(h1, params["c2"], 2) + params["b2"][:, None, None]
    h2 = jnp.tanh(a2)
    flat = h2.reshape(h2.shape[0], -1)
    y = flat @ params["w"] + params["b"]
    e = (y - t) / y.shape[0]
    grads = {"w": flat.T @ e, "b": e.sum(0)}
    if backward["kind"] == "chain":
        dflat = e @ backward["w"].T
        da2 = dflat.reshape(h2.shape) * (1 - h2**2)
        (dh1,) = jax.vjp(lambda h: conv(h, backward["c2"], 2), h1)[1](da2)
    else:  # direct: e B_l at each tap (the input of c2 and of w)
        da2 = (e @ backward["w:in"]).reshape(h2.shape) * (1 - h2**2)
        dh1 = (e @ backward["c2:in"]).reshape(h1.shape)
    grads["c2"] = jax.vjp(lambda w: conv(h1, w, 2), params["c2"])[1](da2)[0]
    grads["b2"] = da2.sum((0, 2, 3))
    da1 = dh1 * (1 - h1**2)
    grads["c1"] = jax.vjp(lambda w: conv(x, w), params["c1"])[1](da1)[0]
    grads["b1"] = da1.sum((0, 2, 3))
    return grads


def test_plain_jax_cnn_nchw_under_fa_and_dfa():
    params = cnn_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 2, 6, 6))
    t = jax.random.normal(jax.random.key(2), (4, 5))
    fa = fj.init_feedback("fa", params, key=jax.random.key(3), model=cnn, inputs=x)
    assert set(fa.weights) == {"c1", "c2", "w"}
    _, got = jax.jit(fj.value_and_grad(cnn, mse, "fa"))(params, fa, x, t)
    assert_close(got, cnn_reference(params, x, t, {"kind": "chain", **fa.weights}))
    _, bp = fj.value_and_grad(cnn, mse, "bp")(params, None, x, t)
    assert_close(fj.value_and_grad(cnn, mse, "fa")(params, as_bp(params, fa), x, t)[1], bp, tol=1e-6)
    assert_differ(got, bp)

    dfa = fj.init_feedback("dfa", params, key=jax.random.key(3), model=cnn, inputs=x)
    assert [(t_.name, t_.shape) for t_ in dfa.layout.taps] == [("c2:in", (3, 6, 6)), ("w:in", (36,))]
    _, got = jax.jit(fj.value_and_grad(cnn, mse, "dfa"))(params, dfa, x, t)
    split = np.cumsum([tap.size for tap in dfa.layout.taps])[:-1]
    blocks = dict(zip(["c2:in", "w:in"], np.split(np.asarray(dfa.taps), split, axis=1), strict=True))
    assert_close(got, cnn_reference(params, x, t, {"kind": "direct", **blocks}))


def test_feedback_is_drawn_in_the_products_layout():
    """An OIHW conv kernel and an Equinox (out, in) weight get B with std 1/√fan_in, like their forward init."""
    lin = eqx.nn.Linear(400, 30, key=jax.random.key(0))
    params, static = eqx.partition(lin, eqx.is_inexact_array)
    model = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    feedback = fj.init_feedback("fa", params, key=jax.random.key(1), model=model, inputs=jnp.ones((2, 400)))
    b = feedback.weights["weight"]
    assert b.shape == (30, 400)
    np.testing.assert_allclose(float(b.std()), 1 / np.sqrt(400), rtol=0.05)
    # The same numbers as drawing the (in, out) kernel and transposing it.
    canonical = fj.FA().init(fj.layer_key(jax.random.key(1), "weight"), (400, 30), jnp.float32)
    np.testing.assert_array_equal(b, canonical.T)
    kernel = {"k": jnp.ones((64, 16, 3, 3))}  # OIHW: fan_in = 16·3·3
    fb = fj.init_feedback(
        "fa", kernel, key=jax.random.key(2), model=lambda p, x: conv(x, p["k"]), inputs=jnp.ones((1, 16, 8, 8))
    )
    np.testing.assert_allclose(float(fb.weights["k"].std()), 1 / np.sqrt(16 * 9), rtol=0.05)


# --------------------------------------------------------------------------- Equinox


def test_equinox_mlp_and_conv_net_unmodified():
    mlp_ = eqx.nn.MLP(6, 4, 8, 2, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx.partition(mlp_, eqx.is_inexact_array)
    model = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    x = jax.random.normal(jax.random.key(1), (5, 6))
    t = jax.nn.one_hot(jnp.arange(5) % 4, 4)
    np_params = [{"kernel": layer.weight.T, "bias": layer.bias} for layer in mlp_.layers]
    for name in ("fa", "dfa", "usf"):
        rule = fj.get_rule(name)
        feedback = fj.init_feedback(rule, params, key=jax.random.key(2), model=model, inputs=x)
        _, grads = jax.jit(fj.value_and_grad(model, mse, rule))(params, feedback, x, t)
        # The same MLP in the reference's layout: kernels (in, out) = weightᵀ, B likewise.
        np_feedback = fj.Feedback(
            {
                f"{i}/kernel": jnp.asarray(leaf).T if leaf.ndim == 2 else leaf
                for i, leaf in enumerate(feedback.weights.values())
            },
            feedback.taps,
            feedback.layout,
        )
        _, want = CLOSED_FORMS[name](rule, np_params, np_feedback, x, t, "tanh", None)
        for layer, ref in zip(grads.layers, want, strict=True):
            np.testing.assert_allclose(layer.weight.T, ref["kernel"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(layer.bias, ref["bias"], rtol=1e-4, atol=1e-5)

    net = [
        eqx.nn.Conv2d(2, 3, 3, padding=1, key=jax.random.key(3)),
        eqx.nn.Conv2d(3, 4, 3, stride=2, padding=1, key=jax.random.key(4)),
        eqx.nn.Linear(4 * 3 * 3, 5, key=jax.random.key(5)),
    ]
    cparams, cstatic = eqx.partition(net, eqx.is_inexact_array)

    def conv_model(p, x):
        c1, c2, lin = eqx.combine(p, cstatic)
        return jax.vmap(lambda img: lin(jnp.tanh(c2(jnp.tanh(c1(img)))).reshape(-1)))(x)

    xi = jax.random.normal(jax.random.key(6), (4, 2, 6, 6))
    ti = jax.random.normal(jax.random.key(7), (4, 5))
    for name in ("fa", "dfa", "frsf"):
        feedback = fj.init_feedback(name, cparams, key=jax.random.key(8), model=conv_model, inputs=xi)
        _, grads = jax.jit(fj.value_and_grad(conv_model, mse, name))(cparams, feedback, xi, ti)
        _, bp = fj.value_and_grad(conv_model, mse, "bp")(cparams, None, xi, ti)
        assert_differ(grads, bp)
        assert_close(grads[-1], bp[-1], tol=1e-6)  # the output layer trains on its exact gradient
        if name == "fa":
            assert_close(
                fj.value_and_grad(conv_model, mse, "fa")(cparams, as_bp(cparams, feedback), xi, ti)[1], bp, 1e-6
            )


# --------------------------------------------------------------------------- scanned stacks, remat, cond


def stacked(params, x):
    def block(h, layer):
        return fj.tap(jnp.tanh(h @ layer["kernel"] + layer["bias"]), "block"), None

    h = fj.tap(jnp.tanh(x @ params["inp"]["kernel"] + params["inp"]["bias"]), "inp")
    h, _ = jax.lax.scan(block, h, params["stack"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def unrolled_params(params):
    layers = [params["inp"]]
    layers += [jax.tree.map(lambda a, i=i: a[i], params["stack"]) for i in range(params["stack"]["kernel"].shape[0])]
    return [*layers, params["out"]]


@pytest.mark.parametrize("name", ["fa", "dfa", "usf", "drtp"])
def test_scanned_stack_gets_one_feedback_per_layer(name):
    """``lax.scan`` over stacked layers equals the unrolled MLP's closed form, layer by layer."""
    width, depth = 5, 3
    stack = init_mlp([width] * (depth + 1), key=jax.random.key(0))
    params = {
        "inp": init_mlp([4, width], key=jax.random.key(1))[0],
        "stack": jax.tree.map(lambda *a: jnp.stack(a), *stack),
        "out": init_mlp([width, 3], key=jax.random.key(2))[0],
    }
    x = jax.random.normal(jax.random.key(3), (6, 4))
    t = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    rule = fj.get_rule(name)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(4), model=stacked, inputs=x)
    loss, grads = jax.jit(fj.value_and_grad(stacked, mse, rule))(params, feedback, x, t, step=2)
    layers = unrolled_params(params)
    if rule.cuts:
        assert [(tap.name, tap.stack) for tap in feedback.layout.taps] == [("inp", ()), ("block", (depth,))]
        # The same columns serve the unrolled taps in order: inp, block[0], …, block[depth - 1].
        unrolled = fj.Feedback(
            {},
            feedback.taps,
            feedback.layout._replace(taps=tuple(fj.TapSpec(f"t{i}", (width,)) for i in range(depth + 1))),
        )
    else:
        b = feedback.weights
        unrolled = fj.Feedback(
            {
                "0/kernel": b["inp/kernel"],
                **{f"{i + 1}/kernel": b["stack/kernel"][i] for i in range(depth)},
                f"{depth + 1}/kernel": b["out/kernel"],
            }
        )
        if name == "fa":
            assert not np.allclose(b["stack/kernel"][0], b["stack/kernel"][1])  # a distinct B per layer
    want_loss, want = CLOSED_FORMS[name](rule, layers, unrolled, x, t, "tanh", 2)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    got = unrolled_params(grads)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g["kernel"], w["kernel"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g["bias"], w["bias"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["fa", "dfa"])
def test_remat_and_cond_blocks_give_the_plain_model_gradients(name):
    params = init_mlp([4, 6, 5, 3], key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    t = jax.random.normal(jax.random.key(2), (5, 3))
    plain = mlp("tanh")

    def layer(h, p, index):
        return fj.tap(jnp.tanh(h @ p["kernel"] + p["bias"]), f"layer_{index}")

    def rematted(ps, x):
        h = x
        for i, p in enumerate(ps[:-1]):
            h = jax.checkpoint(lambda h, p, i=i: layer(h, p, i))(h, p)
        return h @ ps[-1]["kernel"] + ps[-1]["bias"]

    def conditional(ps, x):
        h = jax.lax.cond(
            x.sum() > -1e9,
            lambda h: jnp.tanh(h @ ps[0]["kernel"] + ps[0]["bias"]),
            lambda h: jnp.zeros((h.shape[0], 6)),
            x,
        )
        h = fj.tap(h, "layer_0")
        h = fj.tap(jnp.tanh(h @ ps[1]["kernel"] + ps[1]["bias"]), "layer_1")
        return h @ ps[-1]["kernel"] + ps[-1]["bias"]

    feedback = fj.init_feedback(name, params, key=jax.random.key(3), model=plain, inputs=x)
    _, want = fj.value_and_grad(plain, mse, name)(params, feedback, x, t)
    for model in (rematted, conditional):
        fb = fj.init_feedback(name, params, key=jax.random.key(3), model=model, inputs=x)
        _, got = jax.jit(fj.value_and_grad(model, mse, name))(params, fb, x, t)
        assert_close(got, want, tol=1e-6)


def test_a_tap_inside_a_branch_is_refused():
    params = init_mlp([4, 6, 3], key=jax.random.key(0))

    def model(ps, x):
        h = jax.lax.cond(x.sum() > 0, lambda h: fj.tap(jnp.tanh(h @ ps[0]["kernel"])), lambda h: h @ ps[0]["kernel"], x)
        return h @ ps[1]["kernel"]

    with pytest.raises(ValueError, match=r"inside a lax\.cond"):
        fj.init_feedback("dfa", params, key=jax.random.key(0), model=model, inputs=jnp.ones((2, 4)))


# --------------------------------------------------------------------------- refusals: nothing is silently BP


def refused(model, params, x, match, **kw):
    with pytest.raises(ValueError, match=match):
        fj.init_feedback("fa", params, key=jax.random.key(0), model=model, inputs=x, **kw)


def test_non_linear_weight_transforms_are_refused_or_marked_exact():
    params = {"w": jnp.ones((4, 3)) * 0.5, "a": jnp.ones((4, 2)) * 0.1, "b": jnp.ones((2, 3)) * 0.1}
    x = jax.random.normal(jax.random.key(0), (5, 4))
    t = jax.random.normal(jax.random.key(1), (5, 3))
    normalised = lambda p, x: x @ (p["w"] / jnp.linalg.norm(p["w"]))
    refused(normalised, {"w": params["w"]}, x, r"parameter 'w' is transformed non-linearly .* before this product")
    merged = lambda p, x: x @ (p["w"] + p["a"] @ p["b"])  # a merged LoRA
    refused(merged, params, x, r"'a', 'b'.*exact=")
    hand = lambda p, x: (x[:, :, None] * p["w"][None]).sum(1)  # a product written by hand
    refused(hand, {"w": params["w"]}, x, r"'w' multiplies an activation elementwise")

    @jax.custom_vjp
    def layer(x, w):
        return x @ w

    layer.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    refused(lambda p, x: layer(x, p["w"]), {"w": params["w"]}, x, "inside a custom_jvp / custom_vjp")
    # Marked exact, they train with BP's gradient, and the plan says so.
    feedback = fj.init_feedback("fa", params, key=jax.random.key(0), model=merged, inputs=x, exact=["w", "a", "b"])
    assert feedback.weights == {} and sorted(feedback.exact) == ["a", "b", "w"]
    _, got = fj.value_and_grad(merged, mse, "fa")(params, feedback, x, t)
    _, bp = fj.value_and_grad(merged, mse, "bp")(params, None, x, t)
    assert_close(got, bp, tol=1e-6)
    assert "exact (marked)" in str(fj.plan(merged, params, x, "fa", exact=["w", "a", "b"]))


def test_a_scan_over_a_reshaped_stack_is_refused():
    stack = jnp.ones((3, 4, 4)) * 0.1

    def model(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, jnp.swapaxes(p["s"], 1, 2))[0]

    refused(model, {"s": stack}, jnp.ones((2, 4)), "enters lax.scan through other operations")


def test_biases_scales_and_lookups_keep_their_exact_gradient():
    """Elementwise uses, as in biotorch and TinyDFA: only products get feedback."""
    params = {
        "emb": jax.random.normal(jax.random.key(0), (7, 4)),
        "scale": jnp.ones((4,)) * 1.5,
        "w": jax.random.normal(jax.random.key(1), (4, 3)),
        "b": jnp.ones((3,)),
    }

    def model(p, ids):
        h = p["emb"][ids] * p["scale"]
        return h @ p["w"] + p["b"]

    ids = jnp.array([1, 3, 3, 6])
    plan = {row.path: row.treatment for row in fj.plan(model, params, ids, "fa").params}
    assert plan["emb"].startswith("exact, lookup") and plan["scale"].startswith("exact, elementwise")
    assert plan["w"].startswith("feedback (dense)") and plan["b"] == "exact, elementwise (add)"
    feedback = fj.init_feedback("fa", params, key=jax.random.key(2), model=model, inputs=ids)
    t = jax.random.normal(jax.random.key(3), (4, 3))
    _, got = fj.value_and_grad(model, mse, "fa")(params, feedback, ids, t)
    _, bp = fj.value_and_grad(model, mse, "bp")(params, None, ids, t)
    np.testing.assert_allclose(got["w"], bp["w"], rtol=1e-6)  # dW exact
    np.testing.assert_allclose(got["b"], bp["b"], rtol=1e-6)
    assert not np.allclose(got["emb"], bp["emb"])  # the table's gradient came through B


# --------------------------------------------------------------------------- batch dims and per-token losses


def tiny_lm(params, ids):
    """Embedding, a learned positional table of fixed length, one attention layer, a tied head."""
    h = params["emb"][ids] + params["pos"][: ids.shape[1]]
    q, k, v = h @ params["q"], h @ params["k"], h @ params["v"]
    scores = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
    h = h + jax.nn.softmax(jnp.where(mask, scores, -1e9), -1) @ v
    h = fj.tap(jnp.tanh(h @ params["mlp"]), "mlp")
    return h @ params["emb"].T


def lm_params(key, vocab=11, seq=6, d=8):
    ks = jax.random.split(key, 6)
    return {
        "emb": jax.random.normal(ks[0], (vocab, d)) * 0.3,
        "pos": jax.random.normal(ks[1], (seq, d)) * 0.1,
        "q": jax.random.normal(ks[2], (d, d)) * 0.3,
        "k": jax.random.normal(ks[3], (d, d)) * 0.3,
        "v": jax.random.normal(ks[4], (d, d)) * 0.3,
        "mlp": jax.random.normal(ks[5], (d, d)) * 0.3,
    }


def token_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()


def test_a_per_token_loss_finds_two_batch_dims():
    params, ids = lm_params(jax.random.key(0)), jax.random.randint(jax.random.key(1), (3, 6), 0, 11)
    found = fj.init_feedback("dfa", params, key=jax.random.key(2), model=tiny_lm, inputs=ids)
    explicit = fj.init_feedback(fj.DFA(batch_dims=2), params, key=jax.random.key(2), model=tiny_lm, inputs=ids)
    assert found.layout.batch_dims == 2 and found.layout.taps[0].shape == (8,)
    got = fj.value_and_grad(tiny_lm, token_loss, "dfa")(params, found, ids, ids)
    want = fj.value_and_grad(tiny_lm, token_loss, fj.DFA(batch_dims=2))(params, explicit, ids, ids)
    assert_close(got, want, tol=0)
    with pytest.raises(ValueError, match=r"batch_dims=1: .* would mix the tokens"):
        fj.init_feedback(fj.DFA(batch_dims=1), params, key=jax.random.key(2), model=tiny_lm, inputs=ids)
    mixed = fj.init_feedback(
        fj.DFA(batch_dims=1, mix_batch=True), params, key=jax.random.key(2), model=tiny_lm, inputs=ids
    )
    assert mixed.layout.output.shape == (6, 11)  # one projection per sequence: what mix_batch asks for
    drtp = fj.init_feedback("drtp", params, key=jax.random.key(2), model=tiny_lm, inputs=ids)
    assert drtp.layout.batch_dims == 2


def test_a_coincidence_of_sizes_is_not_a_batch_dim():
    """Batch 10, width 10, 10 classes: the shared leading shape (10, 10) is not two batch dims."""
    params = init_mlp([12, 10, 10], key=jax.random.key(0))
    feedback = fj.init_feedback("dfa", params, key=jax.random.key(1), model=mlp("tanh"), inputs=jnp.ones((10, 12)))
    assert feedback.layout.batch_dims == 1 and feedback.layout.output.shape == (10,)
    # When every size coincides, nothing can be resized to tell: the rule must say it.
    square = init_mlp([10, 10, 10], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"batch_dims: cannot tell whether axis 1 .* Pass batch_dims=1"):
        fj.init_feedback("dfa", square, key=jax.random.key(1), model=mlp("tanh"), inputs=jnp.ones((10, 10)))
    told = fj.init_feedback(
        fj.DFA(batch_dims=1), square, key=jax.random.key(1), model=mlp("tanh"), inputs=jnp.ones((10, 10))
    )
    assert told.layout.output.shape == (10,)


def test_a_fixed_positional_table_needs_batch_dims_said():
    params, ids = lm_params(jax.random.key(0)), jnp.zeros((3, 6), jnp.int32)

    def fixed(p, ids):
        return tiny_lm({**p, "pos": p["pos"]}, ids) + 0 * jnp.sum(p["pos"]) if ids.shape[1] == 6 else None.shape

    with pytest.raises(ValueError, match=r"cannot tell whether axis 1 \(size 6\).*batch_dims=2"):
        fj.init_feedback("dfa", params, key=jax.random.key(2), model=fixed, inputs=ids)
    said = fj.init_feedback(fj.DFA(batch_dims=2), params, key=jax.random.key(2), model=fixed, inputs=ids)
    assert said.layout.batch_dims == 2


def test_drtp_signal_is_a_mean_over_the_batch():
    """Duplicating a batch leaves DRTP's update unchanged, as it leaves BP's and DFA's."""
    params = init_mlp([5, 7, 6, 3], key=jax.random.key(0))
    model = mlp("tanh")
    x = jax.random.normal(jax.random.key(1), (4, 5))
    labels = jnp.array([0, 2, 1, 2])
    loss = lambda o, y: optax.softmax_cross_entropy_with_integer_labels(o, y).mean()
    for name in ("bp", "dfa", "drtp"):
        feedback = fj.init_feedback(name, params, key=jax.random.key(2), model=model, inputs=x)
        grad_fn = fj.value_and_grad(model, loss, name)
        _, once = grad_fn(params, feedback, x, labels)
        _, twice = grad_fn(params, feedback, jnp.concatenate([x, x]), jnp.concatenate([labels, labels]))
        assert_close(twice, once, tol=1e-6)


def test_a_loss_linear_in_the_outputs_is_reported_for_dfa():
    params = init_mlp([5, 7, 3], key=jax.random.key(0))

    def log_probs(p, x):
        return jax.nn.log_softmax(mlp("tanh")(p, x))

    x, labels = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    linear = lambda out, y: -jnp.mean(jnp.sum(jax.nn.one_hot(y, 3) * out, -1))
    feedback = fj.init_feedback("dfa", params, key=jax.random.key(1), model=log_probs, inputs=x)
    with pytest.warns(UserWarning, match="linear in the model outputs"):
        fj.value_and_grad(log_probs, linear, "dfa")(params, feedback, x, labels)
    plain = fj.init_feedback("dfa", params, key=jax.random.key(1), model=mlp("tanh"), inputs=x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fj.value_and_grad(
            mlp("tanh"), lambda o, y: optax.softmax_cross_entropy_with_integer_labels(o, y).mean(), "dfa"
        )(params, plain, x, labels)


# --------------------------------------------------------------------------- explicit sharding


def test_explicit_sharding_mesh_on_four_cpu_devices():
    """Params and batch laid out on an explicit-sharding mesh: every rule's gradients equal the unsharded ones."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        import fa_jax as fj
        from fa_jax.models import init_mlp, mlp
        mesh = jax.make_mesh((2, 2), ("batch", "model"), axis_types=(AxisType.Explicit,) * 2)
        params = init_mlp([8, 16, 12, 4], key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (8, 8)); t = jax.random.normal(jax.random.key(2), (8, 4))
        mse = lambda o, t: 0.5 * jnp.mean(jnp.sum((o - t) ** 2, -1))
        model = mlp("tanh")
        for name in ["fa", "dfa", "usf", "drtp"]:
            fb = fj.init_feedback(name, params, key=jax.random.key(3), model=model, inputs=x)
            want = jax.jit(fj.value_and_grad(model, mse, name))(params, fb, x, t)
            with jax.set_mesh(mesh):
                sp = [{"kernel": jax.device_put(l["kernel"], NamedSharding(mesh, P(None, "model"))),
                       "bias": jax.device_put(l["bias"], NamedSharding(mesh, P("model")))} for l in params]
                sx = jax.device_put(x, NamedSharding(mesh, P("batch", None)))
                st = jax.device_put(t, NamedSharding(mesh, P("batch", None)))
                got = jax.jit(fj.value_and_grad(model, mse, name))(sp, fb, sx, st)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
            print(name, "ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["fa", "ok", "dfa", "ok", "usf", "ok", "drtp", "ok"]


def test_a_stacked_scale_is_elementwise_and_refusals_show_in_the_plan():
    """A (layers, d) normalisation scale sliced by lax.scan is a vector per layer, not a hidden product."""
    params = {"scale": jnp.ones((3, 4)), "w": jax.random.normal(jax.random.key(0), (3, 4, 4)) * 0.3}

    def model(p, x):
        return jax.lax.scan(lambda h, layer: (jnp.tanh((h * layer["scale"]) @ layer["w"]), None), x, p)[0]

    x = jnp.ones((2, 4))
    rows = {row.path: row.treatment for row in fj.plan(model, params, x, "fa").params}
    assert rows == {"scale": "exact, elementwise (mul)", "w": "feedback (dense, 3 layers): float32[3, 4, 4]"}
    fj.init_feedback("fa", params, key=jax.random.key(0), model=model, inputs=x)  # not refused
    hand = lambda p, x: (x[:, :, None] * p["w"][None]).sum(1)
    w = {"w": jnp.ones((4, 3))}
    assert fj.plan(hand, w, x, "fa").params[0].treatment.startswith("REFUSED: multiplies an activation")
    assert not fj.plan(hand, w, x, "bp").params[0].treatment.startswith("REFUSED")  # BP keeps Wᵀ anyway
