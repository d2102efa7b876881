"""Sharded stages: shards computed as Prefect tasks (threads or a local Dask cluster) give the
same outputs, byte for byte, as the plain stage; the shard cache never serves a stale shard;
a failing shard names its stage and shard."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cli.main import main as synthloop
from flows.sharded import stage_spec
from synthloop import codegraph
from synthloop.config import load_params
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter
from synthloop.procedural import make_image_folder
from synthloop.sharding import ShardFailed, cache_dir, code_digest, run_inline, shard_key
from tests.conftest import small_params

# What each stage writes (relative to the workspace).
OUTPUTS = {
    "ingest": ("data/ingested", "data/quarantine/ingest.parquet", "reports/ingest.json"),
    "augment": ("data/augmented", "reports/augment.json"),
}


def outputs_digest(ws: Path, stage: str) -> dict[str, str]:
    """sha256 of every output file of `stage`, by path."""
    files = []
    for out in OUTPUTS[stage]:
        path = ws / out
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    assert files
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def remove_outputs(ws: Path, stage: str) -> None:
    for out in OUTPUTS[stage]:
        path = ws / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_clean_train(directory: Path, per_class: int = 10, size: int = 12) -> None:
    """A small clean train split (3 classes) in the pipeline's image format."""
    raw = make_image_folder(directory.parent / "shapes-train", 3, per_class, size, seed=2)
    with ShardWriter(directory, IMAGE_SCHEMA, shard_rows=7) as out:
        for png in sorted(raw.rglob("*.png")):
            data = png.read_bytes()
            out.append(
                {
                    "id": hashlib.blake2b(data, digest_size=16).hexdigest(),
                    "label": png.parent.name,
                    "split": "train",
                    "source": "shapes",
                    "image": data,
                    "height": size,
                    "width": size,
                    "channels": 3,
                }
            )


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace: params.yaml, 3 classes x 20 raw PNGs and two bad entries (62 listed: 21
    ellipse, 20 rectangle, the stray file, 20 triangle), a clean train split of 30 rows;
    ingest in 4 shards of 16 entries, augment in 4 shards of 8 parent rows."""
    ws = tmp_path / "ws"
    raw = make_image_folder(ws / "data/raw/shapes", classes=3, per_class=20, size=16, seed=1)
    (raw / "stray.png").write_bytes(b"no class folder")
    (raw / "ellipse" / "link.png").symlink_to(tmp_path)  # leaves the root: quarantined
    write_clean_train(ws / "data/clean/train")
    params = small_params()
    params["augment"].update(shard_rows=8, batch_size=5, device="cpu")
    params["orchestration"] = {"task_runner": "threads", "max_workers": 2}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    # `synthloop stage` exports the params path; monkeypatch restores it afterwards.
    monkeypatch.setenv("SYNTHLOOP_PARAMS", str(ws / "params.yaml"))
    return ws


def set_params(ws: Path, section: str, **values: object) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(ws: Path, stage: str) -> None:
    assert synthloop(["--params", str(ws / "params.yaml"), "stage", stage]) == 0


def forbid_computing(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    """Make computing a shard in this process fail: the stage must use the cached ones."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError(f"{stage}: a shard was computed again instead of reused")

    target = {
        "ingest": "tasks.ingest.stage._read_entries",
        "augment": "tasks.augment.stage.augment_batch",
    }
    monkeypatch.setattr(target[stage], refuse)


@pytest.mark.parametrize(
    ("stage", "runner"),
    # (augment on dask passes too, but each worker process imports torch: +50 s on 2 cores)
    [("ingest", "dask"), ("ingest", "threads"), ("augment", "threads")],
)
def test_sharded_run_gives_the_same_bytes_as_the_plain_stage(
    ws, stage, runner, prefect_api, monkeypatch
):
    from flows.sharded import prepare_shards

    run_stage(ws, stage)  # the plain stage: every shard inline, in this process
    plain = outputs_digest(ws, stage)
    remove_outputs(ws, stage)

    set_params(ws, "orchestration", task_runner=runner, max_workers=2)
    summary = prepare_shards(stage, str(ws / "params.yaml"))
    assert summary == {"stage": stage, "shards": 4, "computed": 4, "reused": 0}
    assert len(list(cache_dir(ws, stage).iterdir())) == 4
    with monkeypatch.context() as patch:
        forbid_computing(patch, stage)
        run_stage(ws, stage)
    assert outputs_digest(ws, stage) == plain
    assert not cache_dir(ws, stage).exists()  # the merge consumed the shards


