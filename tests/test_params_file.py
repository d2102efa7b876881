"""params.yaml as a run changes it (flows/params_file.py): each change leaves the file as it
says, comments kept, and the flow parses the file once per change, never to re-read it."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest
import yaml

import flows.loop
import flows.params_file
from flows.params_file import ParamsFile
from synthloop.config import ConfigError, load_params
from tests.conftest import REPO

COMMENT = "# One configuration, grouped by stage"


@pytest.fixture
def params_yaml(tmp_path: Path) -> Path:
    """The project's params.yaml, comments and all, in a folder of its own."""
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    return path


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every parse of a params file by the flow's modules (the object's own and the override
    writer's validation), by path."""
    seen: list[str] = []

    def counting(path, overrides=None):  # noqa: ANN001, ANN202 (load_params's signature)
        seen.append(str(path))
        return load_params(path, overrides=overrides)

    for module in (flows.params_file, flows.loop):
        monkeypatch.setattr(module, "load_params", counting)
    return seen


def test_apply_writes_the_overrides_keeps_comments_and_parses_the_result(params_yaml, parses):
    run = ParamsFile(params_yaml)
    assert run.params.train.steps == 1500 and len(parses) == 1
    run.params, run.params  # noqa: B018 (reading the value parses nothing)
    assert len(parses) == 1

    new = run.apply({"train": {"steps": 3000, "cgan": {"diffaug": True}}})
    text = params_yaml.read_text()
    assert COMMENT in text and "# cgan diffaug: DiffAugment of D's inputs" in text
    assert "steps: 3000" in text and "diffaug: true" in text
    loaded = yaml.safe_load(text)
    assert loaded["train"]["cgan"] == {"z_dim": 64, "width": 32, "lr_d": 0.0004, "diffaug": True}
    assert new is run.params and new == load_params(params_yaml)
    assert new.train.steps == 3000
    # One change: the writer's validation of the merged set, then the file as written.
    assert len(parses) == 3

    before = params_yaml.read_text()
    with pytest.raises(ConfigError, match="train.steps"):
        run.apply({"train": {"steps": -1}})
    assert params_yaml.read_text() == before and run.params.train.steps == 3000


def test_the_bakeoff_winner_is_written_as_the_family(params_yaml):
    run = ParamsFile(params_yaml)
    assert run.set_family("vae").train.family == "vae"
    text = params_yaml.read_text()
    assert COMMENT in text and yaml.safe_load(text)["train"]["family"] == "vae"
    assert run.params.train.family == "vae"


def test_restore_puts_a_snapshot_back_and_says_whether_anything_changed(params_yaml, parses):
    start = (REPO / "params.yaml").read_text()
    run = ParamsFile(params_yaml)
    snap = run.snapshot()
    assert snap == start
    assert run.restore(snap) is False  # nothing changed: nothing written, nothing parsed
    assert len(parses) == 1

    run.apply({"train": {"steps": 3000}})
    after_retrain = run.snapshot()
    run.set_family("vae")
    assert len(parses) == 5

    assert run.restore(after_retrain) is True
    assert params_yaml.read_text() == after_retrain  # byte for byte, comments included
    assert run.params.train.family == "cgan" and run.params.train.steps == 3000
    assert len(parses) == 6  # parsed again once, when the value was next read
    run.params  # noqa: B018
    assert len(parses) == 6

    assert run.restore(start) is True and params_yaml.read_text() == start
    assert run.params.train.steps == 1500 and run.params == load_params(params_yaml)
    assert run.restore(start) is False


def test_a_bakeoff_changes_params_yaml_only_through_the_object(params_yaml, parses, monkeypatch):
    """The bake-off with its stages stubbed: each family written once, the winner last, and
    the attempt's functions read the value, not the file."""
    import flows.attempt as attempt

    ran: list[tuple[str, str]] = []
    monkeypatch.setattr(attempt, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(attempt, "stale_stages", lambda workspace, *stages: list(stages))
    monkeypatch.setattr(
        attempt,
        "run_stage",
        lambda stage, workspace, force: ran.append((stage, load_params(params_yaml).train.family)),
    )
    run = ParamsFile(params_yaml)
    table = attempt._bakeoff(params_yaml.parent, run, ["vae", "cgan"], force=False)
    assert [family for _, family in ran] == ["vae"] * 3 + ["cgan"] * 3  # each stage saw its own
    assert table["winner"] in ("vae", "cgan")
    assert run.params.train.family == table["winner"]
    assert yaml.safe_load(params_yaml.read_text())["train"]["family"] == table["winner"]
    assert COMMENT in params_yaml.read_text()
    # The first parse, then two per family written (validation, the file as written).
    assert len(parses) == 1 + 2 * 3


def test_the_attempt_route_reads_the_parsed_value_not_the_file():
    """Below `closed_loop`, params.yaml is parsed only by `ParamsFile`; the flow itself parses
    it once more, before the lock: the run's parameters checked against it."""
    import flows.attempt
    import flows.closed_loop

    assert not hasattr(flows.attempt, "load_params")
    assert inspect.getsource(flows.closed_loop).count("load_params(") == 1
