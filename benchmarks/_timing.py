"""Paired timing: alternate short blocks of each variant and report per-round ratios.

Absolute times drift by ±30% on shared machines; ratios of blocks run back to
back in the same round are far steadier, so we report their median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def add_timing_arguments(parser, out: str) -> None:
    """The options every paired-timing benchmark takes: rounds, steps per block, a smoke mode, the JSON path."""
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="steps per timed block")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    parser.add_argument("--out", default=out)


def block_time(step: Callable[[], object], repeats: int) -> float:
    """Seconds per call of ``step`` over ``repeats`` calls, waiting for the device."""
    start = time.perf_counter()
    for _ in range(repeats):
        out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``time(numerator) / time(denominator)`` measured in the same round."""
    return statistics.median(t / b for t, b in zip(times[numerator], times[denominator], strict=True))


def paired_times(steps: dict[str, Callable[[], object]], rounds: int, repeats: int) -> dict[str, list[float]]:
    """Per-round block times of every variant, alternating the order round by round."""
    for step in steps.values():  # compile and warm up
        jax.block_until_ready(step())
    times = {name: [] for name in steps}
    names = list(steps)
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]  # cancel drift inside a round
        for name in order:
            times[name].append(block_time(steps[name], repeats))
    return times


def ratio_rows(times: dict[str, list[float]], baseline: str) -> dict:
    """Per variant: median paired ratio to ``baseline``, its quartiles, and the median time."""
    rows = {}
    for name in times:
        ratios = [t / b for t, b in zip(times[name], times[baseline], strict=True)]
        rows[name] = {
            "median_ratio_to_" + baseline: statistics.median(ratios),
            "ratio_iqr": [float(q) for q in statistics.quantiles(ratios, n=4)[::2]] if len(ratios) > 1 else None,
            "median_ms": 1e3 * statistics.median(times[name]),
        }
    return rows


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def report(title: str, rows: dict, baseline: str, path: str, extra: dict | None = None) -> None:
    """Print a table and write JSON next to the script, under results/."""
    key = "median_ratio_to_" + baseline
    print(f"\n{title}  ({environment()['backend']}, {environment()['device']})")
    print(f"{'variant':<28}{'ratio to ' + baseline:>16}{'median ms':>12}")
    for name, row in rows.items():
        print(f"{name:<28}{row[key]:>16.3f}{row['median_ms']:>12.2f}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"title": title, "environment": environment(), "rows": rows, **(extra or {})}, f, indent=2)
    print(f"wrote {path}")
