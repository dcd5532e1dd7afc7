"""The ``ops`` object a model calls for its layers and taps.

A model is any function ``model(params, inputs, ops) -> outputs`` that builds
its weight layers with ``ops.dense`` / ``ops.conv`` / ``ops.einsum`` and marks
hidden activations with ``ops.tap``. The rule decides what those calls do:

* :class:`PlainOps` (BP, evaluation): ordinary layers, taps are the identity.
* :class:`FAOps`: kernels arrive bound to their B (:class:`Bound`); layers use
  the feedback ops, so ``dx`` flows through B.
* :class:`TapOps` (DFA, shallow): ordinary layers; every tap is recorded and
  cut with a stop-gradient, so blocks are independent in the backward.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fa_jax import _checks, _ops


@jax.tree_util.register_pytree_node_class
class Bound:
    """A kernel travelling with its feedback. Slices like a pair under ``lax.scan``.

    Use it only through ``ops.dense``/``ops.conv``/``ops.einsum``; turning it into
    an array would silently compute BP, so that raises.
    """

    def __init__(self, weight: jax.Array, feedback: jax.Array, path: str = "?"):
        self.weight, self.feedback, self.path = weight, feedback, path

    def tree_flatten(self):
        return (self.weight, self.feedback), self.path

    @classmethod
    def tree_unflatten(cls, path, children):
        return cls(*children, path)

    shape = property(lambda self: self.weight.shape)
    dtype = property(lambda self: self.weight.dtype)
    ndim = property(lambda self: self.weight.ndim)

    def __jax_array__(self):
        raise TypeError(
            f"kernel {self.path!r} carries FA feedback and must go through ops.dense, ops.conv or "
            "ops.einsum; using it as an array would compute BP"
        )

    def __repr__(self):
        return f"Bound(path={self.path!r}, shape={self.shape})"


def _where(op: str, kernel: Any) -> str:
    """``"ops.dense(layer 0/kernel)"`` when the kernel knows its path (FA), else the op's name."""
    return f"{op}(layer {kernel.path!r})" if isinstance(kernel, Bound) else op


def _apply_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    return y if bias is None else y + bias


class PlainOps:
    """Ordinary layers and identity taps (BP and evaluation)."""

    def dense(self, x, kernel, bias=None):
        """``x @ kernel + bias`` over leading batch dims. Shapes ``(*b, i), (i, o) -> (*b, o)``."""
        _checks.check_dense_args(x, self._weight(kernel), bias, _where("ops.dense", kernel))
        return _apply_bias(_ops.dense_product(x, self._weight(kernel)), bias)

    def conv(self, x, kernel, bias=None, *, strides=1, padding="SAME"):
        """Channels-last convolution ``(n, *s, c_in), (*w, c_in, c_out) -> (n, *s', c_out)``."""
        _checks.check_conv_args(x, self._weight(kernel), bias, strides, padding, _where("ops.conv", kernel))
        strides = (strides,) * (kernel.ndim - 2) if isinstance(strides, int) else tuple(strides)
        return _apply_bias(_ops.ConvProduct(strides, padding)(x, self._weight(kernel)), bias)

    def einsum(self, spec, x, kernel):
        """``jnp.einsum(spec, x, kernel)`` with a weight as second operand."""
        return jnp.einsum(spec, x, self._weight(kernel))

    def tap(self, h, name: str | None = None):
        """Mark a hidden activation for DFA; the identity here."""
        return h

    @staticmethod
    def _weight(kernel):
        return kernel.weight if isinstance(kernel, Bound) else kernel


