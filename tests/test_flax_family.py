"""The rule family (uSF, frSF, brSF, Kolen–Pollack, DRTP) through the Flax adapters.

Each adapter path (stateful NNX, the pure NNX ``split`` path, Linen) is checked
against the functional core ``fa_jax.value_and_grad`` on the same MLP weights,
with feedback drawn from the same key (so the same layer keys), and against the
NumPy closed forms of tests/test_rules_family.py (Liao et al. 2016; Akrout et al.
2019; Frenkel et al. 2021).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_nnx import MLP as NNXMLP
from test_nnx import SIZES, batch, mse
from test_rules_family import _reference_for, assert_grads_close, mse_onehot_labels, np_reference

import fa_jax
import fa_jax.linen as flinen
import fa_jax.nnx as fnnx
from fa_jax import transform
from fa_jax.models import mlp

KEY = jax.random.key(100)
STEP = 7
FA_FAMILY = [fa_jax.USF(), fa_jax.USF(scale=0.3), fa_jax.FRSF(), fa_jax.FRSF(regenerate=True), fa_jax.BRSF(),
             fa_jax.KolenPollack()]
PATHS = ["nnx", "nnx-pure", "linen"]


def rule_id(rule):
    return f"{rule.name}{'-regen' if getattr(rule, 'regenerate', False) else ''}" + (
        "-s" if getattr(rule, "scale", "xavier") != "xavier" else "")


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for size in SIZES[1:-1]:
            x = jnp.tanh(nn.Dense(size)(x))
        return nn.Dense(SIZES[-1])(x)


def labels_batch(n=8):
    x, _ = batch(n=n)
    labels = jax.random.randint(jax.random.key(9), (n,), 0, SIZES[-1])
    return x, labels


# ----------------------------------------------------------------------------- one run per adapter path


class Run:
    """One adapter path for ``rule`` on the MLP: its grads, and the same model as a core problem.

    ``core_params`` has the adapter's param tree (so the core's layer paths are the
    adapter's), ``core_model`` runs it with ``fa_jax.models.mlp("tanh")``.
    """

    def __init__(self, path, rule, x, seed=0):
        self.path, self.rule, self._compiled = path, rule, {}
        if path == "linen":
            self.variables = LinenMLP().init(jax.random.key(seed), x)
            self.adapted = flinen.adapt(LinenMLP(), rule)
            self.feedback = self.adapted.init_feedback(self.variables, x, key=KEY)
            self.core_params = self.variables["params"]
            self.core_model = lambda p, x_, ops: mlp("tanh")([p[f"Dense_{i}"] for i in range(3)], x_, ops)
        else:
            self.model = fnnx.convert(NNXMLP(SIZES, rngs=nnx.Rngs(seed)), rule, key=KEY, inputs=x)
            self.core_params = {"layers": [{"kernel": l.kernel[...], "bias": l.bias[...]} for l in self.model.layers]}
            self.core_model = lambda p, x_, ops: mlp("tanh")(p["layers"], x_, ops)

    @property
    def params(self):
        """The weights as the list of ``{"kernel", "bias"}`` the NumPy references take."""
        if self.path == "linen":
            return [self.variables["params"][f"Dense_{i}"] for i in range(3)]
        return self.core_params["layers"]

    def feedback_leaves(self):
        """Each layer's feedback leaf (B, M or the layer key), in layer order."""
        if self.path == "linen":
            return [self.feedback.kernels[f"Dense_{i}"]["kernel"] for i in range(3)]
        return [layer.fa_feedback[...] for layer in self.model.layers]

    def grads(self, x, targets, loss=mse, *, step=None, jit=True):
        """``(loss, [{"kernel", "bias"}] per layer)`` through this adapter path (one compile per loss)."""
        if (loss, jit) not in self._compiled:
            fn = self._grad_fn(loss)
            self._compiled[loss, jit] = (nnx.jit(fn) if self.path == "nnx" else jax.jit(fn)) if jit else fn
        value, grads = self._compiled[loss, jit](self._state(), x, targets, step)
        if self.path == "linen":
            return value, [grads[f"Dense_{i}"] for i in range(3)]
        return value, [{k: grads["layers"][i][k][...] for k in ("kernel", "bias")} for i in range(3)]

    def _state(self):
        """What the gradient is taken of, read now (tests change weights between calls)."""
        return {"nnx": lambda: self.model, "nnx-pure": lambda: fnnx.split(self.model)[1:],
                "linen": lambda: self.variables["params"]}[self.path]()

    def _grad_fn(self, loss):
        if self.path == "nnx":

            def stateful(model, x, targets, step):
                return nnx.value_and_grad(lambda m: loss(fnnx.call(m, x, step=step, targets=targets), targets))(model)

            return stateful
        if self.path == "nnx-pure":
            grad_fn = fnnx.value_and_grad(fnnx.split(self.model)[0], loss)
            return lambda state, x, targets, step: grad_fn(*state, x, targets, step=step)

        def linen(params, x, targets, step):
            def objective(p):
                return loss(self.adapted.apply({"params": p}, self.feedback, x, step=step, targets=targets), targets)

            return jax.value_and_grad(objective)(params)

        return linen


