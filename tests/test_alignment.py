"""Alignment metrics against NumPy closed forms (tests/reference.py) and the known limits (cos 1, NaN)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax as fj
import reference
from fa_jax import alignment as al
from fa_jax.models import init_mlp, mlp
from fa_jax.rules import Rule


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def case(seed, sizes=(4, 9, 8, 2), batch=5, activation="tanh"):  # one shape: eager ops compile once
    rng = np.random.RandomState(seed)
    params = init_mlp(list(sizes), key=jax.random.key(seed))
    x = jnp.asarray(rng.randn(batch, sizes[0]), jnp.float32)
    t = jnp.asarray(rng.randn(batch, sizes[-1]), jnp.float32)
    return params, x, t, mlp(activation)


def f64(a):
    return np.asarray(a, np.float64)


def numpy_signals(params, x, t, *, chain=None, direct=None, source="error", frozen=False, activation="tanh"):
    """The signal reaching each hidden activation ``h_l`` (before f'), from the papers' equations.

    Same arguments as ``reference.gradients``: ``chain[l]`` stands for ``W_l`` (FA family), ``direct[l]``
    is ``B_l`` (DFA, DRTP), ``frozen`` sends nothing (shallow); none of them: BP.
    """
    params = [{k: f64(v) for k, v in layer.items()} for layer in params]
    x, t = f64(x), f64(t)
    hs, pre = reference.forward(params, x, activation)
    _, fprime = reference.ACTIVATION[activation]
    e = (hs[-1] - t) / x.shape[0]
    delta, signals = e, [None] * (len(params) - 1)
    for i in range(len(params) - 2, -1, -1):
        if frozen:
            signals[i] = np.zeros_like(pre[i])
        elif direct is not None:
            signals[i] = (e if source == "error" else t / x.shape[0]) @ f64(direct[i])
        else:
            matrix = params[i + 1]["kernel"] if chain is None else f64(chain[i + 1])
            signals[i] = delta @ matrix.T
        delta = signals[i] * fprime(pre[i])
    return signals


def numpy_cos(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def tap_blocks(feedback):
    """``[B_0, B_1, …]`` from a DFA/DRTP projection stored as one ``(out, Σ d_l)`` matrix."""
    blocks, start = [], 0
    for tap in feedback.layout.taps:
        blocks.append(f64(feedback.taps)[:, start : start + tap.size])
        start += tap.size
    return blocks


STEP = 3


def closed_form(rule_name, params, feedback, x, t):
    """NumPy signals at every hidden tap for each registered rule, built from the stored feedback."""
    kernels = [f64(layer["kernel"]) for layer in params]
    leaf = lambda i: feedback.weights[f"{i}/kernel"]
    glorot = jax.nn.initializers.glorot_uniform()
    if rule_name == "bp":
        return numpy_signals(params, x, t)
    if rule_name in ("fa", "kp"):
        return numpy_signals(params, x, t, chain=[f64(leaf(i)) for i in range(len(params))])
    if rule_name == "usf":  # s = √(2/(fan_in + fan_out)) (biotorch)
        return numpy_signals(params, x, t, chain=[reference.sign_matrix(w) for w in kernels])
    if rule_name == "frsf":
        return numpy_signals(params, x, t, chain=[reference.sign_matrix(w, leaf(i)) for i, w in enumerate(kernels)])
    if rule_name == "brsf":  # M_t = init(fold_in(k, t)), drawn at the kernel's (in, out) shape
        magnitudes = [glorot(jax.random.fold_in(leaf(i), STEP), w.shape) for i, w in enumerate(kernels)]
        return numpy_signals(
            params, x, t, chain=[reference.sign_matrix(w, m) for w, m in zip(kernels, magnitudes, strict=True)]
        )
    if rule_name == "dfa":
        return numpy_signals(params, x, t, direct=tap_blocks(feedback))
    if rule_name == "drtp":
        return numpy_signals(params, x, t, direct=tap_blocks(feedback), source="target")
    if rule_name == "shallow":
        return numpy_signals(params, x, t, frozen=True)
    if rule_name == "scaled_sign":  # the test-only rule (tests/scaled_sign.py): B = α sign(W)
        return numpy_signals(params, x, t, chain=[fj.get_rule(rule_name).scale * np.sign(w) for w in kernels])
    raise AssertionError(f"no closed form written for rule {rule_name!r}")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("rule", sorted(fj.RULES))
def test_tap_signals_match_numpy_for_every_rule(rule, jit):
    params, x, t, model = case(3)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(7), model=model, inputs=x)

    def signals(p, fb):
        return al.tap_signals(model, mse, rule, p, fb, x, t, step=STEP)

    got = (jax.jit(signals) if jit else signals)(params, feedback)
    want = closed_form(rule, params, feedback, x, t)
    assert list(got) == ["layer_0", "layer_1"]
    for g, w in zip(got.values(), want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
    if rule == "shallow":
        assert all(not np.any(g) for g in got.values())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bp_against_bp_gives_cosine_one(jit):
    params, x, t, model = case(4)
    grad_fn = al.value_and_grad_with_alignment(model, mse, "bp")
    if jit:
        grad_fn = jax.jit(grad_fn, static_argnames="measure")
    (_, metrics), grads = grad_fn(params, None, x, t)
    assert set(metrics.gradient) == {f"{i}/{n}" for i in range(3) for n in ("kernel", "bias")}
    for c in [*metrics.gradient.values(), metrics.total]:
        np.testing.assert_allclose(c.cosine, 1.0, atol=1e-6)
        np.testing.assert_allclose(c.angle, 0.0, atol=5e-2)
        np.testing.assert_allclose(c.norm_ratio, 1.0, rtol=1e-6)
    assert list(metrics.delta) == ["layer_0", "layer_1"]
    for d in metrics.delta.values():
        np.testing.assert_allclose(d.mean, 1.0, atol=1e-6)
        np.testing.assert_allclose(d.std, 0.0, atol=1e-5)
    assert metrics.weight is None
    _, want = reference.gradients(params, x, t, "tanh")
    for index, layer in enumerate(want):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(grads[index][name], layer[name], rtol=1e-4, atol=1e-6)


def test_fa_with_feedback_equal_to_the_weights_gives_cosine_one_and_ratio_one():
    params, x, t, model = case(5)
    drawn = fj.init_feedback("fa", params, key=jax.random.key(0), model=model, inputs=x)
    feedback = dataclasses.replace(drawn, weights={f"{i}/kernel": layer["kernel"] for i, layer in enumerate(params)})
    (_, metrics), _ = jax.jit(al.value_and_grad_with_alignment(model, mse, "fa"))(params, feedback, x, t)
    for c in [*metrics.gradient.values(), metrics.total]:
        np.testing.assert_allclose(c.cosine, 1.0, atol=1e-6)
        np.testing.assert_allclose(c.norm_ratio, 1.0, rtol=1e-5)
    assert set(metrics.weight) == {"0/kernel", "1/kernel", "2/kernel"}
    for c in metrics.weight.values():
        np.testing.assert_allclose(c.cosine, 1.0, atol=1e-6)
        np.testing.assert_allclose(c.angle, 0.0, atol=5e-2)
        np.testing.assert_allclose(c.norm_ratio, 1.0, rtol=1e-6)
    for d in metrics.delta.values():
        np.testing.assert_allclose(d.mean, 1.0, atol=1e-5)


@pytest.mark.parametrize("rule", ["dfa", "fa"])
def test_metrics_match_numpy_and_the_update_is_the_cores(rule):
    params, x, t, model = case(1)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(11), model=model, inputs=x)
    (loss, metrics), grads = jax.jit(al.value_and_grad_with_alignment(model, mse, rule))(params, feedback, x, t)
    if rule == "dfa":
        kwargs = dict(direct=tap_blocks(feedback))
    else:
        kwargs = dict(chain=[f64(feedback.weights[f"{i}/kernel"]) for i in range(3)])
    want_loss, want = reference.gradients(params, x, t, "tanh", **kwargs)
    _, bp = reference.gradients(params, x, t, "tanh")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for index, (layer, bp_layer) in enumerate(zip(want, bp, strict=True)):
        for name in ("kernel", "bias"):
            got = metrics.gradient[f"{index}/{name}"]
            np.testing.assert_allclose(got.cosine, numpy_cos(layer[name], bp_layer[name]), atol=2e-5)
            np.testing.assert_allclose(
                got.norm_ratio, np.linalg.norm(layer[name]) / np.linalg.norm(bp_layer[name]), rtol=1e-4
            )
            np.testing.assert_allclose(np.cos(np.radians(got.angle)), got.cosine, atol=1e-4)
    total = numpy_cos(
        np.concatenate([g.ravel() for layer in want for g in layer.values()]),
        np.concatenate([g.ravel() for layer in bp for g in layer.values()]),
    )
    np.testing.assert_allclose(metrics.total.cosine, total, atol=2e-5)
    # Launay et al. 2019: per-sample cos(δ̃_l[n], δ_l[n]), mean and std over the batch.
    rule_signals = numpy_signals(params, x, t, **kwargs)
    bp_signals = numpy_signals(params, x, t)
    for index, (a, b) in enumerate(zip(rule_signals, bp_signals, strict=True)):
        per_sample = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        got = metrics.delta[f"layer_{index}"]
        np.testing.assert_allclose(got.mean, per_sample.mean(), atol=2e-5)
        np.testing.assert_allclose(got.std, per_sample.std(), atol=2e-5)
    # The rule's update is the core's, unchanged by measuring.
    _, core = fj.value_and_grad(model, mse, rule)(params, feedback, x, t)
    for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(core), strict=True):
        np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-7)


def test_dfa_weight_alignment_matches_numpy_product():
    params, x, _, model = case(7)
    dfa = fj.init_feedback("dfa", params, key=jax.random.key(3), model=model, inputs=x)
    kernels = al.dense_kernels(model, params, x)
    assert [k.shape for k in kernels] == [(4, 9), (9, 8), (8, 2)]
    got = al.dfa_weight_alignment(dfa, kernels, "dfa")
    W = [f64(layer["kernel"]) for layer in params]
    for index, (name, B) in enumerate(zip(["layer_0", "layer_1"], tap_blocks(dfa), strict=True)):
        downstream = np.linalg.multi_dot(W[index + 1 :]) if len(W[index + 1 :]) > 1 else W[-1]
        np.testing.assert_allclose(got[name].cosine, numpy_cos(B, downstream.T), atol=1e-5)
        np.testing.assert_allclose(got[name].norm_ratio, np.linalg.norm(B) / np.linalg.norm(downstream), rtol=1e-5)
    # A regenerated projection is read through the rule: the same B_l as storing it.
    keyed = fj.init_feedback(fj.DFA(regenerate=True), params, key=jax.random.key(3), model=model, inputs=x)
    again = al.dfa_weight_alignment(keyed, kernels, fj.DFA(regenerate=True))
    for name in got:
        np.testing.assert_allclose(again[name].cosine, got[name].cosine, atol=1e-6)
    with pytest.raises(ValueError, match="one kernel per tap"):
        al.dfa_weight_alignment(dfa, kernels[1:])


def test_fa_family_weight_alignment_reads_the_backward_matrix():
    params, x, _, model = case(8)
    W = [f64(layer["kernel"]) for layer in params]
    # A regenerated B is materialised with the rule: the numbers a stored B has.
    stored = fj.init_feedback("fa", params, key=jax.random.key(1), model=model, inputs=x)
    keyed = fj.init_feedback(fj.FA(regenerate=True), params, key=jax.random.key(1), model=model, inputs=x)
    got = al.fa_weight_alignment(params, keyed, fj.FA(regenerate=True), model=model, inputs=x)
    for i, w in enumerate(W):
        B = f64(stored.weights[f"{i}/kernel"])
        np.testing.assert_allclose(got[f"{i}/kernel"].cosine, numpy_cos(B, w), atol=1e-5)
        np.testing.assert_allclose(got[f"{i}/kernel"].norm_ratio, np.linalg.norm(B) / np.linalg.norm(w), rtol=1e-5)
    # uSF: cos(sign(W) s, W) = ‖W‖₁ / (√n ‖W‖₂), ‖B‖/‖W‖ = s √n / ‖W‖₂.
    usf = fj.init_feedback("usf", params, key=jax.random.key(1), model=model, inputs=x)
    got = al.fa_weight_alignment(params, usf, "usf", model=model, inputs=x)
    for i, w in enumerate(W):
        s = np.sqrt(2.0 / sum(w.shape))
        np.testing.assert_allclose(
            got[f"{i}/kernel"].cosine, np.abs(w).sum() / (np.sqrt(w.size) * np.linalg.norm(w)), rtol=1e-5
        )
        np.testing.assert_allclose(got[f"{i}/kernel"].norm_ratio, s * np.sqrt(w.size) / np.linalg.norm(w), rtol=1e-5)
    with pytest.raises(ValueError, match="step"):
        brsf = fj.init_feedback("brsf", params, key=jax.random.key(1), model=model, inputs=x)
        al.fa_weight_alignment(params, brsf, "brsf", model=model, inputs=x)
    assert (
        al.fa_weight_alignment(
            params, fj.init_feedback("bp", params, model=model, inputs=x), "bp", model=model, inputs=x
        )
        == {}
    )


@dataclasses.dataclass(frozen=True)
class Doubled(Rule):
    """A test-only rule (not registered): B = 2W, so every signal is BP's times 2 per layer crossed."""

    name = "doubled_test"
    reads_weight = True

    def init_weight(self, spec, *, key):
        return jnp.zeros(spec.stack, jnp.float32)  # nothing stored; the product must still use feedback

    def backward_matrix(self, weight, feedback, *, spec, step):
        return 2 * weight


def test_a_new_rule_is_measured_through_its_protocol_alone():
    params, x, t, model = case(12)
    feedback = fj.init_feedback(Doubled(), params, key=jax.random.key(0), model=model, inputs=x)
    (_, metrics), _ = al.value_and_grad_with_alignment(model, mse, Doubled())(params, feedback, x, t)
    bp = numpy_signals(params, x, t)
    got = al.tap_signals(model, mse, Doubled(), params, feedback, x, t)
    np.testing.assert_allclose(got["layer_1"], 2 * bp[1], rtol=1e-4, atol=1e-7)  # one B crossed
    np.testing.assert_allclose(got["layer_0"], 4 * bp[0], rtol=1e-4, atol=1e-7)  # two
    for c in metrics.weight.values():
        np.testing.assert_allclose(c.cosine, 1.0, atol=1e-6)
        np.testing.assert_allclose(c.norm_ratio, 2.0, rtol=1e-6)
    for d in metrics.delta.values():
        np.testing.assert_allclose(d.mean, 1.0, atol=1e-5)


def scanned_model(p, x):
    """A tap in a ``lax.scan`` over stacked layers and one inside ``jax.checkpoint``."""
    h = jnp.tanh(x @ p["inp"])

    def body(h, w):
        return fj.tap(jnp.tanh(h @ w), name="block"), None

    h, _ = jax.lax.scan(body, h, p["stack"])
    h = jax.checkpoint(lambda h: fj.tap(jnp.tanh(h @ p["mid"]), name="mid"))(h)
    return h @ p["out"]


def test_tap_signals_inside_scan_and_checkpoint_match_hand_written_probes():
    rng = np.random.RandomState(0)
    params = {
        "inp": rng.randn(4, 6) * 0.5,
        "stack": rng.randn(3, 6, 6) * 0.4,
        "mid": rng.randn(6, 6) * 0.4,
        "out": rng.randn(6, 2) * 0.4,
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x, t = jnp.asarray(rng.randn(5, 4), jnp.float32), jnp.asarray(rng.randn(5, 2), jnp.float32)

    def by_hand(probes):
        h = jnp.tanh(x @ params["inp"])
        for k in range(3):
            h = jnp.tanh(h @ params["stack"][k]) + probes["block"][k]
        h = jnp.tanh(h @ params["mid"]) + probes["mid"]
        return mse(h @ params["out"], t)

    want = jax.grad(by_hand)({"block": jnp.zeros((3, 5, 6)), "mid": jnp.zeros((5, 6))})
    got = jax.jit(lambda p: al.tap_signals(scanned_model, mse, "bp", p, None, x, t))(params)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)
    dfa = fj.init_feedback("dfa", params, key=jax.random.key(1), model=scanned_model, inputs=x)
    got = jax.jit(lambda p: al.tap_signals(scanned_model, mse, "dfa", p, dfa, x, t))(params)
    e, B = f64(scanned_model(params, x) - t) / 5, f64(dfa.taps)  # the stacked tap owns layer k's 6 columns
    np.testing.assert_allclose(
        got["block"], np.stack([e @ B[:, 6 * k : 6 * k + 6] for k in range(3)]), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(got["mid"], e @ B[:, 18:24], rtol=1e-4, atol=1e-7)


def test_unmarked_model_is_probed_where_the_rule_cuts():
    """Without fa_jax.tap, a layer-placed rule cuts the activation entering each weight product."""
    params, x, t, _ = case(13)

    def plain(p, x):
        h = x
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
        return h @ p[-1]["kernel"] + p[-1]["bias"]

    rule = fj.DFA(taps="layer")
    feedback = fj.init_feedback(rule, params, key=jax.random.key(2), model=plain, inputs=x)
    (_, metrics), _ = jax.jit(al.value_and_grad_with_alignment(plain, mse, rule))(params, feedback, x, t)
    assert list(metrics.delta) == ["1/kernel:in", "2/kernel:in"]
    a, b = numpy_signals(params, x, t, direct=tap_blocks(feedback)), numpy_signals(params, x, t)
    for name, ra, rb in zip(metrics.delta, a, b, strict=True):
        per_sample = np.sum(ra * rb, 1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1))
        np.testing.assert_allclose(metrics.delta[name].mean, per_sample.mean(), atol=2e-5)
    assert set(metrics.weight) == {"1/kernel:in", "2/kernel:in"}  # the kernels chain like an MLP's


def test_per_token_taps_count_every_token_as_a_sample():
    """A ``(batch, seq, ·)`` model: the sample axes are found (2), so each token is one sample."""
    rng = np.random.RandomState(14)
    params = {"w1": jnp.asarray(rng.randn(5, 6), jnp.float32), "w2": jnp.asarray(rng.randn(6, 3), jnp.float32)}
    x, t = jnp.asarray(rng.randn(3, 4, 5), jnp.float32), jnp.asarray(rng.randn(3, 4, 3), jnp.float32)

    def tokens(p, x):
        return fj.tap(jnp.tanh(x @ p["w1"]), name="h") @ p["w2"]

    feedback = fj.init_feedback("fa", params, key=jax.random.key(0), model=tokens, inputs=x)
    grad_fn = al.value_and_grad_with_alignment(tokens, mse, "fa")
    (_, found), _ = jax.jit(grad_fn)(params, feedback, x, t)
    (_, per_sequence), _ = al.value_and_grad_with_alignment(tokens, mse, "fa", batch_dims=1)(params, feedback, x, t)
    a = f64(al.tap_signals(tokens, mse, "fa", params, feedback, x, t)["h"])
    b = f64(al.tap_signals(tokens, mse, "bp", params, None, x, t)["h"])
    for shape, got in [((12, 6), found), ((3, 24), per_sequence)]:
        ra, rb = a.reshape(shape), b.reshape(shape)
        per_sample = np.sum(ra * rb, 1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1))
        np.testing.assert_allclose(got.delta["h"].mean, per_sample.mean(), atol=2e-5)
        np.testing.assert_allclose(got.delta["h"].std, per_sample.std(), atol=2e-5)


