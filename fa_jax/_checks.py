"""Argument checks shared by the public entry points.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
value or shape) at trace time, and every message starts with the name of the
argument (``"params/0/kernel: ..."``), says what was expected and what was
given. They read only static facts (shapes, dtypes, tree structure), so they
cost nothing inside ``jit``, ``vmap`` or ``lax.scan``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import get_opaque_trace_state

# No fa_jax imports here: _ops and _feedback import this module.


def path_str(path: tuple) -> str:
    """Key path as ``"layers/0/kernel"``: the layer path used in messages and layer ids."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def is_key(value: Any) -> bool:
    """True for a typed PRNG key array (in feedback, a slot whose B is regenerated)."""
    return hasattr(value, "dtype") and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)


SEED_LIMIT = 2**32  # jax.random.key wraps larger seeds silently


def describe(value: Any) -> str:
    """``"float32[4, 3]"`` for an array-like, the type name otherwise."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__


def is_array(value: Any) -> bool:
    """True for arrays, tracers, NumPy arrays and ``ShapeDtypeStruct``s."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and isinstance(value.shape, tuple)


def check_callable(value: Any, name: str) -> None:
    if not callable(value):
        raise TypeError(f"{name}: expected a callable, given {describe(value)}")


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, given {describe(value)}")


def check_key(key: Any, name: str = "key") -> None:
    """``key`` must be one typed PRNG key, ``jax.random.key(seed)``, of shape ``()``."""
    if is_key(key):
        if key.shape != ():
            raise ValueError(
                f"{name}: expected a single PRNG key of shape (), given keys of shape {key.shape}; "
                "vmap over the keys instead of passing a batch"
            )
        return
    if is_array(key) and key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        raise TypeError(
            f"{name}: expected a typed PRNG key from jax.random.key(seed), given a raw uint32{list(key.shape)} "
            "key (jax.random.PRNGKey); convert it with jax.random.wrap_key_data(key)"
        )
    raise TypeError(f"{name}: expected a typed PRNG key from jax.random.key(seed), given {describe(key)}")


def check_int(value: Any, name: str, *, minimum: int | None = 0, limit: int | None = None) -> int:
    """A Python or NumPy integer (not a bool, not a float such as ``3.0``) in ``[minimum, limit)``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, given {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, given {value}")
    if limit is not None and value >= limit:
        raise ValueError(f"{name}: expected an integer < {limit}, given {value}")
    return value


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed is an integer in ``[0, 2**32)``; floats and larger ints are refused, not rounded or wrapped."""
    return check_int(seed, name, minimum=0, limit=SEED_LIMIT)


def check_steps(steps: Any, name: str = "steps") -> int:
    """A step count is a non-negative integer."""
    return check_int(steps, name, minimum=0)


def check_step_value(step: Any, name: str = "step") -> None:
    """A training step: a non-negative Python int, or an integer scalar array (traced values pass)."""
    if is_array(step) and not isinstance(step, np.generic):
        if step.shape != () or not jnp.issubdtype(step.dtype, jnp.integer):
            raise TypeError(f"{name}: expected an integer scalar, given {describe(step)}")
        if not isinstance(step, jax.core.Tracer) and int(step) < 0:
            raise ValueError(f"{name}: expected a step >= 0, given {int(step)}")
        return
    # A step becomes an int32 scalar (fold_in data); a larger one would overflow inside JAX.
    check_int(step, name, minimum=0, limit=2**31)


def check_batch(tree: Any, name: str) -> None:
    """No array in ``tree`` may have a zero-size leading (batch) axis: a mean over no samples is NaN."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if is_array(leaf) and leaf.ndim and leaf.shape[0] == 0:
            where = f"{name}/{path_str(path)}" if path else name
            raise ValueError(f"{where}: expected at least one sample, given an empty batch {describe(leaf)}")


def check_floating_tree(tree: Any, name: str) -> None:
    """Every leaf of ``tree`` is a floating-point array (what ``grad`` and optimizers need)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{name}: expected a pytree of floating-point arrays, given an empty pytree")
    for path, leaf in leaves:
        where = f"{name}/{path_str(path)}" if path else name
        if not is_array(leaf):
            raise TypeError(f"{where}: expected a floating-point array, given {describe(leaf)}")
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"{where}: expected a floating-point array, given {describe(leaf)}")