def core_grads(run, x, targets, loss=mse, *, feedback=None, step=None):
    """The functional core on the same weights; FA-family feedback drawn from the same key."""
    if feedback is None:
        feedback = fa_jax.init_feedback(run.rule, run.core_params, key=KEY)
    value, grads = jax.jit(fa_jax.value_and_grad(run.core_model, loss, run.rule))(
        run.core_params, feedback, x, targets, step=step)
    return value, [grads[f"Dense_{i}"] for i in range(3)] if run.path == "linen" else grads["layers"]


# ----------------------------------------------------------------------------- FA family: uSF, frSF, brSF, KP


# Eager mode runs op by op (slow): uSF covers it for the FA family (and DRTP below).
FA_FAMILY_CASES = [(rule, True) for rule in FA_FAMILY] + [(fa_jax.USF(), False)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule,jit", FA_FAMILY_CASES,
                         ids=[f"{rule_id(r)}-{'jit' if j else 'eager'}" for r, j in FA_FAMILY_CASES])
def test_fa_family_matches_core_and_numpy(rule, jit, path):
    x, t = batch()
    run = Run(path, rule, x)
    # The adapter holds the very leaves the core draws from the same key for the same layer paths.
    core_feedback = fa_jax.init_feedback(rule, run.core_params, key=KEY)
    core_leaves = [leaf for leaf in jax.tree.leaves(core_feedback.kernels)]
    for got, want in zip(run.feedback_leaves(), core_leaves):
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
        else:
            np.testing.assert_array_equal(got, want)

    loss, grads = run.grads(x, t, step=STEP, jit=jit)
    core_loss, core = core_grads(run, x, t, feedback=core_feedback, step=STEP)
    np.testing.assert_allclose(loss, core_loss, rtol=1e-6)
    assert_grads_close(grads, [{k: np.asarray(v) for k, v in layer.items()} for layer in core], rtol=1e-5, atol=1e-6)

    leaves = fa_jax.FAFeedback([{"kernel": leaf} for leaf in run.feedback_leaves()])
    ref_loss, ref = _reference_for(rule, run.params, leaves, x, t, STEP)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref, rtol=1e-4, atol=1e-5)
    _, bp = np_reference(run.params, x, t, chain=[l["kernel"] for l in run.params])
    assert not np.allclose(grads[0]["kernel"], bp[0]["kernel"], atol=1e-4)  # not BP in disguise


def _dense_backward_matrix(path, rule, kernel, step):
    """B as the adapter's backward uses it for one dense layer: ``dx = g Bᵀ`` with ``g = I`` gives ``Bᵀ``."""
    n_out = kernel.shape[1]
    x = jnp.zeros((n_out, kernel.shape[0]))
    if path == "nnx":
        layer = nnx.Linear(*kernel.shape, rngs=nnx.Rngs(0))
        layer.kernel.set_value(kernel)
        holder = fnnx.convert(nnx.Sequential(layer), rule, key=KEY)
        forward = lambda x_: fnnx.call(holder, x_, step=step)
    else:
        variables = {"params": {"layers_0": {"kernel": kernel, "bias": jnp.zeros(n_out)}}}
        adapted = flinen.adapt(nn.Sequential([nn.Dense(n_out)]), rule)  # the root module is never intercepted
        feedback = adapted.init_feedback(variables, x, key=KEY)
        forward = lambda x_: adapted.apply(variables, feedback, x_, step=step)
    _, pullback = jax.vjp(forward, x)
    return pullback(jnp.eye(n_out))[0].T


