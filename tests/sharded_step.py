"""One training step of one model, data-parallel and model-sharded, under a rule (run in a child process).

``python tests/sharded_step.py RULE [RULE …]`` forces 4 host devices, takes an MLP step with the batch
sharded over a ``data`` axis, and with the kernels also sharded over a ``model`` axis (their
feedback laid out like them by ``fa_jax.shard_feedback``), and prints one JSON line: the largest
difference from the unsharded step, the shardings that came out, and the collectives in the
compiled programs (read from the optimized HLO).
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa_jax as fj
from fa_jax.models import init_mlp, mlp

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(compiled) -> dict:
    text = compiled.as_text()
    return {name: len(re.findall(rf" {name}(?:-start)?\(", text)) for name in COLLECTIVES}


def report(rule_name: str) -> dict:
    rule = fj.get_rule(rule_name)
    model = mlp("tanh")
    params = init_mlp([16, 64, 64, 8], key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (32, 16))
    t = jax.nn.one_hot(jnp.arange(32) % 8, 8)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(3), model=model, inputs=x)
    grad_fn = fj.value_and_grad(model, lambda o, t: 0.5 * jnp.mean(jnp.sum((o - t) ** 2, -1)), rule)
    tx = optax.adam(1e-2)

    def step(p, s, fb, x, t):
        loss, grads = grad_fn(p, fb, x, t, step=1)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, fj.update_feedback(rule, fb, updates, p), loss

    want = jax.jit(step)(params, tx.init(params), feedback, x, t)
    report = {}

    def put(tree, spec, mesh):
        return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec)), tree)

    for layout, mesh_shape, kernel_spec in (("data", (4, 1), P()), ("data+model", (2, 2), P(None, "model"))):
        mesh = jax.make_mesh(mesh_shape, ("data", "model"))
        sp = [
            {"kernel": put(layer["kernel"], kernel_spec, mesh), "bias": put(layer["bias"], P(*kernel_spec[1:]), mesh)}
            for layer in params
        ]
        sfb = fj.shard_feedback(feedback, sp)
        sx, st = put(x, P("data", None), mesh), put(t, P("data", None), mesh)
        fn = jax.jit(step)
        got = fn(sp, tx.init(sp), sfb, sx, st)
        err = max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        )
        matrices = [leaf for leaf in jax.tree.leaves(got[2].weights) if leaf.ndim == 2]
        report[layout] = {
            "max_abs_diff": err,
            "param_specs": [str(leaf.sharding.spec) for leaf in jax.tree.leaves(got[0])],
            "feedback_specs": [str(leaf.sharding.spec) for leaf in matrices],
            "collectives": collectives(fn.lower(sp, tx.init(sp), sfb, sx, st).compile()),
        }
    return report


if __name__ == "__main__":
    print(json.dumps({name: report(name) for name in sys.argv[1:]}))
