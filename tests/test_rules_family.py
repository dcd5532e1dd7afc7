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
    for l in range(len(params) - 2, -1, -1):
        if chain is not None:
            back = deltas[l + 1] @ np.asarray(chain[l + 1], np.float64).T
        else:
            source = e if direct_source == "error" else t
            back = source @ np.asarray(direct[l], np.float64)
        deltas[l] = back * (1.0 - np.tanh(pre[l]) ** 2)
    grads = [{"kernel": hs[l].T @ deltas[l], "bias": deltas[l].sum(0)} for l in range(len(params))]
    return 0.5 * np.sum((y - t) ** 2) / y.shape[0], grads


def assert_grads_close(grads, ref, rtol=2e-5, atol=2e-6):
    for got, want in zip(grads, ref):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=rtol, atol=atol)


def layer_keys(feedback):
    return [layer["kernel"] for layer in feedback.kernels]


def backward_matrices(rule, params, feedback, step=None):
    """The B each FA-family rule should use, computed here from W, M and the paper's formula."""
    mats = []
    for layer, leaf in zip(params, layer_keys(feedback)):
        w = np.asarray(layer["kernel"], np.float64)
        if rule.name == "usf":
            mats.append(np.sign(w) * math.sqrt(2.0 / (w.shape[0] + w.shape[1])))
        elif rule.name == "frsf":
            m = rule.init(leaf, w.shape, jnp.float32) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
            mats.append(np.abs(np.asarray(m, np.float64)) * np.sign(w))
        elif rule.name == "brsf":
            m = rule.init(jax.random.fold_in(leaf, step), w.shape, jnp.float32)
            mats.append(np.abs(np.asarray(m, np.float64)) * np.sign(w))
        elif rule.name == "kp":
            mats.append(np.asarray(leaf, np.float64))
    return mats


FA_FAMILY = [fa_jax.USF(), fa_jax.USF(scale=0.3), fa_jax.FRSF(), fa_jax.FRSF(regenerate=True), fa_jax.BRSF(), fa_jax.KolenPollack(),
             # M drawn in 4-row tiles inside the backward (kernels of 6, 9 and 7 rows: ragged last tiles)
             fa_jax.FRSF(init=fa_jax.Tiled(rows=4), regenerate=True), fa_jax.BRSF(init=fa_jax.Tiled(rows=4))]


def _reference_for(rule, params, feedback, x, onehot, step):
    if rule == fa_jax.USF(scale=0.3):
        mats = [np.sign(np.asarray(l["kernel"], np.float64)) * 0.3 for l in params]
    else:
        mats = backward_matrices(rule, params, feedback, step)
    return np_reference(params, x, onehot, chain=mats)


EAGER_TOO = (fa_jax.USF(),)  # eager runs op by op (slow): one rule covers the no-jit path


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("rule", FA_FAMILY, ids=lambda r: f"{r.name}{'-regen' if getattr(r, 'regenerate', False) else ''}{'-s' if getattr(r, 'scale', 'xavier') != 'xavier' else ''}{'-tiled' if isinstance(getattr(r, 'init', None), fa_jax.Tiled) else ''}")
def test_fa_family_matches_numpy(rule, jit):
    if not jit and rule not in EAGER_TOO:
        pytest.skip("eager mode is covered by uSF")
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2))
    x, _, onehot = data()
    grad_fn = fa_jax.value_and_grad(MODEL, mse, rule)
    grad_fn = jax.jit(grad_fn) if jit else grad_fn
    loss, grads = grad_fn(params, feedback, x, onehot, step=7)
    ref_loss, ref = _reference_for(rule, params, feedback, x, onehot, 7)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref)
    # The rule is not BP in disguise: the first layer's gradient differs from BP's.
    _, bp = fa_jax.value_and_grad(MODEL, mse, "bp")(params, None, x, onehot)
    assert not np.allclose(grads[0]["kernel"], bp[0]["kernel"], atol=1e-4)


@pytest.mark.parametrize("rule", ["drtp", fa_jax.DRTP(regenerate=True), fa_jax.DRTP(shared_prefix=True)], ids=["stored", "regen", "shared"])
def test_drtp_matches_numpy(rule):
    rule = fa_jax.get_rule(rule)
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    x, labels, onehot = data()
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2), model=MODEL, inputs=x)
    loss, grads = jax.jit(fa_jax.value_and_grad(MODEL, mse, rule))(params, feedback, x, onehot)
    blocks = fa_jax.dfa_matrices(feedback, fa_jax.DFA(rule.init))
    ref_loss, ref = np_reference(params, x, onehot, direct=blocks, direct_source="target")
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref)
    # Integer labels are one-hot encoded: same hidden updates.
    _, from_labels = fa_jax.value_and_grad(MODEL, mse_onehot_labels, rule)(params, feedback, x, labels)
    assert_grads_close(from_labels[:-1], grads[:-1], rtol=1e-6, atol=1e-7)