@pytest.mark.parametrize("path", ["nnx", "linen"])
@pytest.mark.parametrize("name", ["usf", "frsf", "brsf"])
def test_sign_of_b_equals_sign_of_w_through_the_adapter(name, path):
    """Sign concordance (Liao et al. 2016): the B the backward uses has W's sign, zero where W is zero."""
    rule = fa_jax.get_rule(name)
    kernel = jax.random.normal(jax.random.key(3), (4, 3)).at[0, 0].set(0.0)
    for step in (0, 1):
        kernel = kernel - 0.3 * jax.random.normal(jax.random.fold_in(jax.random.key(4), step), kernel.shape)
        kernel = kernel.at[0, 0].set(0.0)
        b = _dense_backward_matrix(path, rule, kernel, step)
        np.testing.assert_array_equal(np.sign(b), np.sign(kernel))
        if name == "usf":
            np.testing.assert_allclose(np.abs(b)[kernel != 0], np.sqrt(2.0 / 7.0), rtol=1e-6)


@pytest.mark.parametrize("name", ["usf", "frsf", "brsf", "kp"])
def test_conv_and_einsum_input_gradients_use_the_rules_b(name):
    """nnx.Conv and nnx.Einsum: dx is the VJP of the same layers with B = rule.backward_matrix(W, (leaf, t))."""
    rule = fa_jax.get_rule(name)
    conv = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    head = nnx.Einsum("bhwc,cd->bhwd", (3, 4), (4,), rngs=nnx.Rngs(1))
    holder = fnnx.convert(nnx.Sequential(conv, head), rule, key=KEY)
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 2))
    y, pullback = jax.vjp(lambda x_: fnnx.call(holder, x_, step=STEP), x)
    g = jax.random.normal(jax.random.key(3), y.shape)
    b_conv, b_head = [rule.backward_matrix(m.kernel[...], (m.fa_feedback[...], STEP)) for m in (conv, head)]

    def with_b(x_):
        h = jax.lax.conv_general_dilated(x_, b_conv, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.einsum("bhwc,cd->bhwd", h + conv.bias[...], b_head)

    np.testing.assert_allclose(pullback(g)[0], jax.vjp(with_b, x)[1](g)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_brsf_redraws_per_step_and_is_reproducible(path):
    x, t = batch()
    run = Run(path, fa_jax.BRSF(), x)
    _, at3 = run.grads(x, t, step=3)
    _, at3_again = run.grads(x, t, step=jnp.int32(3))
    _, at4 = run.grads(x, t, step=4)
    np.testing.assert_array_equal(at3[0]["kernel"], at3_again[0]["kernel"])
    assert not np.allclose(at3[0]["kernel"], at4[0]["kernel"])
    np.testing.assert_array_equal(at3[-1]["kernel"], at4[-1]["kernel"])  # the output layer's dW is exact


@pytest.mark.parametrize("path", PATHS)
def test_brsf_without_a_step_raises_but_evaluates(path):
    x, t = batch()
    run = Run(path, fa_jax.BRSF(), x)
    if path == "linen":
        run.adapted.apply(run.variables, run.feedback, x)  # the forward needs no step
        hint = r"apply\(variables, feedback, \*args, step=step\)"
    else:
        run.model(x)
        hint = r"fa_jax.nnx.call\(model, x, step=step\)"
    with pytest.raises(ValueError, match=rf"layer '(layers/2|Dense_2)'.*'brsf'.*expected a step, given none.*{hint}"):
        run.grads(x, t, step=None, jit=False)
    with pytest.raises(TypeError, match="step: expected an integer scalar"):
        run.grads(x, t, step=jnp.float32(1.0), jit=False)


# ----------------------------------------------------------------------------- Kolen–Pollack


def _gap(feedback_leaves, params):
    return [np.asarray(b) - np.asarray(layer["kernel"]) for b, layer in zip(feedback_leaves, params)]


def test_kolen_pollack_nnx_optimizer_update_moves_b_toward_w():
    """B − W shrinks by (1 − lr·wd) per step (Akrout et al. 2019, eqs. 5–6); the optimizer never holds B."""
    x, t = batch(n=16)
    lr, wd = 0.05, 0.5
    model = fnnx.convert(NNXMLP(SIZES, rngs=nnx.Rngs(0)), "kp", key=KEY)
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=wd), wrt=nnx.Param)
    assert not jax.tree.leaves(nnx.state(optimizer.opt_state, fnnx.Feedback))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: mse(m(x), t))(model)
        fnnx.optimizer_update(optimizer, model, grads, decay=lr * wd)
        return loss

    weights = lambda: [{"kernel": l.kernel[...]} for l in model.layers]
    gap0 = _gap([l.fa_feedback[...] for l in model.layers], weights())
    losses = [float(step(model, optimizer)) for _ in range(5)]
    gap = _gap([l.fa_feedback[...] for l in model.layers], weights())
    for before, after in zip(gap0, gap):
        np.testing.assert_allclose(after, before * (1 - lr * wd) ** 5, rtol=1e-4, atol=1e-6)
    assert losses[-1] < losses[0]