class FAOps(PlainOps):
    """Layers whose input-gradient goes through the kernel's bound B."""

    def __init__(self, init: Callable | None, rule: Any = None, step: Any = None):
        self.init = init
        # FA-family rules (sign symmetry, Kolen–Pollack) build the backward matrix from
        # (W, bound feedback leaf, step) inside the backward: ``rule.backward_matrix``.
        self.rule, self.step = rule, step

    def _rule_product(self, f, x, k: Bound):
        return _ops.matrix_bilinear(f, x, k.weight, (k.feedback, self.step), backward_matrix=self.rule.backward_matrix,
                                   input_gradient=getattr(self.rule, "dense_input_gradient", None))

    def _bound(self, kernel, op: str) -> Bound:
        if not isinstance(kernel, Bound):
            raise ValueError(
                f"ops.{op} got a kernel of shape {getattr(kernel, 'shape', None)} with no FA feedback; "
                "pass the kernel leaf of params as it is (feedback is bound to it), or select it in "
                "init_feedback(select=...)"
            )
        return kernel

    def dense(self, x, kernel, bias=None):
        k = self._bound(kernel, "dense")
        _checks.check_dense_args(x, k.weight, bias, _where("ops.dense", k))
        if self.rule is not None:
            return _apply_bias(self._rule_product(_ops.dense_product, x, k), bias)
        return _ops.feedback_dense(x, k.weight, bias, k.feedback, init=self.init)

    def conv(self, x, kernel, bias=None, *, strides=1, padding="SAME"):
        k = self._bound(kernel, "conv")
        _checks.check_conv_args(x, k.weight, bias, strides, padding, _where("ops.conv", k))
        if self.rule is not None:
            strides = (strides,) * (k.ndim - 2) if isinstance(strides, int) else tuple(strides)
            return _apply_bias(self._rule_product(_ops.ConvProduct(strides, padding), x, k), bias)
        return _ops.feedback_conv(x, k.weight, bias, k.feedback, strides=strides, padding=padding, init=self.init)

    def einsum(self, spec, x, kernel):
        k = self._bound(kernel, "einsum")
        if self.rule is not None:
            return self._rule_product(_ops.EinsumProduct(spec), x, k)
        return _ops.feedback_einsum(spec, x, k.weight, k.feedback, init=self.init)


def tap_name(name: str | None, index: int) -> str:
    """A tap's name: the one given, else ``tap_<index>`` in call order (what DFA feedback is keyed by)."""
    return f"tap_{index}" if name is None else name


class TapOps(PlainOps):
    """Records every tap and cuts the graph there (DFA).

    Without ``replay`` a tap returns ``stop_gradient(h)``. With ``replay`` (the
    tap values of an earlier forward pass, computed outside the ``jax.vjp``)
    tap *l* returns ``replay[l]``: the vjp still cannot see past the tap, but an
    outer ``jax.jacrev`` of the update still sees how each block's input
    depends on upstream weights, which a stop-gradient would hide.
    """

    def __init__(self, replay: list[jax.Array] | None = None):
        self.names: list[str] = []
        self.values: list[jax.Array] = []
        self.replay = replay
        self.trace = _checks.trace_token()

    def tap(self, h, name: str | None = None):
        name = tap_name(name, len(self.names))
        _checks.check_tap_trace(self.trace, name)
        if name in self.names:
            raise ValueError(f"tap name {name!r} is used twice; tap names must be unique")
        self.names.append(name)
        self.values.append(h)
        if self.replay is None:
            return jax.lax.stop_gradient(h)
        if len(self.values) > len(self.replay):
            raise ValueError(f"tap {name!r}: the model tapped more values than in its recording pass")
        return self.replay[len(self.values) - 1]


class RecordOps(PlainOps):
    """Records tap values and passes them on untouched (the plain forward pass)."""

    def __init__(self):
        self.values: list[jax.Array] = []
        self.trace = _checks.trace_token()

    def tap(self, h, name: str | None = None):
        _checks.check_tap_trace(self.trace, tap_name(name, len(self.values)))
        self.values.append(h)
        return h


def bind(params: Any, kernels: Any) -> Any:
    """Replace each kernel of ``params`` that has feedback by ``Bound(kernel, B, path)``."""

    def pair(path, feedback, weight):
        if feedback is None:
            return weight
        return Bound(weight, feedback, _checks.path_str(path))

    return jax.tree_util.tree_map_with_path(pair, kernels, params, is_leaf=lambda x: x is None)


def apply(model: Callable, params: Any, inputs: Any) -> Any:
    """Run ``model`` forward with plain layers (evaluation under any rule)."""
    return model(params, inputs, PlainOps())
