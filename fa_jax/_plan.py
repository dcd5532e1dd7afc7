"""``fa_jax.plan``: how a rule treats every parameter and where it taps, as a readable table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fa_jax import _checks
from fa_jax._engine import _program
from fa_jax.rules import Rule, get_rule


def _describe(leaf: Any) -> str:
    if _checks.is_array(leaf):
        return _checks.describe(leaf)
    leaves = jax.tree.leaves(leaf)
    return "nothing stored" if not leaves else ", ".join(_checks.describe(one) for one in leaves)


class ParamPlan(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: str
    treatment: str


class TapPlan(NamedTuple):
    name: str
    shape: tuple[int, ...]  # features, after the batch dims
    stack: tuple[int, ...]


class Plan(NamedTuple):
    """Every parameter with its treatment, and every tap a cutting rule feeds. ``str(plan)`` is a table."""

    rule: str
    params: tuple[ParamPlan, ...]
    taps: tuple[TapPlan, ...]
    batch_dims: int | None

    def __str__(self) -> str:
        rows = [("parameter", "shape", "treatment")]
        rows += [(p.path, f"{p.dtype}{list(p.shape)}", p.treatment) for p in self.params]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"rule {self.rule!r}"]
        lines += [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
        if self.taps:
            lines.append(f"taps (batch_dims={self.batch_dims}):")
            for t in self.taps:
                stack = f" x{list(t.stack)} layers" if t.stack else ""
                lines.append(f"  {t.name:<{width[0]}}  features {list(t.shape)}{stack}")
        return "\n".join(lines)


def plan(model: Callable, params: Any, inputs: Any, rule: Rule | str = "fa", *, exact: Any = ()) -> Plan:
    """How ``rule`` treats every parameter of ``model`` and where it cuts, found from the program (no FLOPs).

    Each parameter is one of: ``feedback (<product kind>)`` (its products' input gradient
    goes through the rule's matrix), ``Wᵀ, exact`` (the rule keeps BP's transpose there:
    BP itself, or inside a DFA block), ``exact, elementwise (…)`` (a bias, a scale),
    ``exact, lookup`` (an embedding table), ``exact (marked)``, or ``unused``. A use the
    engine cannot route raises instead, naming the parameter and the primitive.

    Args:
      model, params, inputs: as for :func:`fa_jax.value_and_grad`.
      rule: the rule to plan for.
      exact: parameters marked exact, as for :func:`fa_jax.init_feedback`.
    """
    rule = get_rule(rule)
    _checks.check_callable(model, "model")
    program = _program.analyse(model, params, inputs, exact=exact)
    rows = []
    key = jax.random.key(0)
    refusals: dict[int, str] = {}
    for bases, what, _ in _program.refused(program, rule):
        for index in bases:
            refusals.setdefault(index, what)
    kept = "Wᵀ within its block (cut at taps)" if rule.cuts else "Wᵀ, exact"
    for i, (path, aval) in enumerate(zip(program.paths, program.avals, strict=True)):
        uses = list(program.uses.get(i, []))
        if i in program.specs:
            spec = program.specs[i]
            leaf = jax.eval_shape(lambda s=spec: rule.init_weight(s, key=key))
            layers = f", {' x '.join(map(str, spec.stack))} layers" if spec.stack else ""
            how = f"feedback ({spec.kind}{layers}): {_describe(leaf)}" if leaf is not None else kept
            uses = [how] + [u for u in uses if not u.startswith("feedback")]
        if i in refusals:
            uses = ["REFUSED: " + refusals[i], *uses]
        rows.append(ParamPlan(path, tuple(aval.shape), str(aval.dtype), "; ".join(uses) or "unused"))
    taps: tuple[TapPlan, ...] = ()
    batch_dims: int | None = None
    if rule.cuts:
        batch_dims = _program.find_batch_dims(
            model, params, inputs, program, rule.taps, exact=exact, asked=rule.batch_dims, mix=rule.mix_batch
        )
        layout = _program.tap_layout(program, rule.taps, batch_dims)
        taps = tuple(TapPlan(t.name, t.shape, t.stack) for t in layout.taps)
    return Plan(rule.name, tuple(rows), taps, batch_dims)