def test_kolen_pollack_nnx_pure_update_equals_the_core_update():
    x, t = batch()
    model = fnnx.convert(NNXMLP(SIZES, rngs=nnx.Rngs(0)), "kp", key=KEY)
    graphdef, params, feedback = fnnx.split(model)
    _, grads = fnnx.value_and_grad(graphdef, mse)(params, feedback, x, t)
    tx = optax.adamw(0.1, weight_decay=0.3)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = jax.jit(lambda f, u, p: fnnx.update_feedback("kp", f, u, p, decay=0.03))(feedback, updates, params)
    core_params = nnx.to_pure_dict(params)
    core_feedback = fa_jax.FAFeedback({"layers": {i: {"kernel": layer["fa_feedback"], "bias": None}
                                                  for i, layer in nnx.to_pure_dict(feedback)["layers"].items()}})
    want = fa_jax.kolen_pollack_update(core_feedback, nnx.to_pure_dict(updates), core_params, decay=0.03)
    for i in range(3):
        np.testing.assert_allclose(new["layers"][i]["fa_feedback"][...], want.kernels["layers"][i]["kernel"],
                                   rtol=1e-6, atol=1e-7)
    assert not np.allclose(new["layers"][0]["fa_feedback"][...], feedback["layers"][0]["fa_feedback"][...])
    assert fnnx.update_feedback("frsf", feedback, updates, params) is feedback  # fixed feedback: unchanged
    nnx.update(model, new)  # the learned B goes back into the model
    np.testing.assert_array_equal(model.layers[1].fa_feedback[...], new["layers"][1]["fa_feedback"][...])


