"""`synthloop`: run one stage (what dvc.yaml calls) or the whole closed loop (a Prefect flow)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from synthloop.config import PARAMS_FILE, ConfigError, load_params

# Exit codes: the flow retries a stage only for failures that may pass on their own.
EXIT_BAD_INPUT = 2  # bad params or data: retrying cannot help


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from tasks.expectations import CriticalExpectationFailed
    from tasks.sources import SourceError

    return (ConfigError, SourceError, CriticalExpectationFailed, FileNotFoundError, ValidationError)


def _stage(args: argparse.Namespace) -> int:
    from synthloop.stages import PARAMS_ENV, STAGES

    params = load_params(args.params)
    os.environ[PARAMS_ENV] = str(args.params.resolve())  # for a stage that re-runs itself
    summary = STAGES[args.name](params)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from flows.parameters import RunParameters

    run = RunParameters(
        force=args.force, dry_run=args.dry_run, max_rounds=args.max_rounds, family=args.family
    )
    load_params(args.params, overrides=run.overrides())  # fail fast, before Prefect starts
    from flows.closed_loop import closed_loop

    state = closed_loop(params_path=str(args.params), run=run, return_state=True)
    if state.message:
        print(f"closed-loop: {state.name}: {state.message}")
    return 0 if state.is_completed() else 1


def _serve(args: argparse.Namespace) -> int:
    load_params(args.params)
    from flows.deployments import serve

    serve(args.params, limit=args.limit)
    return 0


def _check(args: argparse.Namespace) -> int:
    load_params(args.params)
    print(f"{args.params}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from synthloop.stages import STAGES

    parser = argparse.ArgumentParser(prog="synthloop", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE), help="params file")
    sub = parser.add_subparsers(dest="command", required=True)

    stage = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    stage.add_argument("name", choices=sorted(STAGES))
    stage.add_argument("--json", action="store_true", help="print the stage summary as JSON")
    stage.set_defaults(func=_stage)

    run = sub.add_parser("run", help="run the closed-loop Prefect flow")
    run.add_argument("--force", action="store_true", help="rerun stages even if unchanged")
    run.add_argument("--dry-run", action="store_true", help="only report what would run")
    run.add_argument("--max-rounds", type=int, help="rounds of the loop, at most")
    run.add_argument("--family", choices=["cgan", "diffusion"], help="generator family")
    run.set_defaults(func=_run)

    serve = sub.add_parser(
        "serve", help="register closed-loop/nightly and closed-loop/manual, run their flow runs"
    )
    serve.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1)")
    serve.set_defaults(func=_serve)

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