def mse_onehot_labels(outputs, labels):
    return mse(outputs, jax.nn.one_hot(labels, outputs.shape[-1]))


@pytest.mark.parametrize("regenerate", [False, True], ids=["stored", "regen"])
def test_dfa_shared_prefix_matches_tinydfa(regenerate):
    """One (c, d_max) matrix, tap l reads its first d_l columns (TinyDFA's layout)."""
    sizes = (6, 9, 5, 7, 4)  # taps of 9, 5, 7 features: prefixes of different lengths
    rule = fa_jax.DFA(shared_prefix=True, regenerate=regenerate, init=fa_jax.tinydfa_uniform())
    params = models.init_mlp(sizes, key=jax.random.key(3))
    x, _, onehot = data(sizes=sizes)
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(4), model=MODEL, inputs=x)
    _, grads = jax.jit(fa_jax.value_and_grad(MODEL, mse, rule))(params, feedback, x, onehot)
    stored = fa_jax.init_feedback(fa_jax.DFA(shared_prefix=True, init=rule.init), params, key=jax.random.key(4), model=MODEL, inputs=x)
    shared = np.asarray(stored.projection, np.float64)
    assert shared.shape == (4, 9)
    # TinyDFA: project e with U[-1, 1), divide by sqrt(d_max), take prefixes.
    uniform = shared * math.sqrt(9)
    assert uniform.min() >= -1.0 and uniform.max() < 1.0
    blocks = [uniform[:, :d] / math.sqrt(9) for d in (9, 5, 7)]
    _, ref = np_reference(params, x, onehot, direct=blocks)
    assert_grads_close(grads, ref)


@pytest.mark.parametrize("name", ["usf", "frsf", "brsf", "kp", "drtp"])
def test_vmap_over_seeds_equals_single_runs(name):
    rule = fa_jax.get_rule(name)
    x, _, onehot = data()
    grad_fn = fa_jax.value_and_grad(MODEL, mse, rule)

    def run(seed):
        params = models.init_mlp(SIZES, key=jax.random.fold_in(jax.random.key(0), seed))
        feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(seed), model=MODEL, inputs=x)
        return grad_fn(params, feedback, x, onehot, step=seed + 3)

    seeds = jnp.arange(2)
    losses, grads = jax.jit(jax.vmap(run))(seeds)
    for i in range(2):
        loss, single = jax.jit(run)(seeds[i])
        np.testing.assert_allclose(losses[i], loss, rtol=1e-6)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(single)):
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(grads[0]["kernel"][0], grads[0]["kernel"][1])


def test_brsf_redraws_per_step_and_is_reproducible():
    rule = fa_jax.BRSF()
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2))
    x, _, onehot = data()
    grad_fn = jax.jit(fa_jax.value_and_grad(MODEL, mse, rule))
    _, at3 = grad_fn(params, feedback, x, onehot, step=3)
    _, at3_again = grad_fn(params, fa_jax.init_feedback(rule, params, key=jax.random.key(2)), x, onehot, step=jnp.int32(3))
    _, at4 = grad_fn(params, feedback, x, onehot, step=4)
    np.testing.assert_array_equal(at3[0]["kernel"], at3_again[0]["kernel"])
    assert not np.allclose(at3[0]["kernel"], at4[0]["kernel"])
    np.testing.assert_array_equal(at3[-1]["kernel"], at4[-1]["kernel"])  # the output layer's dW is exact
    with pytest.raises(ValueError, match="step"):
        grad_fn(params, feedback, x, onehot)


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
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(seed + 1))
    x, _, onehot = data(seed, batch=4, sizes=sizes)
    grad_fn = fa_jax.value_and_grad(MODEL, mse, rule)

    def train_step(params, step):
        _, grads = grad_fn(params, feedback, x, onehot, step=step)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        mats = [rule.backward_matrix(layer["kernel"], (leaf, step)) for layer, leaf in zip(params, layer_keys(feedback))]
        agree = [jnp.all(jnp.sign(b) == jnp.sign(layer["kernel"])) for b, layer in zip(mats, params)]
        return params, jnp.stack(agree)

    _, agree = jax.lax.scan(train_step, params, jnp.arange(4))
    assert agree.shape == (4, len(sizes) - 1)
    assert bool(jnp.all(agree))