def test_measure_false_costs_no_bp_reference_and_returns_none():
    params, x, t, model = case(8)
    feedback = fj.init_feedback("fa", params, key=jax.random.key(0), model=model, inputs=x)
    grad_fn = al.value_and_grad_with_alignment(model, mse, "fa")
    (_, metrics), _ = jax.jit(grad_fn, static_argnames="measure")(params, feedback, x, t, measure=False)
    assert metrics is None
    cheap = jax.make_jaxpr(lambda p: grad_fn(p, feedback, x, t, measure=False))(params)
    full = jax.make_jaxpr(lambda p: grad_fn(p, feedback, x, t))(params)
    core = jax.make_jaxpr(lambda p: fj.value_and_grad(model, mse, "fa")(p, feedback, x, t))(params)
    count = lambda jaxpr: str(jaxpr).count("dot_general")
    assert count(cheap) == count(core) < count(full)
    # deltas=False on a tapped model: no tap measured, everything else as with deltas.
    (_, without), _ = al.value_and_grad_with_alignment(model, mse, "fa", deltas=False)(params, feedback, x, t)
    (_, with_deltas), _ = grad_fn(params, feedback, x, t)
    assert without.delta is None and with_deltas.delta
    np.testing.assert_allclose(without.total.cosine, with_deltas.total.cosine, rtol=1e-6)


