"""The rule family (uSF, frSF, brSF, Kolen–Pollack, DRTP, DFA shared prefix) vs NumPy closed forms.

References, written from the papers' equations for an MLP ``a_l = h_{l-1} W_l + b_l``,
``h_l = tanh(a_l)``, linear output ``y``, ``L = ½ Σ (y − t)² / N`` so ``e = (y − t)/N``:

* FA family (uSF, frSF, brSF, KP): ``δ_l = (δ_{l+1} B_{l+1}ᵀ) ⊙ f'(a_l)`` with
  ``B = sign(W)·√(2/(fan_in+fan_out))`` (uSF), ``|M| ⊙ sign(W)`` (frSF, brSF with
  ``M_t`` drawn from ``fold_in(k_l, t)``), learned B (KP)      — Liao et al. 2016; Akrout et al. 2019
* DRTP: ``δ_l = (y* B_l) ⊙ f'(a_l)`` for hidden layers, ``δ_L = e``   — Frenkel et al. 2021, eq. 6
* DFA shared prefix: ``δ_l = (e P[:, :d_l]) ⊙ f'(a_l)``              — TinyDFA (Launay et al. 2020)

and ``∂W_l = h_{l-1}ᵀ δ_l``, ``∂b_l = Σ_n δ_l``.
"""

import itertools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax import models

SIZES = (6, 9, 7, 4)
MODEL = models.mlp("tanh")


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def cross_entropy(outputs, labels):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(outputs) * jax.nn.one_hot(labels, outputs.shape[-1]), -1))


def data(seed=0, batch=5, sizes=SIZES):
    kx, kt = jax.random.split(jax.random.key(100 + seed))
    x = jax.random.normal(kx, (batch, sizes[0]))
    labels = jax.random.randint(kt, (batch,), 0, sizes[-1])
    return x, labels, jax.nn.one_hot(labels, sizes[-1])


def np_reference(params, x, t, *, chain=None, direct=None, direct_source="error"):
    """``(loss, grads)`` in float64: ``chain[l]`` kernel-shaped backward matrices, or ``direct[l]`` (c, d_l)."""
    params = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    hs, pre = [x], []
    for i, layer in enumerate(params):
        a = hs[-1] @ layer["kernel"] + layer["bias"]
        pre.append(a)
        hs.append(a if i == len(params) - 1 else np.tanh(a))
    y = hs[-1]
    e = (y - t) / y.shape[0]
    deltas = [None] * len(params)
    deltas[-1] = e
    for layer in range(len(params) - 2, -1, -1):
        if chain is not None:
            back = deltas[layer + 1] @ np.asarray(chain[layer + 1], np.float64).T
        else:
            source = e if direct_source == "error" else t
            back = source @ np.asarray(direct[layer], np.float64)
        deltas[layer] = back * (1.0 - np.tanh(pre[layer]) ** 2)
    grads = [{"kernel": hs[layer].T @ deltas[layer], "bias": deltas[layer].sum(0)} for layer in range(len(params))]
    return 0.5 * np.sum((y - t) ** 2) / y.shape[0], grads


def assert_grads_close(grads, ref, rtol=2e-5, atol=2e-6):
    for got, want in zip(grads, ref, strict=True):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=rtol, atol=atol)


def kernels(feedback, params):
    return [feedback.weights[f"{i}/kernel"] for i in range(len(params))]


def test_brsf_redraws_per_step_and_is_reproducible():
    rule = fa_jax.BRSF()
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    x, _, onehot = data()
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2), model=MODEL, inputs=x)
    grad_fn = jax.jit(fa_jax.value_and_grad(MODEL, mse, rule))
    _, at3 = grad_fn(params, feedback, x, onehot, step=3)
    again = fa_jax.init_feedback(rule, params, key=jax.random.key(2), model=MODEL, inputs=x)
    _, at3_again = grad_fn(params, again, x, onehot, step=jnp.int32(3))
    _, at4 = grad_fn(params, feedback, x, onehot, step=4)
    np.testing.assert_array_equal(at3[0]["kernel"], at3_again[0]["kernel"])
    assert not np.allclose(at3[0]["kernel"], at4[0]["kernel"])
    np.testing.assert_array_equal(at3[-1]["kernel"], at4[-1]["kernel"])  # the output layer's dW is exact


