"""What a stage process pays before it works: the seconds to import each stage's module.

    python benchmarks/stage_imports.py [--repeats 5] [--baseline PATH]

Every DVC stage runs as its own `synthloop stage NAME` process, so each one imports its
module (and torch, and whatever that pulls in) afresh: on a small round that is a large
part of the stage's time. For each stage of `tasks.stages.STAGES`, a fresh interpreter
imports the module --repeats times; printed: the median seconds per stage and their sum.
With --baseline (another checkout of the project, e.g. a `git worktree` of an earlier
commit), the same is measured there too, in alternating runs so drifting load hits both
alike, with the ratio new/baseline per stage.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tasks.stages import STAGES  # noqa: E402


def import_seconds(root: Path, module: str) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=root, check=True)
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline", type=Path, help="another checkout to compare against")
    a = p.parse_args()
    roots = {"this": PROJECT} | ({"baseline": a.baseline.resolve()} if a.baseline else {})
    times: dict[str, dict[str, list[float]]] = {r: {s: [] for s in STAGES} for r in roots}
    for _ in range(a.repeats):
        for stage, module in STAGES.items():
            for name, root in roots.items():
                times[name][stage].append(import_seconds(root, module))
    medians = {r: {s: statistics.median(v) for s, v in t.items()} for r, t in times.items()}
    print(f"median seconds to import a stage's module, {a.repeats} fresh interpreters each")
    header = "stage".ljust(18) + "".join(r.rjust(10) for r in roots)
    print(header + ("  ratio" if a.baseline else ""))
    for stage in STAGES:
        row = stage.ljust(18) + "".join(f"{medians[r][stage]:10.2f}" for r in roots)
        if a.baseline:
            row += f"  {medians['this'][stage] / medians['baseline'][stage]:.2f}"
        print(row)
    sums = {r: sum(m.values()) for r, m in medians.items()}
    total = "sum".ljust(18) + "".join(f"{sums[r]:10.2f}" for r in roots)
    print(total + (f"  {sums['this'] / sums['baseline']:.2f}" if a.baseline else ""))


if __name__ == "__main__":
    main()