def test_shallow_hidden_alignment_is_undefined_not_silently_zero():
    params, x, t, model = case(9)
    feedback = fj.init_feedback("shallow", params, model=model, inputs=x)
    (_, metrics), _ = jax.jit(al.value_and_grad_with_alignment(model, mse, "shallow"))(params, feedback, x, t)
    assert np.isnan(metrics.gradient["0/kernel"].cosine) and np.isnan(metrics.gradient["0/kernel"].angle)
    np.testing.assert_allclose(metrics.gradient["2/kernel"].cosine, 1.0, atol=1e-6)
    assert all(np.isnan(d.mean) for d in metrics.delta.values())
    assert metrics.weight is None
    with pytest.raises(ValueError, match="weights=True"):
        al.value_and_grad_with_alignment(model, mse, "shallow", weights=True)(params, feedback, x, t)


def test_a_vanishing_bp_reference_gives_nan_not_an_angle():
    params, x, _, model = case(10)
    t = fj.apply(model, params, x)  # a perfect fit: BP's gradient is exactly 0
    feedback = fj.init_feedback("dfa", params, key=jax.random.key(0), model=model, inputs=x)
    (_, metrics), _ = al.value_and_grad_with_alignment(model, mse, "dfa")(params, feedback, x, t)
    for c in [*metrics.gradient.values(), metrics.total]:
        assert np.isnan(c.cosine) and np.isnan(c.angle)
    assert all(np.isnan(d.mean) for d in metrics.delta.values())