@hypothesis.settings(max_examples=4, deadline=None)
@hypothesis.given(
    name=st.sampled_from(["usf", "frsf", "brsf"]),
    seed=st.integers(0, 2**16),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=2),
)
def test_sign_of_b_equals_sign_of_w_at_every_step(name, seed, widths):
    """Sign concordance (Liao et al. 2016): sign(B_t) == sign(W_t) after every SGD step."""
    rule = fa_jax.get_rule(name)
    sizes = (3, *widths, 2)
    params = models.init_mlp(sizes, key=jax.random.key(seed))
    params[0]["kernel"] = params[0]["kernel"].at[0, 0].set(0.0)  # a zero weight must give a zero B
    x, _, onehot = data(seed, batch=4, sizes=sizes)
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(seed + 1), model=MODEL, inputs=x)
    specs = fa_jax._engine._program.analyse(MODEL, params, x).specs
    grad_fn = fa_jax.value_and_grad(MODEL, mse, rule)

    def train_step(params, step):
        _, grads = grad_fn(params, feedback, x, onehot, step=step)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        mats = [
            rule.backward_matrix(layer["kernel"], leaf, spec=specs[2 * i + 1], step=step)
            for i, (layer, leaf) in enumerate(zip(params, kernels(feedback, params), strict=True))
        ]
        agree = [jnp.all(jnp.sign(b) == jnp.sign(layer["kernel"])) for b, layer in zip(mats, params, strict=True)]
        return params, jnp.stack(agree)

    _, agree = jax.lax.scan(train_step, params, jnp.arange(4))
    assert agree.shape == (4, len(sizes) - 1)
    assert bool(jnp.all(agree))


def angle(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return math.degrees(math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)))


def test_kolen_pollack_angle_falls_toward_zero():
    """Lillicrap's linear task 30-20-10: KP's B aligns with W (angle -> 0); B − W shrinks by (1 − λ) per step."""
    sizes, lr, wd = (30, 20, 10), 0.05, 0.2
    model = models.mlp("linear")
    kw, kt, kx = jax.random.split(jax.random.key(0), 3)
    params = models.init_mlp(sizes, key=kw)
    target_map = jax.random.normal(kt, (30, 10)) / math.sqrt(30)
    x = jax.random.normal(kx, (64, 30))
    y = x @ target_map
    rule = fa_jax.KolenPollack(init=jax.nn.initializers.uniform(0.5), decay=lr * wd)
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(5), model=model, inputs=x)
    grad_fn = fa_jax.value_and_grad(model, mse, rule)

    def train_step(state, _):
        params, feedback = state
        loss, grads = grad_fn(params, feedback, x, y)
        updates = jax.tree.map(lambda g, p: -lr * g - lr * wd * p, grads, params)  # SGD + weight decay on W
        feedback = fa_jax.update_feedback(rule, feedback, updates, params)
        params = jax.tree.map(jnp.add, params, updates)
        return (params, feedback), loss

    angles, losses = [], []
    state = (params, feedback)
    chunk = jax.jit(lambda s: jax.lax.scan(train_step, s, None, length=150))
    for _ in range(3):
        angles.append(angle(state[1].weights["1/kernel"], state[0][1]["kernel"]))
        state, chunk_losses = chunk(state)
        losses.extend(np.asarray(chunk_losses))
    angles.append(angle(state[1].weights["1/kernel"], state[0][1]["kernel"]))
    assert angles[0] > 60.0  # an independent random B is near-orthogonal to W
    assert all(later < earlier for earlier, later in itertools.pairwise(angles)), angles
    assert angles[-1] < 5.0, angles
    assert losses[-1] < 0.5 * losses[0]
    gap0 = np.asarray(feedback.weights["0/kernel"] - params[0]["kernel"])
    gap = np.asarray(state[1].weights["0/kernel"] - state[0][0]["kernel"])
    np.testing.assert_allclose(gap, gap0 * (1 - lr * wd) ** 450, rtol=1e-3, atol=1e-6)


def test_update_feedback_leaves_fixed_feedback_alone():
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    x, _, _ = data()
    updates = jax.tree.map(jnp.ones_like, params)
    for name in sorted(fa_jax.RULES):
        if name == "kp":
            continue
        feedback = fa_jax.init_feedback(name, params, key=jax.random.key(2), model=MODEL, inputs=x)
        assert fa_jax.update_feedback(name, feedback, updates, params) is feedback
    kp = fa_jax.init_feedback(fa_jax.KolenPollack(decay=0.0), params, key=jax.random.key(2), model=MODEL, inputs=x)
    new = fa_jax.update_feedback(fa_jax.KolenPollack(decay=0.0), kp, updates, params)
    np.testing.assert_allclose(new.weights["0/kernel"], kp.weights["0/kernel"] + 1.0)
    assert set(new.weights) == {"0/kernel", "1/kernel", "2/kernel"}  # biases have no B


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_drtp_hidden_updates_do_not_depend_on_the_output_error(loss_name):
    """DRTP's hidden signal is y* B_l / N: changing the output layer (so the error) or the loss leaves it as is."""
    rule = fa_jax.DRTP()
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    x, labels, _ = data()
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2), model=MODEL, inputs=x)
    loss = mse_onehot_labels if loss_name == "mse" else cross_entropy
    grad_fn = jax.jit(fa_jax.value_and_grad(MODEL, loss, rule))
    other = [*params[:-1], {"kernel": params[-1]["kernel"] * -3.0 + 0.5, "bias": params[-1]["bias"] + 1.0}]
    other_loss = cross_entropy if loss_name == "mse" else mse_onehot_labels
    _, grads = grad_fn(params, feedback, x, labels)
    _, grads_other_w = grad_fn(other, feedback, x, labels)
    _, grads_other_loss = jax.jit(fa_jax.value_and_grad(MODEL, other_loss, rule))(params, feedback, x, labels)
    for changed in (grads_other_w, grads_other_loss):
        for got, want in zip(changed[:-1], grads[:-1], strict=True):
            np.testing.assert_array_equal(got["kernel"], want["kernel"])
            np.testing.assert_array_equal(got["bias"], want["bias"])
        assert not np.allclose(changed[-1]["kernel"], grads[-1]["kernel"])  # the output block sees the error
    dfa = fa_jax.init_feedback("dfa", params, key=jax.random.key(2), model=MODEL, inputs=x)
    dfa_fn = jax.jit(fa_jax.value_and_grad(MODEL, loss, "dfa"))
    assert not np.allclose(
        dfa_fn(params, dfa, x, labels)[1][0]["kernel"], dfa_fn(other, dfa, x, labels)[1][0]["kernel"]
    )