def check_array_tree(tree: Any, name: str) -> None:
    """Every leaf of ``tree`` is a numeric array (inputs and targets may be integer labels, or PRNG keys)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        where = f"{name}/{path_str(path)}" if path else name
        if isinstance(leaf, (numbers.Number, np.generic)) and not isinstance(leaf, (str, bytes)):
            continue
        if is_key(leaf):
            continue
        if not is_array(leaf) or not (jnp.issubdtype(leaf.dtype, jnp.number) or jnp.issubdtype(leaf.dtype, jnp.bool_)):
            raise TypeError(f"{where}: expected a numeric array, given {describe(leaf)}")


def check_dtype(dtype: Any, name: str = "dtype") -> None:
    """``dtype`` names a floating-point dtype."""
    try:
        ok = jnp.issubdtype(dtype, jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{name}: expected a floating-point dtype, given {dtype!r}")


def check_dense_args(x: Any, kernel: Any, bias: Any, where: str = "dense") -> None:
    """``x (*batch, fan_in)``, ``kernel (fan_in, fan_out)``, ``bias (fan_out,)`` or ``None``."""
    if not is_array(x):
        raise TypeError(f"{where}: x: expected an array, given {describe(x)}")
    if not is_array(kernel):
        raise TypeError(f"{where}: kernel: expected an array, given {describe(kernel)}")
    if kernel.ndim != 2:
        raise ValueError(f"{where}: kernel: expected shape (fan_in, fan_out), given {describe(kernel)}")
    if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"{where}: x: expected last dim {kernel.shape[0]} (the kernel's fan_in), given {describe(x)}")
    if bias is not None and (not is_array(bias) or tuple(bias.shape) != (kernel.shape[1],)):
        raise ValueError(f"{where}: bias: expected shape ({kernel.shape[1]},), given {describe(bias)}")


def check_feedback_matrix(feedback: Any, weight: Any, where: str = "feedback") -> None:
    """B has the weight's shape and a floating dtype, or is one typed key to redraw it from."""
    if is_key(feedback):
        if feedback.shape != ():
            raise ValueError(f"{where}: expected one PRNG key of shape (), given keys of shape {feedback.shape}")
        return
    if not is_array(feedback):
        raise TypeError(f"{where}: expected an array or a typed PRNG key, given {describe(feedback)}")
    if not jnp.issubdtype(feedback.dtype, jnp.floating):
        raise TypeError(f"{where}: expected a floating-point array, given {describe(feedback)}")
    if tuple(feedback.shape) != tuple(weight.shape):
        raise ValueError(f"{where}: expected the kernel's shape {tuple(weight.shape)}, given {tuple(feedback.shape)}")


def check_floating(value: Any, name: str) -> None:
    if not is_array(value):
        raise TypeError(f"{name}: expected an array, given {describe(value)}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, given {describe(value)}")


def check_targets(outputs: Any, targets: Any) -> None:
    """A target with the outputs' rank must broadcast against them (e.g. MSE, one-hot labels)."""
    if not (is_array(outputs) and is_array(targets)) or outputs.ndim != targets.ndim:
        return
    for out, tgt in zip(outputs.shape, targets.shape, strict=True):
        if out != tgt and 1 not in (out, tgt):
            raise ValueError(
                f"targets: expected a shape that broadcasts against the model outputs {describe(outputs)}, "
                f"given {describe(targets)}"
            )


def check_conv_args(x: Any, kernel: Any, bias: Any, strides: Any, padding: Any, where: str = "conv") -> None:
    """Channels-last ``x (batch, *spatial, c_in)``, ``kernel (*window, c_in, c_out)``, ``bias (c_out,)``."""
    if not is_array(x):
        raise TypeError(f"{where}: x: expected an array, given {describe(x)}")
    if not is_array(kernel):
        raise TypeError(f"{where}: kernel: expected an array, given {describe(kernel)}")
    if kernel.ndim < 3:
        raise ValueError(f"{where}: kernel: expected shape (*window, c_in, c_out), given {describe(kernel)}")
    if x.ndim != kernel.ndim or x.shape[-1] != kernel.shape[-2]:
        raise ValueError(
            f"{where}: x: expected shape (batch, {', '.join(['·'] * (kernel.ndim - 2))}, {kernel.shape[-2]}) "
            f"for kernel {describe(kernel)}, given {describe(x)}"
        )
    if bias is not None and (not is_array(bias) or tuple(bias.shape) != (kernel.shape[-1],)):
        raise ValueError(f"{where}: bias: expected shape ({kernel.shape[-1]},), given {describe(bias)}")
    spatial = kernel.ndim - 2
    steps = (strides,) * spatial if isinstance(strides, numbers.Integral) else strides
    if (
        not isinstance(steps, (tuple, list))
        or len(steps) != spatial
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 1 for s in steps)
    ):
        raise ValueError(f"{where}: strides: expected a positive int or {spatial} positive ints, given {strides!r}")
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
        raise ValueError(f"{where}: padding: expected 'SAME', 'VALID' or pairs of ints, given {padding!r}")


def check_einsum_args(spec: Any, x: Any, kernel: Any, where: str = "einsum") -> None:
    """``spec`` names two operands whose labelled dims agree."""
    if not isinstance(spec, str) or spec.split("->")[0].count(",") != 1:
        raise ValueError(f"{where}: spec: expected an einsum spec with two operands like 'bd,dk->bk', given {spec!r}")
    for name, value in (("x", x), ("kernel", kernel)):
        if not is_array(value):
            raise TypeError(f"{where}: {name}: expected an array, given {describe(value)}")
    try:
        jax.eval_shape(
            lambda a, b: jnp.einsum(spec, a, b),
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: x, kernel: shapes {describe(x)} and {describe(kernel)} do not fit spec {spec!r}: {error}"
        ) from None


def trace_token() -> Any:
    """An opaque token of the current JAX trace: equal only for code traced at the same level."""
    return get_opaque_trace_state(convention="fa_jax")


def check_tap_trace(token: Any, name: str) -> None:
    """A tap must run in the trace its recording started in, or its value leaks out of a nested transform.

    Inside ``jax.checkpoint`` / ``nnx.remat`` / ``nn.remat``, a ``vmap`` or a ``lax.cond`` /
    loop body within the model, the recorded value belongs to that inner trace: the
    error projection cannot reach it (and Flax would silently compute a wrong gradient).
    """
    if trace_token() != token:
        raise ValueError(
            f"tap {name!r} ran inside a JAX transformation nested in the model (jax.checkpoint / nnx.remat / "
            "nn.remat, vmap, lax.cond or a loop body): its value cannot leave that transformation, so the DFA "
            "projection cannot reach it. Expected taps in the model's own trace: tap a module whose call wraps "
            "the transformation rather than one inside it, or run that part without it"
        )
