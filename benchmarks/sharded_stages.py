"""Sharded stages (ingest, clean, augment): one process vs their shards as Prefect tasks.

    python benchmarks/sharded_stages.py [--images 20000] [--size 16] [--repeats 3]
                                        [--workers 2] [--stages ingest clean augment]
                                        [--runners inline threads dask] [--workdir DIR]

A procedural image folder of N PNGs is made once under the work dir. For each stage and
runner, alternating runners within each repeat (so drift on a shared machine hits them
alike), the stage's outputs and shard cache are removed and then:

  inline   `synthloop stage NAME` in this process (the plan, every shard, the merge)
  threads  prepare_shards on a ThreadPoolTaskRunner(workers), then the stage (merge only)
  dask     prepare_shards on a local Dask cluster of `workers` processes, then the stage

Each run's wall time includes the flow run against Prefect's local API (started once,
outside the timings) and, for dask, the start of the cluster. It prints the median per
runner and the ratio to inline, and checks that every runner wrote the same bytes
(sha256 of every output file). Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUTPUTS = {
    "ingest": ["data/ingested", "data/quarantine/ingest.parquet", "reports/ingest.json"],
    "clean": ["data/clean", "data/quarantine/clean.parquet"],
    "augment": ["data/augmented"],
}


def digest(workspace: Path, stage: str) -> str:
    h = hashlib.sha256()
    for out in OUTPUTS[stage]:
        path = workspace / out
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".json":
                continue  # reports carry timings
            h.update(str(file.relative_to(workspace)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()[:16]


def make_workspace(root: Path, images: int, size: int, workers: int) -> Path:
    from synthloop.procedural import make_image_folder

    ws = root / f"ws-{images}-{size}"
    source = ws / "data/raw/images"
    if not source.is_dir():
        started = time.perf_counter()
        make_image_folder(source, classes=6, per_class=images // 6, size=size, seed=0)
        print(f"made {images} {size}x{size} PNGs in {time.perf_counter() - started:.1f}s")
    params = {
        "ingest": {"sources": [{"kind": "image_folder", "path": "data/raw/images"}]},
        "clean": {"image_size": size, "channels": 3, "labels": None},
        "augment": {"min_copies": 1, "max_copies": 1, "policy": {"color_jitter": 0.1}},
        "orchestration": {"max_workers": workers},
    }
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    return ws


def run_once(ws: Path, stage: str, runner: str) -> float:
    from flows.sharded import prepare_shards, stage_spec
    from synthloop.config import load_params
    from synthloop.sharding import run_inline

    params_file = ws / "params.yaml"
    for out in OUTPUTS[stage]:
        path = ws / out
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.rmtree(ws / ".synthloop", ignore_errors=True)
    if runner != "inline":
        raw = yaml.safe_load(params_file.read_text())
        raw["orchestration"]["task_runner"] = runner
        params_file.write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    if runner != "inline":
        prepare_shards(stage, str(params_file))
    run_inline(stage_spec(stage), load_params(params_file), ws)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["ingest", "clean", "augment"])
    parser.add_argument("--runners", nargs="+", default=["inline", "threads", "dask"])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sbench")
    args = parser.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)
    from prefect.testing.utilities import prefect_test_harness

    ws = make_workspace(args.workdir, args.images, args.size, args.workers)
    print(
        f"{args.images} images, {args.workers} workers, {os.cpu_count()} CPUs, "
        f"{args.repeats} repeats; medians, ratio to inline (lower is faster)"
    )
    with prefect_test_harness(server_startup_timeout=120):
        for stage in args.stages:
            # clean reads ingest's output, augment clean's: made once when missing
            from flows.sharded import stage_spec
            from synthloop.config import load_params
            from synthloop.sharding import run_inline

            params = load_params(ws / "params.yaml")
            upstream = {"clean": ["ingest"], "augment": ["ingest", "clean"]}.get(stage, [])
            for before in upstream:
                if not (ws / OUTPUTS[before][0]).is_dir():
                    run_inline(stage_spec(before), params, ws)
            times: dict[str, list[float]] = {r: [] for r in args.runners}
            digests: dict[str, set[str]] = {r: set() for r in args.runners}
            for _ in range(args.repeats):
                for runner in args.runners:
                    times[runner].append(run_once(ws, stage, runner))
                    digests[runner].add(digest(ws, stage))
            base = statistics.median(times[args.runners[0]])
            same = len(set().union(*digests.values())) == 1
            print(f"\n{stage}: outputs identical across runners and repeats: {same}")
            for runner in args.runners:
                median = statistics.median(times[runner])
                spread = f"{min(times[runner]):.2f}-{max(times[runner]):.2f}"
                print(f"  {runner:8s} {median:7.2f} s  ({spread})  x{median / base:.2f}")


if __name__ == "__main__":
    main()
