"""The command line: its choices come from the registry, and a run waits long enough for
Prefect's temporary server on a busy machine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from cli.main import EPHEMERAL_STARTUP_TIMEOUT, _run, build_parser
from synthloop.config import ConfigError


def test_the_cli_takes_bakeoff_families_from_the_registry():
    args = build_parser().parse_args(["run", "--families", "cgan", "vae"])
    assert args.families == ["cgan", "vae"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--families", "cgan", "stylegan"])


def test_a_run_gives_the_temporary_server_time_unless_the_user_set_it(monkeypatch, tmp_path):
    name, default = EPHEMERAL_STARTUP_TIMEOUT
    args = argparse.Namespace(
        params=Path(tmp_path / "params.yaml"),  # none there: the run stops before Prefect
        force=False, dry_run=False, max_rounds=None, family=None, families=None,
    )  # fmt: skip
    monkeypatch.setenv(name, "0")  # recorded, so the test leaves the environment as it was
    monkeypatch.delenv(name)
    with pytest.raises(ConfigError, match="no such params file"):
        _run(args)
    assert int(default) >= 120
    assert os.environ[name] == default
    monkeypatch.setenv(name, "45")
    with pytest.raises(ConfigError):
        _run(args)
    assert os.environ[name] == "45"