def test_kolen_pollack_linen_feedback_learns_with_the_core_update():
    """Linen's feedback is the core's FAFeedback shaped like params: fa_jax.update_feedback steps it."""
    x, t = batch(n=16)
    lr, wd = 0.05, 0.5
    run = Run("linen", fa_jax.KolenPollack(), x)
    tx = optax.adamw(lr, weight_decay=wd)
    params, feedback = run.variables["params"], run.feedback
    state = tx.init(params)

    @jax.jit
    def step(params, state, feedback):
        grads = jax.grad(lambda p: mse(run.adapted.apply({"params": p}, feedback, x), t))(params)
        updates, state = tx.update(grads, state, params)
        feedback = fa_jax.update_feedback("kp", feedback, updates, params, decay=lr * wd)
        return optax.apply_updates(params, updates), state, feedback

    gap0 = _gap(run.feedback_leaves(), run.params)
    for _ in range(5):
        params, state, feedback = step(params, state, feedback)
    leaves = [feedback.kernels[f"Dense_{i}"]["kernel"] for i in range(3)]
    gap = _gap(leaves, [params[f"Dense_{i}"] for i in range(3)])
    for before, after in zip(gap0, gap):
        np.testing.assert_allclose(after, before * (1 - lr * wd) ** 5, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- DRTP


def _drtp_core_feedback(run):
    """The core's DRTP feedback holding the adapter's projection (the core MLP names its taps layer_0, layer_1)."""
    feedback = run.feedback if run.path == "linen" else None
    if feedback is None:
        taps, projection = run.model.fa_taps, run.model.fa_dfa_feedback[...]
    else:
        taps, projection = feedback.taps, feedback.projection
    renamed = tuple(fa_jax.TapSpec(f"layer_{i}", tap.shape) for i, tap in enumerate(taps))
    return fa_jax.DFAFeedback(projection, renamed, (SIZES[-1],))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("path", PATHS)
def test_drtp_matches_core_and_numpy(path, jit):
    """Hidden taps get y* B_l (Frenkel et al. 2021, eq. 6); the output block its exact gradient."""
    x, labels = labels_batch()
    run = Run(path, fa_jax.DRTP(), x)
    loss, grads = run.grads(x, labels, mse_onehot_labels, jit=jit)
    core_feedback = _drtp_core_feedback(run)
    core_loss, core = core_grads(run, x, labels, mse_onehot_labels, feedback=core_feedback)
    np.testing.assert_allclose(loss, core_loss, rtol=1e-6)
    assert_grads_close(grads, [{k: np.asarray(v) for k, v in layer.items()} for layer in core], rtol=1e-5, atol=1e-6)
    onehot = jax.nn.one_hot(labels, SIZES[-1])
    blocks = [np.asarray(b) for b in fa_jax.dfa_matrices(core_feedback)]
    ref_loss, ref = np_reference(run.params, x, onehot, direct=blocks, direct_source="target")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_drtp_hidden_grads_do_not_depend_on_the_output_error(path):
    """Another output layer (so another error), the same targets: the same hidden gradients."""
    x, labels = labels_batch()
    run = Run(path, fa_jax.DRTP(), x)
    _, grads = run.grads(x, labels, mse_onehot_labels)
    if path == "linen":
        dense = run.variables["params"]["Dense_2"]
        run.variables = {"params": {**run.variables["params"],
                                    "Dense_2": {"kernel": dense["kernel"] * -3.0 + 0.5, "bias": dense["bias"] + 1.0}}}
    else:
        out = run.model.layers[-1]
        out.kernel.set_value(out.kernel[...] * -3.0 + 0.5)
        out.bias.set_value(out.bias[...] + 1.0)
    _, other = run.grads(x, labels, mse_onehot_labels)
    for changed, same in zip(other[:-1], grads[:-1]):
        np.testing.assert_array_equal(changed["kernel"], same["kernel"])
        np.testing.assert_array_equal(changed["bias"], same["bias"])
    assert not np.allclose(other[-1]["kernel"], grads[-1]["kernel"])  # the output block sees the error


@pytest.mark.parametrize("path", ["nnx", "linen"])
def test_drtp_without_targets_raises_but_evaluates(path):
    x, labels = labels_batch()
    run = Run(path, fa_jax.DRTP(), x)
    if path == "linen":
        run.adapted.apply(run.variables, run.feedback, x)
        objective = lambda p: mse_onehot_labels(run.adapted.apply({"params": p}, run.feedback, x), labels)
        grad, params, hint = jax.grad(objective), run.variables["params"], r"apply\(.*targets=targets\)"
    else:
        run.model(x)
        grad, params = nnx.grad(lambda m: mse_onehot_labels(m(x), labels)), run.model
        hint = r"fa_jax.nnx.call\(model, x, targets=targets\).*fa_jax.nnx.value_and_grad\(graphdef, loss\)"
    with pytest.raises(ValueError, match=rf"rule 'drtp'.*expected targets, given none.*{hint}"):
        grad(params)
    with pytest.raises(ValueError, match="targets: DRTP projects the target"):
        run.grads(x, labels[:, None] * 1.0, lambda o, t: jnp.sum(o), jit=False)


# ----------------------------------------------------------------------------- optimizers and optax


def _as_numpy(state):
    """A copy of every leaf as NumPy (a key as its key data)."""
    as_data = lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
    return jax.tree.map(lambda a: np.array(as_data(a)), state)


@pytest.mark.parametrize("name", ["usf", "frsf", "brsf", "drtp"])
def test_adamw_through_nnx_optimizer_never_changes_fixed_feedback(name):
    x, labels = labels_batch(n=32)
    model = fnnx.convert(NNXMLP(SIZES, rngs=nnx.Rngs(0)), name, key=KEY, inputs=x)
    before = _as_numpy(fnnx.feedback_of(model))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-2, weight_decay=0.5), wrt=nnx.Param)
    assert not jax.tree.leaves(nnx.state(optimizer.opt_state, fnnx.Feedback))

    @nnx.jit
    def step(model, optimizer, t):
        def objective(m):
            return mse_onehot_labels(fnnx.call(m, x, step=t, targets=labels), labels)

        loss, grads = nnx.value_and_grad(objective)(model)
        fnnx.optimizer_update(optimizer, model, grads, decay=3e-2 * 0.5)  # KP's step; a no-op for these rules
        return loss

    losses = [float(step(model, optimizer, jnp.int32(t))) for t in range(40)]
    assert losses[-1] < 0.7 * losses[0]
    after = _as_numpy(fnnx.feedback_of(model))
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_brsf_through_the_optax_transform_gets_the_step():
    """``rule_gradients`` passes ``step=`` on: the transform's updates equal grad_fn's at that step."""
    x, t = batch()
    model = fnnx.convert(NNXMLP(SIZES, rngs=nnx.Rngs(0)), "brsf", key=KEY)
    graphdef, params, feedback = fnnx.split(model)
    grad_fn = fnnx.value_and_grad(graphdef, mse)
    tx = transform.rule_gradients(grad_fn)
    updates, state = jax.jit(lambda p, s, f: tx.update(p, s, p, feedback=f, inputs=x, targets=t, step=5))(
        params, tx.init(params), feedback)
    loss, grads = jax.jit(lambda p, f: grad_fn(p, f, x, t, step=5))(params, feedback)
    np.testing.assert_allclose(state.loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expected a step"):
        tx.update(params, tx.init(params), params, feedback=feedback, inputs=x, targets=t)
