"""What ``fa_jax.nnx`` and ``fa_jax.linen`` share: tap placement and the rule it implies.

Both adapters hand the engine (:func:`fa_jax.forward`) a pure function of
``(params, inputs)`` and let it read the program, so every weight product goes
through the rule whatever module computes it. All that is Flax-specific is
*where a tap rule cuts* when the user asks by module rather than by program:

* ``"auto"``: as the rule says (its ``taps`` option: the :func:`fa_jax.tap` marks
  if the model has any, else ``"layer"``);
* ``"layer"``: the engine's automatic taps, the activation entering every weight
  product that does not read the model input (Nøkland's DFA for an MLP);
* ``"macro"``: the output of every block (``blocks=``: a module type, a tuple of
  types, or a list of module paths) (Launay et al. 2020);
* ``"micro"``: inside every block, the output of each attention module
  (``attention=``), plus the block output;
* a list of module paths: the output of each.

The adapters mark the chosen modules' outputs with ``fa_jax.tap(out, name=path)``
and run the rule with ``taps="marked"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import jax

from fa_jax import _checks
from fa_jax._engine._taps import tap
from fa_jax.rules import Rule

PLACEMENTS = ("auto", "layer", "macro", "micro")


def check_placement(taps: Any, blocks: Any, attention: Any, where: str) -> tuple[Any, Any, tuple]:
    """``(taps, blocks, attention)`` normalised: paths as tuples, attention as a tuple of types."""
    if isinstance(taps, str):
        if taps not in PLACEMENTS:
            raise ValueError(
                f"{where}: taps: expected one of {list(PLACEMENTS)} or a list of module paths, given {taps!r}"
            )
    elif isinstance(taps, Sequence) and taps and all(isinstance(t, str) for t in taps):
        taps = tuple(taps)
    else:
        raise ValueError(f"{where}: taps: expected one of {list(PLACEMENTS)} or a list of module paths, given {taps!r}")
    if taps in ("macro", "micro"):
        if blocks is None:
            raise ValueError(
                f"{where}: taps={taps!r} needs blocks=: a module type, a tuple of types, or a list of module paths"
            )
    if blocks is not None:
        if isinstance(blocks, str):
            blocks = (blocks,)
        elif isinstance(blocks, type):
            pass
        elif (
            isinstance(blocks, Sequence)
            and blocks
            and (all(isinstance(b, type) for b in blocks) or all(isinstance(b, str) for b in blocks))
        ):
            blocks = tuple(blocks)
        else:
            raise TypeError(
                f"{where}: blocks: expected a module type, a tuple of types, or a list of module paths, "
                f"given {blocks!r}"
            )
    attention = attention if isinstance(attention, tuple) else (attention,)
    if not attention or not all(isinstance(a, type) for a in attention):
        raise TypeError(f"{where}: attention: expected a module type or a tuple of types, given {attention!r}")
    return taps, blocks, attention


def marks_modules(taps: Any) -> bool:
    """True when the placement is by module (macro, micro, paths): the adapter marks module outputs."""
    return taps not in ("auto", "layer")


def placed_rule(rule: Rule, taps: Any, where: str) -> Rule:
    """``rule`` cutting where ``taps`` says: ``"layer"`` → the rule's ``taps="layer"``, by module → ``"marked"``.

    A rule that does not cut (the FA family) is returned as it is: taps do not change it.
    A rule whose own ``taps`` option already says otherwise raises (two placements asked).
    """
    if not rule.cuts or taps == "auto":
        return rule
    want = "layer" if taps == "layer" else "marked"
    if rule.taps == want:
        return rule
    if rule.taps != "auto":
        raise ValueError(
            f"{where}: taps={taps!r} places the taps by {'program' if want == 'layer' else 'module'} (rule option "
            f"taps={want!r}), but the rule {rule.name!r} was built with taps={rule.taps!r}; leave one of them at 'auto'"
        )
    try:
        # Rule is not a dataclass, its subclasses are; one that is not raises TypeError, caught below
        return dataclasses.replace(cast(Any, rule), taps=want)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{where}: rule {rule.name!r} cuts at taps but has no dataclass field 'taps' to set to {want!r} ({error}); "
            "build it with that option yourself and pass taps='auto'"
        ) from None


def is_block(path: str, module: Any, blocks: Any) -> bool:
    """``module`` at ``path`` is one of ``blocks`` (types, or paths)."""
    if blocks is None:
        return False
    if isinstance(blocks, type) or all(isinstance(b, type) for b in blocks):
        return isinstance(module, blocks)
    return path in blocks


def tap_output(outputs: Any, name: str) -> Any:
    """``fa_jax.tap(outputs, name=name)`` for a module's output, with an error naming the module otherwise."""
    if not (_checks.is_array(outputs) and jax.numpy.issubdtype(outputs.dtype, jax.numpy.floating)):
        raise TypeError(
            f"taps: module {name!r} is a tap, so its output must be one floating-point array; given "
            f"{_checks.describe(outputs)} (choose the module whose output is the activation to feed)"
        )
    return tap(outputs, name=name)


def split_leaves(tree: Any) -> tuple[list[Any], Any]:
    """``(arrays, rebuild)``: the array leaves of ``tree`` (traced inputs) and ``rebuild(arrays) -> tree``.

    Every other leaf (``deterministic=True``, a string, ``mutable=[...]``) is static:
    it is closed over, so the program is traced for that value.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic = [i for i, leaf in enumerate(leaves) if _checks.is_array(leaf)]
    arrays = [leaves[i] for i in dynamic]

    def rebuild(values: list[Any]) -> Any:
        full = list(leaves)
        for i, value in zip(dynamic, values, strict=True):
            full[i] = value
        return jax.tree_util.tree_unflatten(treedef, full)

    return arrays, rebuild


def check_marked(taps: Any, expected: Sequence[str], found: Sequence[str], where: str, hint: str = "") -> None:
    """Every tap the placement asked for ran in the traced program (none silently missing)."""
    missing = [name for name in expected if name not in found]
    if not found:
        raise ValueError(
            f"{where}: taps={taps!r} asked for taps at the outputs of {list(expected)[:8]}, but none appeared in the "
            f"traced program, so the rule would cut nowhere.{hint}"
        )
    if missing:
        raise ValueError(
            f"{where}: taps={taps!r}: the modules {missing[:8]} never ran in the traced program, so they got no tap; "
            f"the taps met were {list(found)[:8]}.{hint}"
        )
