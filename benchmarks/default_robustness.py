"""The default round under other generator seeds: do its gates, its utility verdict and its
promotion hold when only `train.seed` changes?

    python benchmarks/default_robustness.py [--seeds 0,1,2,3,4] [--set stage.key=value ...]
                                            [--workdir DIR] [--json PATH]

The workspace is a fresh `git clone` of this project (params.yaml as committed, the embedded
demo source, no DVC cache), with each `--set` applied to its params.yaml (the value parsed
as YAML, e.g. `--set validate.utility_synthetic_share=1.0`; a number indexes a list, e.g.
`--set ingest.sources.0.short_keep=25`), so variants of the default are
measured the same way. The clone's own code runs (PYTHONPATH), not this checkout's. Then:
  shared   `dvc repro fuse train_evaluator`: the stages that do not read train.seed, once;
  per seed `train.seed` set in the clone's params.yaml and `dvc repro`, which skips the
           shared stages and runs train, generate and validate (every other seed unchanged).
Per seed it prints reports/validation.json's figures: each gate's value and pass/fail; the
utility verdict on the decisive classes (the short ones when there are any) with the mean
gain and its 95% interval over the classifier seeds, `verdict_text` and the baseline
recipe; the FID ratio, class consistency and accepted rows; whether round 1 would promote
(every gate passed); and the seed's wall time. Then: how many seeds promote, and the mean
and 95% Student-t interval over generator seeds of the short-class gain (the spread a
single run's interval, over classifier seeds only, does not show), and the wall times.
Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
BIN = Path(sys.executable).parent
for path in (PROJECT, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import yaml  # noqa: E402
from families import delta_cell, markdown, set_value  # noqa: E402 (benchmarks/families.py)

from tasks.validate.utility_protocol import t_interval, verdict  # noqa: E402

SHARED = ["fuse", "train_evaluator"]  # with their upstream: every stage before train


def environment(ws: Path) -> dict[str, str]:
    """This venv's tools first; the clone's packages ahead of the editable install's."""
    return os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ws),
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
    }


def make_workspace(ws: Path, overrides: list[str]) -> dict:
    """A fresh clone of the committed project with `overrides` applied; its params."""
    shutil.rmtree(ws, ignore_errors=True)
    ws.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", str(PROJECT), str(ws)], check=True)
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for assignment in overrides:
        set_value(raw, assignment)
    return raw


