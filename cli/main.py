"""`synthloop`: run one stage (what dvc.yaml calls) or the whole closed loop (a Prefect flow)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from synthloop.config import FAMILY_NAMES, PARAMS_ENV, PARAMS_FILE, ConfigError, load_params

# Exit codes: the flow retries a stage only for failures that may pass on their own.
EXIT_BAD_INPUT = 2  # bad params or data: retrying cannot help

# Without PREFECT_API_URL a run starts Prefect's temporary API server and waits for it;
# Prefect's default, 20 s, is too short on a busy 2-core machine (48 s measured beside other
# jobs), and `make run` then fails before any work. A user's own setting wins.
EPHEMERAL_STARTUP_TIMEOUT = ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from tasks.ingest.sources import SourceError
    from tasks.shared.expectations import CriticalExpectationFailed
    from tasks.shared.feedback import FeedbackOutsideFolder

    return (
        ConfigError,
        SourceError,
        CriticalExpectationFailed,
        FileNotFoundError,
        ValidationError,
        FeedbackOutsideFolder,
    )


def _stage(args: argparse.Namespace) -> int:
    from tasks.stages import run_stage

    params = load_params(args.params)
    os.environ[PARAMS_ENV] = str(args.params.resolve())  # for a stage that re-runs itself
    summary = run_stage(args.name, params)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault(*EPHEMERAL_STARTUP_TIMEOUT)  # before Prefect reads its settings
    from flows.parameters import RunParameters

    run = RunParameters(
        force=args.force,
        dry_run=args.dry_run,
        max_rounds=args.max_rounds,
        family=args.family,
        families=args.families,
    )
    load_params(args.params, overrides=run.overrides())  # fail fast, before Prefect starts
    from flows.closed_loop import closed_loop

    state = closed_loop(params_path=str(args.params), run=run, return_state=True)
    result = state.result(raise_on_failure=False) if state.is_completed() else None
    message = result.get("message") if isinstance(result, dict) else None
    if message or state.message:
        print(f"closed-loop: {state.name}: {message or state.message}")
    return 0 if state.is_completed() else 1


def _serve(args: argparse.Namespace) -> int:
    """Serve the deployments bound to this workspace. Prefect's settings come from the
    environment as they are (PREFECT_API_URL; PREFECT_API_AUTH_STRING for a server with basic
    authentication): nothing here reads or drops them, and the runs inherit them."""
    load_params(args.params)
    from flows.deployments import serve

    serve(args.params, limit=args.limit)
    return 0


def _pool(args: argparse.Namespace) -> int:
    """Show the pool; retire a shard; reset the pool (under the workspace lock)."""
    from flows import pool_admin
    from flows.workspace import WorkspaceLock

    params = load_params(args.params)
    workspace, pool = args.params.resolve().parent, params.loop.pool
    if args.action == "show":
        print(pool_admin.pool_table(pool))
        return 0
    if args.action == "retire" and not (args.shard and args.reason.strip()):
        print(
            "synthloop pool retire: name the shard and say why: "
            "synthloop pool retire SHARD --reason TEXT",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if args.action == "reset" and not args.yes:
        if not sys.stdin.isatty():
            print(
                "synthloop pool reset: pass --yes to confirm (no terminal to ask)", file=sys.stderr
            )
            return EXIT_BAD_INPUT
        answer = input(f"Remove every shard of {pool} and its DVC record? Type 'reset': ")
        if answer.strip() != "reset":
            print("pool left as it was")
            return 1
    holder = f"synthloop pool {args.action}"
    with WorkspaceLock(workspace, params.orchestration.lock_timeout_s, holder=holder):
        if args.action == "retire":
            target = pool_admin.retire_shard(workspace, pool, args.shard, args.reason)
            print(f"retired {args.shard} -> {target.relative_to(workspace)}: {args.reason}")
        else:
            removed = pool_admin.reset_pool(workspace, pool)
            print(f"pool reset: removed {len(removed)} shard(s); the DVC cache and git keep them")
    print("commit the pool's .dvc changes with git; the next run's fuse reads the new pool")
    return 0


def _check(args: argparse.Namespace) -> int:
    load_params(args.params)
    print(f"{args.params}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tasks.stages import STAGES

    parser = argparse.ArgumentParser(prog="synthloop", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE), help="params file")
    sub = parser.add_subparsers(dest="command", required=True)

    stage = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    stage.add_argument("name", choices=list(STAGES))
    stage.add_argument("--json", action="store_true", help="print the stage summary as JSON")
    stage.set_defaults(func=_stage)

    run = sub.add_parser("run", help="run the closed-loop Prefect flow")
    run.add_argument("--force", action="store_true", help="rerun stages even if unchanged")
    run.add_argument("--dry-run", action="store_true", help="only report what would run")
    run.add_argument("--max-rounds", type=int, help="rounds of the loop, at most")
    run.add_argument("--family", choices=FAMILY_NAMES, help="generator family")
    run.add_argument(
        "--families",
        nargs="+",
        choices=FAMILY_NAMES,
        help="bake-off: train these families, keep the one that helps most (loop.families)",
    )
    run.set_defaults(func=_run)

    serve = sub.add_parser(
        "serve", help="register closed-loop/nightly and closed-loop/manual, run their flow runs"
    )
    serve.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1)")
    serve.set_defaults(func=_serve)

    pool = sub.add_parser(
        "pool",
        help="the accepted-synthetic pool: show it, retire a shard, or reset it",
        description="show: rows per class, run and family, and every shard; retire SHARD: "
        "move a shard out of what fuse reads (its .dvc history stays in git and its data in "
        "the DVC cache); reset: remove every shard and its DVC record",
    )
    pool.add_argument("action", nargs="?", default="show", choices=["show", "retire", "reset"])
    pool.add_argument("shard", nargs="?", help="retire: the shard's file name")
    pool.add_argument("--reason", default="", help="retire: why (kept in the shard's .dvc)")
    pool.add_argument("--yes", action="store_true", help="reset: do not ask")
    pool.set_defaults(func=_pool)

    check = sub.add_parser("check", help="validate params.yaml and exit")
    check.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Our own stage summaries at INFO; libraries (GX, httpx, ...) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("synthloop", "tasks", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _bad_input_errors() as err:
        print(f"synthloop: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