def angle(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return math.degrees(math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)))


def test_kolen_pollack_angle_falls_toward_zero():
    """Lillicrap's linear task 30-20-10: KP's B aligns with W (angle -> 0), FA's does not need to."""
    sizes, lr, wd = (30, 20, 10), 0.05, 0.2
    model = models.mlp("linear")
    kw, kt, kx = jax.random.split(jax.random.key(0), 3)
    params = models.init_mlp(sizes, key=kw)
    target_map = jax.random.normal(kt, (30, 10)) / math.sqrt(30)
    x = jax.random.normal(kx, (64, 30))
    y = x @ target_map
    rule = fa_jax.KolenPollack(init=jax.nn.initializers.uniform(0.5))
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(5))
    grad_fn = fa_jax.value_and_grad(model, mse, rule)

    def train_step(state, _):
        params, feedback = state
        loss, grads = grad_fn(params, feedback, x, y)
        updates = jax.tree.map(lambda g, p: -lr * g - lr * wd * p, grads, params)  # SGD + weight decay on W
        feedback = fa_jax.update_feedback(rule, feedback, updates, params, decay=lr * wd)
        params = jax.tree.map(jnp.add, params, updates)
        return (params, feedback), loss

    angles, losses = [], []
    state = (params, feedback)
    chunk = jax.jit(lambda s: jax.lax.scan(train_step, s, None, length=150))
    for _ in range(3):
        angles.append(angle(state[1].kernels[1]["kernel"], state[0][1]["kernel"]))
        state, chunk_losses = chunk(state)
        losses.extend(np.asarray(chunk_losses))
    angles.append(angle(state[1].kernels[1]["kernel"], state[0][1]["kernel"]))
    assert angles[0] > 60.0  # an independent random B is near-orthogonal to W
    assert all(later < earlier for earlier, later in zip(angles, angles[1:])), angles
    assert angles[-1] < 5.0, angles
    assert losses[-1] < 0.5 * losses[0]
    # B − W shrinks by (1 − lr·wd) per step: the closed form of the update.
    gap0 = np.asarray(feedback.kernels[0]["kernel"] - params[0]["kernel"])
    gap = np.asarray(state[1].kernels[0]["kernel"] - state[0][0]["kernel"])
    np.testing.assert_allclose(gap, gap0 * (1 - lr * wd) ** 450, rtol=1e-3, atol=1e-6)


def test_update_feedback_leaves_other_rules_alone():
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    updates = jax.tree.map(jnp.ones_like, params)
    for name in ("fa", "frsf", "usf"):
        feedback = fa_jax.init_feedback(name, params, key=jax.random.key(2))
        assert fa_jax.update_feedback(name, feedback, updates, params, decay=0.1) is feedback
    kp = fa_jax.init_feedback("kp", params, key=jax.random.key(2))
    new = fa_jax.update_feedback("kp", kp, updates, params)
    np.testing.assert_allclose(new.kernels[0]["kernel"], kp.kernels[0]["kernel"] + 1.0)
    assert new.kernels[0]["bias"] is None


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_drtp_hidden_updates_do_not_depend_on_the_output_error(loss_name):
    """DRTP's hidden signal is y* B_l: changing the output layer (so the error) or the loss leaves it as is."""
    rule = fa_jax.DRTP()
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    x, labels, _ = data()
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2), model=MODEL, inputs=x)
    loss = mse_onehot_labels if loss_name == "mse" else cross_entropy
    grad_fn = jax.jit(fa_jax.value_and_grad(MODEL, loss, rule))
    other = list(params[:-1]) + [{"kernel": params[-1]["kernel"] * -3.0 + 0.5, "bias": params[-1]["bias"] + 1.0}]
    other_loss = cross_entropy if loss_name == "mse" else mse_onehot_labels
    _, grads = grad_fn(params, feedback, x, labels)
    _, grads_other_w = grad_fn(other, feedback, x, labels)
    _, grads_other_loss = jax.jit(fa_jax.value_and_grad(MODEL, other_loss, rule))(params, feedback, x, labels)
    for changed in (grads_other_w, grads_other_loss):
        for got, want in zip(changed[:-1], grads[:-1]):
            np.testing.assert_array_equal(got["kernel"], want["kernel"])
            np.testing.assert_array_equal(got["bias"], want["bias"])
        assert not np.allclose(changed[-1]["kernel"], grads[-1]["kernel"])  # the output block sees the error
    # DFA, by contrast, does depend on the error.
    dfa = fa_jax.init_feedback("dfa", params, key=jax.random.key(2), model=MODEL, inputs=x)
    dfa_fn = jax.jit(fa_jax.value_and_grad(MODEL, loss, "dfa"))
    assert not np.allclose(dfa_fn(params, dfa, x, labels)[1][0]["kernel"], dfa_fn(other, dfa, x, labels)[1][0]["kernel"])