def write_params(ws: Path, raw: dict, seed: int) -> None:
    raw["train"]["seed"] = seed
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def run(cmd: list[str], ws: Path, log: Path) -> float:
    """`cmd` in the workspace, output to `log`; its wall seconds (exits on failure)."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=ws, env=environment(ws), stdout=out, stderr=out)
    seconds = time.perf_counter() - started
    if proc.returncode:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}), {log}:\n{tail}")
    return seconds


def check_workspace(ws: Path) -> None:
    """The stages must import the clone's code and accept its params."""
    found = subprocess.run(
        [str(BIN / "python"), "-c", "import synthloop; print(synthloop.__file__)"],
        cwd=ws, env=environment(ws), capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(found).resolve().is_relative_to(ws.resolve()):
        sys.exit(f"the stages would import {found}, not the clone's code")
    run([str(BIN / "synthloop"), "check"], ws, ws.parent / "check.log")


def measure(ws: Path, seed: int, raw: dict, logs: Path) -> dict:
    """One generator seed: `dvc repro` and the figures of its reports."""
    write_params(ws, raw, seed)
    seconds = run([str(BIN / "dvc"), "repro"], ws, logs / f"repro-seed{seed}.log")
    report = json.loads((ws / "reports/validation.json").read_text())
    train = json.loads((ws / "reports/train/summary.json").read_text())
    (logs / f"validation-seed{seed}.json").write_text(json.dumps(report, indent=2))
    u = report["utility"]
    return {
        "seed": seed,
        "seconds": seconds,
        "gates": {k: v for k, v in report["gates"].items() if k != "passed"},
        "promotes": bool(report["passed"]),
        "utility": {
            k: u.get(k) for k in ("decisive", "delta", "verdict", "verdict_text", "baseline")
        }
        | {"short": u.get("short"), "overall": u.get("overall")},
        "fid_ratio": report["gates"]["fid_ratio"]["value"],
        "class_consistency": report["class_consistency"],
        "accepted": report["accepted"],
        "synthetic": report["synthetic"],
        "train": {k: train.get(k) for k in ("steps", "best_step", "stopped_early")},
    }


# --- the table -----------------------------------------------------------------------------


def gate_cell(gate: dict) -> str:
    return f"{gate['value']:.4g} {'pass' if gate['passed'] else 'FAIL'}"


def tables(rows: list[dict]) -> str:
    names = list(rows[0]["gates"])
    gates = [["seed", *names, "promotes"]]
    gates += [
        [
            str(r["seed"]),
            *(gate_cell(r["gates"][n]) for n in names),
            "yes" if r["promotes"] else "no",
        ]
        for r in rows
    ]
    head = ["seed", "baseline", "decisive", "Δ pts [95%] verdict", "overall Δ pts [95%]",
            "FID ratio", "consistency", "accepted", "steps (best)", "promotes",
            "wall s"]  # fmt: skip
    figures = [head]
    for r in rows:
        u = r["utility"]
        figures.append([
            str(r["seed"]), u["baseline"], u["decisive"], delta_cell(u),
            delta_cell(u["overall"]), f"{r['fid_ratio']:.2f}", f"{r['class_consistency']:.3f}",
            f"{r['accepted']}/{r['synthetic']}",
            f"{r['train']['steps']} ({r['train']['best_step']})",
            "yes" if r["promotes"] else "no", f"{r['seconds']:.0f}",
        ])  # fmt: skip
    texts = "\n".join(f"seed {r['seed']}: {r['utility']['verdict_text']}" for r in rows)
    return f"{markdown(gates)}\n\n{markdown(figures)}\n\n{texts}"


def summary(rows: list[dict], seeds: list[int], shared_s: float, total_s: float) -> dict:
    short = [r["utility"]["short"]["delta"]["mean"] for r in rows if r["utility"]["short"]]
    interval = t_interval(short)
    walls = [r["seconds"] for r in rows]
    return {
        "seeds": seeds,
        "measured": [r["seed"] for r in rows],
        "promotes": sum(r["promotes"] for r in rows),
        "short_delta": {
            "mean": interval.mean,
            "low": interval.low,
            "high": interval.high,
            "seeds": interval.n,
            "verdict": verdict(interval),
        },
        "seed_seconds": {
            "median": statistics.median(walls) if walls else None,
            "total": sum(walls),
        },
        "shared_seconds": shared_s,
        "total_seconds": total_s,
    }


def summary_lines(s: dict) -> str:
    d = s["short_delta"]
    cell = delta_cell({"delta": d, "verdict": d["verdict"]}) if d["seeds"] else "n/a"
    w = s["seed_seconds"]
    median = "n/a" if w["median"] is None else f"{w['median']:.0f}"
    return (
        f"summary: {s['promotes']} of {len(s['seeds'])} seeds promote; short-class Δ over "
        f"{d['seeds']} generator seeds: {cell} (mean, 95% t-interval, points)\n"
        f"wall: per seed (train, generate, validate) median {median} s, total {w['total']:.0f} s;"
        f" shared stages once {s['shared_seconds']:.0f} s; everything {s['total_seconds']:.0f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4", help="train.seed values, comma-separated")
    p.add_argument("--set", action="append", default=[], help="stage.key=value (repeatable)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "robustness")
    p.add_argument("--json", type=Path, help="also write every figure here")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    command = shlex.join([sys.executable, *sys.argv])
    began = time.perf_counter()
    ws, logs = args.workdir / "ws", args.workdir / "logs"
    raw = make_workspace(ws, args.set)
    logs.mkdir(parents=True, exist_ok=True)
    write_params(ws, raw, seeds[0])
    check_workspace(ws)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ws, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    print(f"command: {command}\nworkspace: {ws} (clone of {commit}); overrides: "
          f"{args.set or 'none'}; seeds {seeds}; logs in {logs}", flush=True)  # fmt: skip
    shared = run([str(BIN / "dvc"), "repro", *SHARED], ws, logs / "repro-shared.log")
    print(
        f"shared stages (ingest, clean, train_evaluator, augment, fuse): {shared:.0f} s", flush=True
    )

    rows, failed = [], {}
    for seed in seeds:
        try:
            row = measure(ws, seed, raw, logs)
        except RuntimeError as err:  # keep the other seeds' figures
            failed[seed] = str(err)
            print(f"seed {seed}: FAILED\n{err}", flush=True)
            continue
        rows.append(row)
        u = row["utility"]
        print(f"seed {seed}: {row['seconds']:.0f} s; {u['decisive']} {delta_cell(u)}; "
              f"promotes {'yes' if row['promotes'] else 'no'}", flush=True)  # fmt: skip

    s = summary(rows, seeds, shared, time.perf_counter() - began)
    print(f"\n{tables(rows)}\n" if rows else "\nno seed finished\n")
    print(summary_lines(s) + (f"\nfailed seeds: {sorted(failed)}" if failed else ""))
    if args.json:
        doc = {"command": command, "commit": commit, "overrides": args.set, "rows": rows,
               "failed": failed, "summary": s}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
