"""Ingest + clean throughput and peak memory against a read-and-decode floor.

    python benchmarks/ingest_clean.py [--images 100000] [--size 16] [--classes 6]
                                      [--workdir DIR] [--repeats 1] [--skip-floor]
                                      [--workers 0] [--flat-from N]

A procedural image folder of N small PNGs (synthloop.procedural.make_image_folder) is made
once under the work dir and reused by later runs with the same N/size/classes. Then, each
in its own fresh child process (so each phase's peak RSS is its own):

  floor   read every file's bytes and decode it once with PIL: the least any pipeline does
  ingest  tasks.ingest.stage.run_ingest on an image_folder source over that folder
  clean   tasks.clean.run_clean(validate=True): decode, convert, de-duplicate, split,
          then the Great Expectations suites and Data Docs; its decode pass runs in
          clean.workers processes (--workers; 0, the default: one per CPU core)

and prints images/s per phase, the ratio (ingest + clean time) / (floor time) next to its
goal (<= 2.0x), in wall time and in CPU time (clean's includes its worker processes), and
each phase's peak RSS (VmHWM) next to its goal (< 1 GiB, flat in N), with clean's workers'
own peak beside it. With --flat-from N, ingest and clean first run once on N images, and
the growth of their peaks from there to --images is printed, clean's process group beside
its goal (< 10%). The floor is one process: with workers, clean may use more than one core
where the floor uses one, which the CPU-time ratio shows.
Generation time is printed apart and is in no figure. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before anything imports Great Expectations (children inherit these).
os.environ["DO_NOT_TRACK"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "false"

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from memory import peak_rss_mib  # noqa: E402 (benchmarks/memory.py, beside this script)

PHASES = ("floor", "ingest", "clean")
RATIO_GOAL = 2.0
RSS_GOAL_MIB = 1024.0
FLAT_GOAL = 0.10  # clean's peak may grow by less than this from --flat-from to --images
RESULT_PREFIX = "BENCH-RESULT "


# --- dataset -----------------------------------------------------------------------------


def dataset_dir(workdir: Path, images: int, size: int, classes: int) -> Path:
    return workdir / "datasets" / f"n{images}-s{size}-c{classes}"


def ensure_dataset(workdir: Path, images: int, size: int, classes: int) -> tuple[Path, float]:
    """The cached image folder (made now if absent); returns (folder, seconds spent making)."""
    from synthloop.procedural import make_image_folder

    base = dataset_dir(workdir, images, size, classes)
    folder = base / "images"
    marker = base / "complete.json"
    if marker.is_file():
        return folder, 0.0
    if base.exists():
        import shutil

        shutil.rmtree(base)  # a half-made folder from an interrupted run
    per_class = math.ceil(images / classes)
    start = time.perf_counter()
    make_image_folder(folder, classes=classes, per_class=per_class, size=size, seed=0)
    for surplus in list_files(folder)[images:]:  # per_class * classes may pass N
        os.remove(surplus)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"per_class": per_class, "files": images}) + "\n")
    return folder, seconds


def list_files(folder: Path) -> list[str]:
    """Every file under the class folders, in the order ingest walks them (sorted names)."""
    paths = []
    for cls in sorted(os.scandir(folder), key=lambda e: e.name):
        if cls.is_dir():
            paths.extend(e.path for e in sorted(os.scandir(cls.path), key=lambda e: e.name))
    return paths


def warm_page_cache(paths: list[str]) -> float:
    """Read every file once, untimed in any figure, so all phases start from a warm cache."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as fh:
            fh.read()
    return time.perf_counter() - start


def build_params(workdir: Path, folder: Path, size: int, workers: int = 0, run: str = "run"):
    """Stage settings with every output under workdir/`run`."""
    from synthloop.config import parse_params

    raw = {
        "ingest": {
            "sources": [{"kind": "image_folder", "path": str(folder), "name": "bench"}],
            "allowed_roots": [str(folder)],
            "output": f"{run}/data/ingested",
            "quarantine": f"{run}/data/quarantine/ingest.parquet",
            "report": f"{run}/reports/ingest.json",
        },
        "clean": {
            "image_size": size,
            "channels": 3,
            "labels": None,
            "min_class_count": 1,
            "input": f"{run}/data/ingested",
            "output": f"{run}/data/clean",
            "quarantine": f"{run}/data/quarantine/clean.parquet",
            "report": f"{run}/reports/clean.json",
            "data_docs": f"{run}/reports/great_expectations",
            "workers": workers,
        },
    }
    return parse_params(raw, root=workdir, origin="benchmarks/ingest_clean.py")