def test_prepared_shards_are_reused_by_a_second_prepare(ws, prefect_api):
    from flows.sharded import prepare_shards

    params_path = str(ws / "params.yaml")
    assert prepare_shards("ingest", params_path)["computed"] == 4
    again = prepare_shards("ingest", params_path)
    assert (again["computed"], again["reused"]) == (0, 4)


def keys(ws: Path, stage: str) -> list[str]:
    spec = stage_spec(stage)
    config = spec.config(load_params(ws / "params.yaml"))
    return [shard_key(spec, config, shard) for shard in spec.plan(config)]


def test_keys_change_with_inputs_and_params(ws):
    before = keys(ws, "ingest")
    assert len(set(before)) == 4 and keys(ws, "ingest") == before  # distinct and stable

    # New bytes in one file (entry 21: the second shard) change that shard's key only.
    changed = ws / "data/raw/shapes/rectangle/000004.png"
    make_image_folder(ws / "other", classes=2, per_class=1, size=16, seed=9)
    changed.write_bytes((ws / "other/rectangle/000000.png").read_bytes())
    after = keys(ws, "ingest")
    assert [a != b for a, b in zip(before, after, strict=True)] == [False, True, False, False]

    augment = keys(ws, "augment")
    set_params(ws, "augment", seed=7)
    assert not set(keys(ws, "augment")) & set(augment)  # a param change: every key is new