def mse_onehot_labels(outputs, labels):
    return mse(outputs, jax.nn.one_hot(labels, outputs.shape[-1]))


def test_drtp_labels_and_one_hot_targets_give_the_same_hidden_updates():
    rule = fa_jax.DRTP()
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    x, labels, onehot = data()
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2), model=MODEL, inputs=x)
    _, from_onehot = fa_jax.value_and_grad(MODEL, mse, rule)(params, feedback, x, onehot)
    _, from_labels = fa_jax.value_and_grad(MODEL, mse_onehot_labels, rule)(params, feedback, x, labels)
    for got, want in zip(from_labels[:-1], from_onehot[:-1], strict=True):
        np.testing.assert_allclose(got["kernel"], want["kernel"], rtol=1e-6, atol=1e-7)


def test_rule_registry():
    for name, cls in [
        ("bp", fa_jax.BP),
        ("fa", fa_jax.FA),
        ("dfa", fa_jax.DFA),
        ("usf", fa_jax.USF),
        ("frsf", fa_jax.FRSF),
        ("brsf", fa_jax.BRSF),
        ("kp", fa_jax.KolenPollack),
        ("drtp", fa_jax.DRTP),
        ("shallow", fa_jax.Shallow),
    ]:
        assert type(fa_jax.get_rule(name)) is cls and type(fa_jax.get_rule(name.upper())) is cls
        assert fa_jax.RULES[name] is cls
    with pytest.raises(ValueError, match=r"unknown rule 'sign'.*brsf.*drtp.*kp.*usf"):
        fa_jax.get_rule("sign")
    with pytest.raises(TypeError, match="register: expected a Rule subclass"):
        fa_jax.register(dict)
    assert fa_jax.FA(regenerate=True).config() == {"init": fa_jax.rules.fa.FA_DEFAULT_INIT, "regenerate": True}


def test_sign_rules_on_conv_and_einsum_weights():
    """frSF through a plain-JAX conv and einsum: dx uses |M| ⊙ sign(W), dW is exact."""
    rule = fa_jax.FRSF()
    params = {
        "conv": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)),
        "mix": jax.random.normal(jax.random.key(4), (4, 3, 5)),
    }
    dims = ("NHWC", "HWIO", "NHWC")

    def model(p, x):
        h = jnp.tanh(jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME", dimension_numbers=dims))
        return jnp.einsum("bhwd,dkc->bhwkc", h, p["mix"])

    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 2))
    t = jax.random.normal(jax.random.key(3), (2, 5, 5, 3, 5))
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2), model=model, inputs=x)
    loss = lambda y, t: jnp.sum(y * t)
    _, grads = jax.jit(fa_jax.value_and_grad(model, loss, rule))(params, feedback, x, t)
    # The same backward by hand: B = |M| ⊙ sign(W) in the input gradient of each layer.
    b_conv = jnp.abs(feedback.weights["conv"]) * jnp.sign(params["conv"])
    b_mix = jnp.abs(feedback.weights["mix"]) * jnp.sign(params["mix"])
    a = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME", dimension_numbers=dims)
    h = jnp.tanh(a)
    dh = jnp.einsum("bhwkc,dkc->bhwd", t, b_mix)
    da = dh * (1 - h**2)
    (dconv,) = jax.vjp(
        lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims), params["conv"]
    )[1](da)
    np.testing.assert_allclose(grads["mix"], jnp.einsum("bhwd,bhwkc->dkc", h, t), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["conv"], dconv, rtol=1e-4, atol=1e-4)
    assert not np.allclose(b_conv, params["conv"])