def test_vmap_over_seeds_equals_single_runs():
    params, x, t, model = case(10)
    grad_fn = al.value_and_grad_with_alignment(model, mse, "fa")

    def one(seed):
        feedback = fj.init_feedback("fa", params, key=jax.random.key(seed), model=model, inputs=x)
        return grad_fn(params, feedback, x, t)[0][1].total.cosine

    batched = jax.jit(jax.vmap(one))(jnp.arange(2))
    np.testing.assert_allclose(batched, [jax.jit(one)(s) for s in range(2)], rtol=1e-5)


def test_cosine_of_odd_dtypes_and_bad_input():
    a = jnp.asarray([1.0, 2.0, 3.0], jnp.bfloat16)
    c = al.cosine(a, 2 * a)
    np.testing.assert_allclose(c.cosine, 1.0, atol=1e-3)
    np.testing.assert_allclose(c.norm_ratio, 0.5, rtol=1e-2)
    np.testing.assert_allclose(al.cosine(jnp.array([1.0, 0]), jnp.array([0.0, 1])).angle, 90.0, atol=1e-5)
    np.testing.assert_allclose(al.cosine(jnp.array([1.0, 0]), jnp.array([-1.0, 0])).angle, 180.0, atol=1e-5)
    assert np.isnan(al.cosine(jnp.zeros(3), jnp.ones(3)).cosine)
    with pytest.raises(ValueError, match="structure"):
        al.gradient_alignment({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    with pytest.raises(ValueError, match="tap 'h'"):
        al.delta_alignment({"h": jnp.ones((2, 3))}, {"h": jnp.ones((2, 4))})
    params, x, t, model = case(0)
    with pytest.raises(TypeError, match="feedback"):
        al.fa_weight_alignment(params, {"0/kernel": params[0]["kernel"]}, "fa", model=model, inputs=x)
    with pytest.raises(ValueError, match="step"):
        brsf = fj.init_feedback("brsf", params, key=jax.random.key(0), model=model, inputs=x)
        al.tap_signals(model, mse, "brsf", params, brsf, x, t)


def test_an_empty_batch_is_refused_naming_the_argument_and_a_floor_voids_tiny_references():
    params, x, t, model = case(2)
    feedback = fj.init_feedback("fa", params, key=jax.random.key(0), model=model, inputs=x)
    grad_fn = al.value_and_grad_with_alignment(model, mse, "fa")
    with pytest.raises(ValueError, match=r"inputs.*empty batch"):
        grad_fn(params, feedback, x[:0], t[:0])
    with pytest.raises(ValueError, match=r"inputs.*empty batch"):
        al.tap_signals(model, mse, "fa", params, feedback, x[:0], t[:0])
    with pytest.raises(ValueError, match=r"rule_signals.*'h'"):
        al.delta_alignment({"h": jnp.zeros((0, 3))}, {"h": jnp.zeros((0, 3))})
    with pytest.raises(ValueError, match="reference_floor"):
        al.value_and_grad_with_alignment(model, mse, "fa", reference_floor=-1.0)
    (_, metrics), _ = grad_fn(params, feedback, x, t)
    _, bp = reference.gradients(params, x, t, "tanh")
    for index, layer in enumerate(bp):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(metrics.reference[f"{index}/{name}"], np.linalg.norm(layer[name]), rtol=1e-5)
    total = np.sqrt(sum(np.sum(g**2) for layer in bp for g in layer.values()))
    np.testing.assert_allclose(metrics.reference["total"], total, rtol=1e-5)
    # A floor between the smallest and the largest leaf norm voids exactly the leaves below it.
    norms = {k: float(v) for k, v in metrics.reference.items() if k != "total"}
    floor = float(np.median(list(norms.values())))
    (_, floored), _ = al.value_and_grad_with_alignment(model, mse, "fa", reference_floor=floor)(params, feedback, x, t)
    for path, norm in norms.items():
        assert np.isnan(floored.gradient[path].cosine) == (norm <= floor)
        np.testing.assert_allclose(floored.gradient[path].norm_ratio, metrics.gradient[path].norm_ratio)
    assert not np.isnan(floored.total.cosine)