def test_keys_change_with_the_code_a_shard_imports(tmp_path, monkeypatch):
    # A shard module importing a helper (lazily): editing the helper is a new key.
    monkeypatch.setattr(codegraph, "ROOT", tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/probe.py").write_text("def run():\n    from tasks import helper\n")
    helper = tmp_path / "tasks/helper.py"
    helper.write_text("X = 1\n")
    (tmp_path / "tasks/other.py").write_text("Y = 1\n")
    first = code_digest("tasks.probe")
    (tmp_path / "tasks/other.py").write_text("Y = 2\n")  # not imported: the same key
    assert code_digest("tasks.probe") == first
    helper.write_text("X = 22\n")
    assert code_digest("tasks.probe") != first


def test_a_stale_shard_is_never_used(ws, prefect_api):
    from flows.sharded import prepare_shards

    prepare_shards("ingest", str(ws / "params.yaml"))
    changed = ws / "data/raw/shapes/triangle/000000.png"
    make_image_folder(ws / "other", classes=2, per_class=1, size=16, seed=9)
    new_bytes = (ws / "other/ellipse/000000.png").read_bytes()
    changed.write_bytes(new_bytes)

    run_stage(ws, "ingest")  # the old shard 2 is in the cache, under another key
    sharded = outputs_digest(ws, "ingest")
    rows = pd.read_parquet(ws / "data/ingested")
    assert rows.loc[rows.path == str(changed), "image"].tolist() == [new_bytes]
    remove_outputs(ws, "ingest")
    run_inline(stage_spec("ingest"), load_params(ws / "params.yaml"), workspace=ws)
    assert outputs_digest(ws, "ingest") == sharded


def fail_on(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Reading the file `name` raises (in this process: the threads runner or inline)."""
    import tasks.ingest.stage

    real = tasks.ingest.stage.read_ref

    def read_ref(ref):  # noqa: ANN001, ANN202
        if ref.path.endswith(name):
            raise RuntimeError("disk on fire")
        return real(ref)

    monkeypatch.setattr(tasks.ingest.stage, "read_ref", read_ref)


def test_a_failing_shard_names_stage_and_shard(ws, prefect_api, monkeypatch):
    from flows.sharded import prepare_shards

    fail_on(monkeypatch, "triangle/000010.png")  # entry 50: the fourth shard, index 3
    message = r"stage 'ingest': shard 3 \(of 4\) failed: RuntimeError: disk on fire"
    with pytest.raises(ShardFailed, match=message):
        prepare_shards("ingest", str(ws / "params.yaml"))
    # The other shards are cached (a retry computes only the failed one); nothing half-made.
    assert len(list(cache_dir(ws, "ingest").iterdir())) == 3
    with pytest.raises(ShardFailed, match=message):
        run_inline(stage_spec("ingest"), load_params(ws / "params.yaml"), workspace=ws)
    assert not (ws / "data/ingested").exists()


def test_unknown_stage_is_refused(ws):
    from flows.sharded import prepare_shards

    with pytest.raises(ValueError, match="'train' is not sharded"):
        prepare_shards("train", str(ws / "params.yaml"))


# --- validate: evaluator features in shards ------------------------------------------------

UPSTREAM = ("ingest", "clean", "train_evaluator", "augment", "fuse", "train", "generate")


def validate_outputs(ws: Path) -> tuple[dict, dict[str, str]]:
    """(the report's figures, sha256 of each accepted file); the report holds no timings."""
    report = json.loads((ws / "reports/validation.json").read_text())
    accepted = sorted(p for p in (ws / "data/accepted").rglob("*") if p.is_file())
    assert accepted
    return report, {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in accepted}


@pytest.fixture(scope="module")
def validate_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A workspace with every stage before validate run on tiny params, and validate's
    outputs computed inline: clean train/test 48/6 rows and 24 synthetic in feature shards
    of 16 (shard_rows 10 rounded up to 2 batches of 8): 3 + 1 + 2 shards."""
    ws = tmp_path_factory.mktemp("validate") / "ws"
    make_image_folder(ws / "data/raw/shapes", classes=3, per_class=20, size=16, seed=1)
    for folder in ("pool", "feedback"):
        (ws / "data" / folder).mkdir(parents=True)
    params = small_params()
    params["validate"].update(batch_size=8, shard_rows=10, device="cpu")
    params["generate"]["error_quota"] = 0  # the shard counts above: 24 synthetic rows
    params["orchestration"] = {"task_runner": "threads", "max_workers": 2}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SYNTHLOOP_PARAMS", str(ws / "params.yaml"))  # restored afterwards
        for stage in (*UPSTREAM, "validate"):
            run_stage(ws, stage)
    assert not cache_dir(ws, "validate").exists()
    report, accepted = validate_outputs(ws)
    return ws, report, accepted


@pytest.fixture
def vws(validate_base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the validate workspace, without validate's outputs."""
    ws = shutil.copytree(validate_base[0], tmp_path / "ws", symlinks=True)
    shutil.rmtree(ws / "data/accepted")
    (ws / "reports/validation.json").unlink()
    monkeypatch.setenv("SYNTHLOOP_PARAMS", str(ws / "params.yaml"))
    return ws


def test_validate_from_prepared_features_equals_the_inline_run(
    vws, validate_base, prefect_api, monkeypatch
):
    from flows.sharded import prepare_shards
    from tasks.shared.evaluator import Evaluator, load_evaluator, small_image_cpu_threads
    from tasks.shared.images import load_image_tensors
    from tasks.validate.features import load_features

    _, inline_report, inline_accepted = validate_base
    summary = prepare_shards("validate", str(vws / "params.yaml"))
    assert summary == {"stage": "validate", "shards": 7, "computed": 7, "reused": 0}

    # The shards' features are the unsharded extraction's, bit for bit.
    features = load_features([cache_dir(vws, "validate") / key for key in keys(vws, "validate")])
    evaluator = load_evaluator(vws / "models/evaluator", batch_size=8)
    with small_image_cpu_threads(evaluator.device, evaluator.size):
        for split, folder in (("train", "clean/train"), ("synthetic", "synthetic")):
            whole = evaluator.features(load_image_tensors(vws / "data" / folder).images)
            assert torch.equal(features[split], whole), split

    with monkeypatch.context() as patch:  # the stage must extract no feature itself

        def refuse(*_: object) -> None:
            raise AssertionError("validate: features were computed again instead of reused")

        patch.setattr(Evaluator, "features", refuse)
        run_stage(vws, "validate")
    assert validate_outputs(vws) == (inline_report, inline_accepted)
    assert not cache_dir(vws, "validate").exists()


def test_validate_keys_change_with_evaluator_weights_and_data(vws):
    from safetensors.torch import load_file, save_file

    before = keys(vws, "validate")
    assert len(set(before)) == 7 and keys(vws, "validate") == before

    # A touched synthetic file: only the synthetic shards (the last two) get new keys.
    part = sorted((vws / "data/synthetic").glob("part-*.parquet"))[0]
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    touched = keys(vws, "validate")
    assert [a != b for a, b in zip(before, touched, strict=True)] == [False] * 5 + [True] * 2

    weights = vws / "models/evaluator/weights.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    save_file(state, weights)
    assert not set(keys(vws, "validate")) & set(touched)  # new weights: every key is new


def test_a_missing_validate_shard_is_computed_inline(vws, validate_base, prefect_api, monkeypatch):
    import tasks.validate.features
    from flows.sharded import prepare_shards

    prepare_shards("validate", str(vws / "params.yaml"))
    missing = keys(vws, "validate")[5]  # the first synthetic shard
    shutil.rmtree(cache_dir(vws, "validate") / missing)

    decoded: list[tuple[int, int]] = []
    real = tasks.validate.features.decode_range

    def decode_range(directory: Path, start: int, stop: int) -> torch.Tensor:
        decoded.append((start, stop))
        return real(directory, start, stop)

    monkeypatch.setattr(tasks.validate.features, "decode_range", decode_range)
    run_stage(vws, "validate")
    assert decoded == [(0, 16)]  # that shard only
    assert validate_outputs(vws) == validate_base[1:]


# --- clean: pass 1 as shards of the ingested part files ---------------------------------------

# GX's Data Docs are left out: they hold run times. (Appended: the table above is left as is.)
OUTPUTS["clean"] = ("data/clean", "data/quarantine/clean.parquet", "reports/clean.json")


def refuse_decoding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the rows clean decodes in this process (pass 1's only entry point)."""
    import tasks.clean.decode

    decoded: list[int] = []
    real = tasks.clean.decode.decode_chunk

    def decode_chunk(labels: list, images: list, cfg: object) -> object:
        decoded.append(len(labels))
        return real(labels, images, cfg)

    monkeypatch.setattr(tasks.clean.decode, "decode_chunk", decode_chunk)
    return decoded


@pytest.fixture
def cws(ws: Path) -> Path:
    """The workspace, ingested: 60 rows in 4 parts of 16, 16, 16 and 12 (4 clean shards)."""
    run_stage(ws, "ingest")
    return ws


def test_clean_from_prepared_shards_equals_the_inline_run(cws, prefect_api, monkeypatch):
    import tasks.clean.route
    import tasks.clean.stage
    from flows.sharded import prepare_shards

    with monkeypatch.context() as patch:  # inline, and sharded otherwise: 2-row shards
        patch.setattr(tasks.clean.stage, "BATCH_ROWS", 2)  # the plan's and pass 1's batches
        patch.setattr(tasks.clean.stage, "SHARD_BATCHES", 1)
        patch.setattr(tasks.clean.route, "BATCH_ROWS", 2)  # pass 2's batches
        assert len(keys(cws, "clean")) == 30
        run_stage(cws, "clean")
    inline = outputs_digest(cws, "clean")
    assert not cache_dir(cws, "clean").exists()
    remove_outputs(cws, "clean")

    summary = prepare_shards("clean", str(cws / "params.yaml"))
    assert summary == {"stage": "clean", "shards": 4, "computed": 4, "reused": 0}
    with monkeypatch.context() as patch:
        decoded = refuse_decoding(patch)
        run_stage(cws, "clean")
    assert decoded == []  # the stage only merged
    assert outputs_digest(cws, "clean") == inline
    assert not cache_dir(cws, "clean").exists()


def test_clean_keys_change_with_their_ingested_part_only(cws):
    before = keys(cws, "clean")
    assert len(set(before)) == 4 and keys(cws, "clean") == before

    part = sorted((cws / "data/ingested").glob("part-*.parquet"))[2]
    pq.write_table(pq.read_table(part).slice(1), part)  # one row fewer in the third part
    changed = keys(cws, "clean")
    assert [a != b for a, b in zip(before, changed, strict=True)] == [False, False, True, False]

    set_params(cws, "clean", seed=7)
    assert not set(keys(cws, "clean")) & set(changed)  # a new param: every key is new


def test_a_missing_clean_shard_is_computed_inline(cws, prefect_api, monkeypatch):
    from flows.sharded import prepare_shards

    run_stage(cws, "clean")
    inline = outputs_digest(cws, "clean")
    remove_outputs(cws, "clean")

    prepare_shards("clean", str(cws / "params.yaml"))
    shutil.rmtree(cache_dir(cws, "clean") / keys(cws, "clean")[1])
    decoded = refuse_decoding(monkeypatch)
    run_stage(cws, "clean")
    assert decoded == [16]  # the second part's rows only
    assert outputs_digest(cws, "clean") == inline
