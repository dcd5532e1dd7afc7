"""Taps: where a tap rule (DFA, DRTP, shallow) cuts the network and feeds each block.

* :func:`tap` marks an activation in any framework's code. It is a JAX
  primitive that is the identity everywhere (``jit``, ``grad``, ``vmap``), so
  models run unchanged; the engine finds it in the program by its name.
* :func:`cut` is the identity whose backward passes *nothing* (a symbolic zero),
  so no error crosses a tap and the blocks upstream build no ``g Wᵀ`` product.
  It is a ``custom_vjp``, not ``stop_gradient``: an outer ``jax.jacrev`` of the
  update still sees how a block's input depends on upstream weights.
* :func:`head` is the identity on the model output whose backward sends, beside
  the output's own cotangent ``e = ∂L/∂y``, the rule's signal to every tap
  (``e B_l`` for DFA, Nøkland 2016, eq. 3) through one projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from fa_jax import _checks
from fa_jax._engine import _product
from fa_jax._specs import OutputSpec, TapSpec

tap_p = Primitive("fa_jax_tap")
tap_p.def_impl(lambda x, *, name: x)
tap_p.def_abstract_eval(lambda x, *, name: x)
ad.deflinear2(tap_p, lambda ct, x, *, name: [ct])
batching.primitive_batchers[tap_p] = lambda args, dims, *, name: (tap_p.bind(*args, name=name), dims[0])
mlir.register_lowering(tap_p, lambda ctx, x, *, name: [x])


def tap(h: jax.Array, name: str | None = None) -> jax.Array:
    """Mark the activation ``h`` as a tap: the identity, seen by tap rules.

    Under DFA, DRTP and shallow the engine cuts the network here and feeds ``h``
    the rule's signal (``e B_h`` for DFA); under every other rule, and outside the
    engine, it is the identity. Put it in any model code (plain JAX, Flax, Equinox).

    Args:
      h: a floating array ``(*batch, *features)``.
      name: the tap's name (what its feedback is keyed by); default ``tap_<k>`` by call order.
    """
    if not _checks.is_array(h):
        raise TypeError(f"tap: h: expected one array, given {_checks.describe(h)}")
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise TypeError(f"tap: h: expected a floating-point array, given {_checks.describe(h)}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"tap: name: expected a string or None, given {name!r}")
    return tap_p.bind(h, name=name)


@jax.custom_vjp
def cut(h: jax.Array) -> jax.Array:
    """The identity; no cotangent passes back through it (a symbolic zero, so nothing is computed upstream)."""
    return h


cut.defvjp(lambda h: (h, None), lambda _, g: (None,))


class TapLayout(NamedTuple):
    """The taps of a program as a tap rule sees them (static: it lives in the feedback's treedef)."""

    taps: tuple[TapSpec, ...]
    output: OutputSpec
    batch_dims: int


def check_batch_dims(
    output: Any, taps: Sequence[tuple[str, Any, tuple[int, ...]]], asked: int, found: int, *, mix: bool = False
) -> int:
    """Check a rule's explicit ``batch_dims`` against the taps and against the ``found`` ones.

    A value the shapes do not share raises, naming the tap; a value smaller than
    ``found`` would mix samples or tokens in one projection and needs ``mix=True``.
    """
    _checks.check_int(asked, "batch_dims", minimum=0)
    out = tuple(output.shape)
    if asked > len(out):
        raise ValueError(f"batch_dims={asked}: the model output {out} has only {len(out)} dims")
    for name, aval, _stack in taps:
        shape = tuple(aval.shape)
        if shape[:asked] != out[:asked]:
            raise ValueError(
                f"batch_dims={asked}: tap {name!r} has leading dims {shape[:asked]}, the output {out[:asked]}; "
                "expected taps shaped (*batch, *features) like the output"
            )
    if asked < found and not mix:
        what = "samples" if asked == 0 else "tokens (or positions)"
        raise ValueError(
            f"batch_dims={asked}: the output {out} and every tap share {found} leading batch dims, so a projection "
            f"over {asked} would mix the {what} of a batch in each signal; leave batch_dims=None (finds {found}) "
            "or pass mix_batch=True to the rule to mean it"
        )
    return asked


def to_tap(block: jax.Array, spec: TapSpec, value: Any) -> jax.Array:
    """``(*batch, layers·size)`` columns of one tap → the tap's own ``(*stack, *batch, *features)`` layout.

    Only trailing (feature) axes are split and the layer axis moved to the front, so a batch
    axis laid out over an explicit-sharding mesh is never merged or split.
    """
    batch = block.shape[:-1]
    per_layer = block.reshape(*batch, spec.layers, *spec.shape)
    per_layer = jnp.moveaxis(per_layer, len(batch), 0)  # (layers, *batch, *features)
    return per_layer.reshape(*spec.stack, *batch, *spec.shape).astype(value.dtype)


def head(
    outputs: jax.Array,
    tap_values: list[jax.Array],
    *,
    rule: Any,
    feedback: Any,
    layout: TapLayout,
    targets: Any,
    step: Any,
) -> jax.Array:
    """Identity on ``outputs``; its backward sends ``rule.tap_signals(...)`` to each tap value.

    The output's own cotangent ``e = ∂L/∂y`` passes through, so the last block
    trains on its exact gradient.
    """
    del step
    structs = [jax.typeof(v) for v in tap_values]

    @jax.custom_vjp
    def op(outputs, tap_values, feedback, targets):
        return outputs

    def fwd(outputs, tap_values, feedback, targets):
        return outputs, (outputs, feedback, targets)

    def bwd(residuals, error):
        outputs, feedback, targets = residuals
        signals = rule.tap_signals(feedback, layout, error=error, outputs=outputs, targets=targets, taps=structs)
        signals = list(signals)
        if len(signals) != len(structs):
            raise ValueError(f"rule {rule.name!r}: tap_signals gave {len(signals)} signals for {len(structs)} taps")
        cotangents: list[jax.Array | None] = []
        for spec, struct, signal in zip(layout.taps, structs, signals, strict=True):
            if signal is None:
                cotangents.append(None)
                continue
            if tuple(signal.shape) != tuple(struct.shape):
                raise ValueError(
                    f"rule {rule.name!r}: the signal for tap {spec.name!r} has shape {tuple(signal.shape)}, "
                    f"expected the tap's {tuple(struct.shape)}"
                )
            cotangents.append(_product.like(signal.astype(struct.dtype), struct))
        return error, cotangents, None, None

    op.defvjp(fwd, bwd)
    return op(outputs, list(tap_values), feedback, targets)