def test_rule_registry_and_errors():
    for name, cls in [("usf", fa_jax.USF), ("frsf", fa_jax.FRSF), ("brsf", fa_jax.BRSF), ("kp", fa_jax.KolenPollack), ("drtp", fa_jax.DRTP), ("shallow", fa_jax.Shallow)]:
        assert isinstance(fa_jax.get_rule(name), cls)
        assert isinstance(fa_jax.get_rule(name.upper()), cls)
    with pytest.raises(ValueError, match=r"unknown rule 'sign'.*brsf.*drtp.*kp.*usf"):
        fa_jax.get_rule("sign")
    with pytest.raises(ValueError, match="USF.scale"):
        fa_jax.USF(scale="big")
    params = models.init_mlp(SIZES, key=jax.random.key(1))
    x, labels, _ = data()
    feedback = fa_jax.init_feedback("drtp", params, key=jax.random.key(2), model=MODEL, inputs=x)
    with pytest.raises(ValueError, match="targets: DRTP"):
        fa_jax.value_and_grad(MODEL, lambda o, t: jnp.sum(o), "drtp")(params, feedback, x, labels[:, None] * 1.0)
    with pytest.raises(ValueError, match="model=.*inputs="):
        fa_jax.init_feedback("drtp", params, key=jax.random.key(2))
    kp = fa_jax.init_feedback("kp", params, key=jax.random.key(2))
    keys_only = fa_jax.init_feedback(fa_jax.FRSF(regenerate=True), params, key=jax.random.key(2))
    with pytest.raises(ValueError, match="regenerated key"):
        fa_jax.kolen_pollack_update(keys_only, params, params)
    assert kp.kernels[0]["kernel"].shape == params[0]["kernel"].shape


def test_sign_rules_on_conv_and_einsum():
    """The backward matrix path also serves ops.conv and ops.einsum: dx uses |M| ⊙ sign(W)."""
    rule = fa_jax.FRSF()
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 2))
    params = {"conv": {"kernel": kernel}}
    feedback = fa_jax.init_feedback(rule, params, key=jax.random.key(2))
    m = feedback.kernels["conv"]["kernel"]

    def model(p, x, ops):
        return ops.conv(x, p["conv"]["kernel"], strides=1, padding="SAME")

    def loss(y, t):
        return jnp.sum(y * t)

    t = jax.random.normal(jax.random.key(3), (2, 5, 5, 4))
    _, grads = jax.jit(fa_jax.value_and_grad(model, loss, rule))(params, feedback, x, t)
    _, exact = jax.jit(fa_jax.value_and_grad(model, loss, "bp"))(params, None, x, t)
    np.testing.assert_allclose(grads["conv"]["kernel"], exact["conv"]["kernel"], rtol=1e-5)  # dW is exact
    ops = fa_jax.FAOps(None, rule=rule, step=None)
    bound = fa_jax.Bound(kernel, m, "conv/kernel")
    dx = jax.jit(jax.grad(lambda x_: loss(ops.conv(x_, bound), t)))(x)
    b = jnp.abs(m) * jnp.sign(kernel)
    dx_ref = jax.jit(jax.grad(lambda x_: loss(fa_jax._ops.ConvProduct((1, 1), "SAME")(x_, b), t)))(x)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    spec_kernel = jax.random.normal(jax.random.key(4), (2, 3, 4))
    spec_m = rule.init(jax.random.key(5), spec_kernel.shape, jnp.float32)
    xe = jax.random.normal(jax.random.key(6), (5, 2))
    te = jax.random.normal(jax.random.key(7), (5, 3, 4))
    dxe = jax.jit(jax.grad(lambda x_: jnp.sum(ops.einsum("bd,dhk->bhk", x_, fa_jax.Bound(spec_kernel, spec_m)) * te)))(xe)
    np.testing.assert_allclose(dxe, np.einsum("bhk,dhk->bd", te, np.abs(spec_m) * np.sign(spec_kernel)), rtol=1e-5, atol=1e-5)