# --- phases (each runs in a fresh child process) -----------------------------------------


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended (clean's decode workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def children_peak_rss_mib() -> float:
    """The largest peak RSS of any ended child, MiB (0 when there was none)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_phase(
    phase: str, workdir: Path, folder: Path, size: int, workers: int = 0, run: str = "run"
) -> dict:
    """Time one phase in this (fresh) process; the modules it needs are imported first."""
    if phase == "floor":
        from PIL import Image

        paths = list_files(folder)
        baseline = peak_rss_mib()
        start, cpu = time.perf_counter(), time.process_time()
        decoded = 0
        for path in paths:
            with open(path, "rb") as fh:
                data = fh.read()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
            decoded += 1
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {"seconds": seconds, "cpu": cpu, "images": decoded, "baseline_mib": baseline}

    params = build_params(workdir, folder, size, workers, run)
    if phase == "ingest":
        from tasks.ingest.stage import run_ingest

        baseline = peak_rss_mib()
        start, cpu = time.perf_counter(), time.process_time()
        report = run_ingest(params.ingest)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {
            "seconds": seconds,
            "cpu": cpu,
            "images": report["ingested"],
            "baseline_mib": baseline,
            "ingested": report["ingested"],
            "quarantined": report["quarantined"],
        }

    if phase == "clean":
        import tasks.shared.expectations as expectations
        from tasks.clean import decode_workers, run_clean

        # Time the GX part (its lazy import, the suites, Data Docs) within clean's total.
        gx_seconds = 0.0
        validate = expectations.validate_clean_dataset

        def timed_validate(*args, **kwargs):
            nonlocal gx_seconds
            t0 = time.perf_counter()
            try:
                return validate(*args, **kwargs)
            finally:
                gx_seconds += time.perf_counter() - t0

        expectations.validate_clean_dataset = timed_validate
        ingest_report = json.loads(params.ingest.report.read_text())
        pool_workers = decode_workers(params.clean, ingest_report["ingested"])
        baseline = peak_rss_mib()
        start, cpu = time.perf_counter(), time.process_time() + children_cpu()
        report = run_clean(params.clean, validate=True)
        seconds = time.perf_counter() - start
        cpu = time.process_time() + children_cpu() - cpu
        return {
            "seconds": seconds,
            "cpu": cpu,
            "images": report["ingested"],
            "baseline_mib": baseline,
            "workers": pool_workers,
            "workers_peak_rss_mib": children_peak_rss_mib() if pool_workers > 1 else 0.0,
            "gx_seconds": gx_seconds,
            "ingested": report["ingested"],
            "kept": report["kept"],
            "quarantined": report["quarantined"],
            "quarantined_total": report["quarantined_total"],
            "expectations_success": report["expectations"]["success"],
        }

    raise ValueError(f"unknown phase {phase!r}")


def child_main(args: argparse.Namespace) -> None:
    folder = dataset_dir(args.workdir, args.images, args.size, args.classes) / "images"
    result = run_phase(args.phase, args.workdir, folder, args.size, args.workers, args.run)
    result["peak_rss_mib"] = peak_rss_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """The children's environment: with a bytecode cache under the work dir unless
    --no-pycache, so imports (Great Expectations' take seconds) cost what they do in an
    installed environment after its first run, even where PYTHONDONTWRITEBYTECODE is set."""
    env = dict(os.environ)
    if not args.no_pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(args.workdir / "pycache")
    return env


def warm_imports(args: argparse.Namespace) -> float:
    """Import what the phases import once, untimed, so the bytecode cache is filled."""
    code = (
        "import great_expectations, tasks.clean, tasks.ingest.stage, tasks.shared.expectations,"
        " PIL.Image"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT, env=child_env(args))
    return time.perf_counter() - start


def spawn_phase(args: argparse.Namespace, phase: str) -> dict:
    """Run one phase in a fresh interpreter; returns what it measured (time, VmHWM)."""
    cmd = [
        sys.executable,
        str(HERE),
        "--phase",
        phase,
        "--images",
        str(args.images),
        "--size",
        str(args.size),
        "--classes",
        str(args.classes),
        "--workdir",
        str(args.workdir),
        "--workers",
        str(args.workers),
        "--run",
        args.run,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT, env=child_env(args))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"phase {phase} failed (exit {proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


# --- report ------------------------------------------------------------------------------


def clean_total_mib(results: list[dict]) -> float:
    """Clean's process group at its peak: the main process's peak plus each decode worker's
    (the largest of the repeats)."""
    workers = results[-1].get("workers", 1)
    worker_rss = max(r["workers_peak_rss_mib"] for r in results) if workers > 1 else 0.0
    return max(r["peak_rss_mib"] for r in results) + workers * worker_rss


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_rate(images: int, seconds: float) -> str:
    return f"{images / seconds:,.0f}" if seconds > 0 else "-"


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    print(line)
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def parent_main(args: argparse.Namespace) -> None:
    command = shlex.join([sys.executable, *sys.argv])
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {args.workdir}")

    folder, gen_seconds = ensure_dataset(args.workdir, args.images, args.size, args.classes)
    paths = list_files(folder)
    if gen_seconds:
        print(f"generated {len(paths):,} PNGs in {gen_seconds:.1f}s (not in any figure)")
    else:
        print(f"reusing {len(paths):,} cached PNGs under {folder}")
    warm = warm_page_cache(paths)
    print(f"page cache warmed in {warm:.1f}s (not in any figure)")

    if args.no_pycache:
        print("bytecode cache: as the environment has it (--no-pycache)")
    else:
        seconds = warm_imports(args)
        print(
            f"bytecode cache: {args.workdir / 'pycache'} (imports warmed in {seconds:.1f}s, "
            "not in any figure)"
        )

    phases = [p for p in PHASES if not (args.skip_floor and p == "floor")]
    results: dict[str, list[dict]] = {p: [] for p in phases}
    smaller: dict[str, list[dict]] = {p: [] for p in ("ingest", "clean")}
    # Stage outputs go to a folder of this run's own, so runs sharing a work dir (and its
    # cached datasets) do not clean up each other's temporaries; removed at the end.
    args.run = f"run/{os.getpid()}"
    try:
        if args.flat_from:
            small = argparse.Namespace(**{**vars(args), "images": args.flat_from})
            small_folder, _ = ensure_dataset(args.workdir, args.flat_from, args.size, args.classes)
            warm_page_cache(list_files(small_folder))
            print(f"baseline for memory growth: {args.flat_from:,} images, once")
            run_phases(small, list(smaller), smaller, repeats=1)
            warm_page_cache(paths)
        run_phases(args, phases, results)
    finally:
        import shutil

        shutil.rmtree(args.workdir / args.run, ignore_errors=True)
    report(args, command, paths, phases, results, smaller if args.flat_from else None)


def run_phases(
    args: argparse.Namespace, phases: list[str], results: dict, repeats: int | None = None
) -> None:
    repeats = args.repeats if repeats is None else repeats
    for rep in range(repeats):
        for phase in phases:
            r = spawn_phase(args, phase)
            results[phase].append(r)
            extra = f", GX {r['gx_seconds']:.1f}s" if "gx_seconds" in r else ""
            if r.get("workers", 1) > 1:
                extra += (
                    f", {r['workers']} decode workers (each peak RSS <= "
                    f"{r['workers_peak_rss_mib']:.0f} MiB)"
                )
            print(
                f"[{rep + 1}/{repeats}] {phase:<6} {r['seconds']:8.2f}s"
                f"  {fmt_rate(r['images'], r['seconds']):>9} img/s"
                f"  peak RSS {r['peak_rss_mib']:7.1f} MiB{extra}",
                flush=True,
            )


def report(
    args: argparse.Namespace,
    command: str,
    paths: list[str],
    phases: list[str],
    results: dict[str, list[dict]],
    smaller: dict[str, list[dict]] | None = None,
) -> None:
    sec = {p: median([r["seconds"] for r in results[p]]) for p in phases}
    cpu = {p: median([r["cpu"] for r in results[p]]) for p in phases}
    rss = {p: max(r["peak_rss_mib"] for r in results[p]) for p in phases}
    base = {p: median([r["baseline_mib"] for r in results[p]]) for p in phases}
    n = {p: results[p][-1]["images"] for p in phases}
    clean = results["clean"][-1]

    print()
    print(
        f"images on disk: {len(paths):,}   size: {args.size}x{args.size}x3   "
        f"classes: {args.classes}   repeats: {args.repeats} (median times, max RSS)"
    )
    workers = clean.get("workers", 1)
    print(
        f"processes: floor 1, ingest 1, clean 1 + {workers} decode worker processes"
        if workers > 1
        else "processes: floor 1, ingest 1, clean 1 (its decode pass in-process)"
    )
    q = clean["quarantined"]
    balanced = clean["ingested"] == clean["kept"] + sum(q.values())
    print(
        f"ingested {clean['ingested']:,} -> kept {clean['kept']:,}, quarantined "
        f"{clean['quarantined_total']:,} {q}; ingested == kept + quarantined: {balanced}; "
        f"GX success: {clean['expectations_success']}"
    )
    print()
    rows = []
    for p in phases:
        rows.append(
            (
                p,
                f"{sec[p]:.2f}",
                f"{cpu[p]:.2f}",
                fmt_rate(n[p], sec[p]),
                f"{base[p]:.0f}",
                f"{rss[p]:.0f}",
                "yes" if rss[p] < RSS_GOAL_MIB else "NO",
            )
        )
    if workers > 1:
        worker_rss = max(r["workers_peak_rss_mib"] for r in results["clean"])
        rows.append(("  clean: each worker", "", "", "", "", f"{worker_rss:.0f}", ""))
        rows.append(
            (
                "  clean: all processes",
                "",
                "",
                "",
                "",
                f"{clean_total_mib(results['clean']):.0f}",
                "yes" if clean_total_mib(results["clean"]) < RSS_GOAL_MIB else "NO",
            )
        )
    both = sec["ingest"] + sec["clean"]
    gx = median([r["gx_seconds"] for r in results["clean"]])
    rows.append(("  clean: GX part", f"{gx:.2f}", "", "", "", "", ""))
    rows.append(
        (
            "  clean: w/o GX",
            f"{sec['clean'] - gx:.2f}",
            "",
            fmt_rate(n["clean"], sec["clean"] - gx),
            "",
            "",
            "",
        )
    )
    both_cpu = cpu["ingest"] + cpu["clean"]
    rows.append(
        (
            "ingest+clean",
            f"{both:.2f}",
            f"{both_cpu:.2f}",
            fmt_rate(n["ingest"], both),
            "",
            f"{max(rss['ingest'], rss['clean']):.0f}",
            "",
        )
    )
    header = ("phase", "wall s", "CPU s", "img/s (wall)", "base MiB", "peak RSS MiB", "< 1 GiB")
    print_table(rows, header)
    print()
    if "floor" in sec:
        ratio = both / sec["floor"]
        verdict = "meets" if ratio <= RATIO_GOAL else "MISSES"
        print(
            f"(ingest+clean) / floor = {ratio:.2f}x in wall time   "
            f"goal <= {RATIO_GOAL:.1f}x: {verdict}"
        )
        print(
            f"(ingest+clean) / floor = {both_cpu / cpu['floor']:.2f}x in CPU time "
            "(all processes; steadier than wall time on a shared machine)"
        )
        if workers > 1:
            print(
                f"note: the floor decodes in 1 process; clean decodes in {workers} worker "
                "processes, so the wall ratio counts up to that many cores for clean, and "
                "its GX part is the validation alone (the import overlaps the decode pass)"
            )
    else:
        print("(ingest+clean) / floor: floor skipped (--skip-floor)")
    if smaller is None:
        print(f"peak RSS goal < {RSS_GOAL_MIB:.0f} MiB; flat in N: add --flat-from N")
    else:
        for phase, label in (("clean", "clean, all processes"), ("ingest", "ingest")):
            if phase == "clean":
                before, after = clean_total_mib(smaller["clean"]), clean_total_mib(results["clean"])
            else:
                before = smaller[phase][-1]["peak_rss_mib"]
                after = max(r["peak_rss_mib"] for r in results[phase])
            growth = after / before - 1
            goal = f"   goal < {FLAT_GOAL:.0%}: {'meets' if growth < FLAT_GOAL else 'MISSES'}"
            print(
                f"peak RSS growth, {label}: {before:.0f} MiB at {args.flat_from:,} images -> "
                f"{after:.0f} MiB at {n['clean']:,}: {growth:+.1%}"
                + (goal if phase == "clean" else " (no goal)")
            )
    print()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} (1/5/15 min) at the end")
    print(f"command: {command}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="PNGs to generate")
    parser.add_argument("--size", type=int, default=16, help="image side, pixels")
    parser.add_argument("--classes", type=int, default=6, help="classes (2-6)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "synthloop-bench",
        help="where the dataset is cached and stage outputs go",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per phase (medians)")
    parser.add_argument("--skip-floor", action="store_true", help="do not measure the floor")
    parser.add_argument(
        "--no-pycache",
        action="store_true",
        help="keep the environment's bytecode settings (PYTHONDONTWRITEBYTECODE makes every "
        "child compile Great Expectations from source, seconds per run)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="clean.workers: decode processes (0: one per CPU core; 1: none)",
    )
    parser.add_argument(
        "--flat-from",
        type=int,
        default=0,
        help="also run ingest and clean once on this many images first, and print the peak "
        "RSS growth from there to --images (goal: clean's < 10%%)",
    )
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--run", default="run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    if args.phase:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
