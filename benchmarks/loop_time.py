"""One round of the loop end to end, and a nightly run with nothing changed, with the fixed
costs on lines of their own.

    python benchmarks/loop_time.py [--workdir DIR] [--repeats 3] [--skip-full]

The workspace is a fresh `git clone` of this project (the default params.yaml and the
embedded demo source; no DVC cache, so every stage runs), with one change: the utility gate
is off (`validate.gates.min_utility_delta: -1`) so that the round promotes and the second
run can find nothing to do. Each line runs in fresh interpreters, as a nightly run would:

  python start         `python -c pass` (the floor of every line below)
  imports              `import flows.closed_loop` (the flow and what it pulls in)
  Prefect API start    a temporary API server (what `synthloop run` starts without
                       PREFECT_API_URL) from launch to healthy
  dvc status           `dvc status --json` on the built workspace
  full round           `synthloop run --max-rounds 1`: wall time, and each stage's seconds
                       from reports/loop.json (the rest is the flow's own cost)
  nothing changed      `synthloop run` again: wall time; it must end "nothing to do"

The fixed-cost lines are medians of --repeats; the two runs are single. Goals (issue 13):
the full round within 300 s and the nothing-changed run within 30 s on two cores. Figures
only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER = (
    "from prefect.server.api.server import SubprocessASGIServer\n"
    "s = SubprocessASGIServer()\n"
    "s.start(timeout=300)\n"
    "s.stop()\n"
)


def env(home: Path) -> dict[str, str]:
    """This venv's tools first; a Prefect home of our own; no API URL, so a run starts its
    temporary server as `make run` does on a fresh machine."""
    found = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    found.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PREFECT_HOME=str(home),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
    )
    return found


def timed(cmd: list[str], cwd: Path, environ: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 1):  # 1: a run that failed its gates still has figures
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout + proc.stderr


def median_of(repeats: int, cmd: list[str], cwd: Path, environ: dict[str, str]) -> float:
    return statistics.median(timed(cmd, cwd, environ)[0] for _ in range(repeats))


def make_workspace(root: Path) -> Path:
    ws = root / "ws"
    shutil.rmtree(ws, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(ws)], check=True)
    params = ws / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["validate"]["gates"]["min_utility_delta"] = -1.0
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run([*git, "commit", "-qam", "benchmark: utility gate off"], cwd=ws, check=True)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "loopbench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-full", action="store_true", help="only the fixed costs (no loop run)"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ws = make_workspace(args.workdir)
    environ = env(args.workdir / "prefect-home")
    py = str(BIN / "python")
    synthloop = str(BIN / "synthloop")
    rows: list[tuple[str, float, str]] = []

    start = median_of(args.repeats, [py, "-c", "pass"], ws, environ)
    rows.append(("python start", start, ""))
    imports = median_of(args.repeats, [py, "-c", "import flows.closed_loop"], ws, environ)
    rows.append(("imports", imports, "import flows.closed_loop"))
    server = median_of(args.repeats, [py, "-c", SERVER], ws, environ)
    rows.append(("Prefect API start", server, "launch to healthy, and stop"))
    status = median_of(args.repeats, [str(BIN / "dvc"), "status", "--json"], ws, environ)
    rows.append(("dvc status", status, "nothing built yet"))

    if not args.skip_full:
        report = ws / "reports/loop.json"
        report.unlink(missing_ok=True)  # the clone's copy is an earlier run's
        full, out = timed([synthloop, "run", "--max-rounds", "1"], ws, environ)
        if not report.is_file():
            sys.exit(f"the run ended before any attempt:\n{out[-3000:]}")
        loop = json.loads(report.read_text())
        stages = loop["attempts"][0].get("stage_seconds", {})
        rows.append(("full round", full, f"{loop['result']}: {loop['message']}"))
        for stage, seconds in stages.items():
            rows.append((f"  {stage}", seconds, "dvc repro --single-item, shards included"))
        rows.append(("  the flow's own", full - sum(stages.values()), "full round - stages"))
        status = median_of(args.repeats, [str(BIN / "dvc"), "status", "--json"], ws, environ)
        rows.append(("dvc status", status, "after the round: everything up to date"))
        again, out = timed([synthloop, "run"], ws, environ)
        verdict = "nothing to do" if "nothing to do" in out else "RAN (expected nothing to do)"
        rows.append(("nothing changed", again, verdict))

    print(f"{os.cpu_count()} CPUs; medians of {args.repeats} for the fixed costs; seconds")
    print("| line | seconds | note |\n| --- | ---: | --- |")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.1f} | {note} |")
    if not args.skip_full:
        print(f"goals: full round {full:.0f} s of 300; nothing changed {again:.1f} s of 30")


if __name__ == "__main__":
    main()
