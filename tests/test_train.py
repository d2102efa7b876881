"""The train stage: outputs, bit-exact resume, refused resumes, and import isolation."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synthloop.config import EvaluatorConfig, TrainConfig
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter, content_id
from tasks.evaluator.stage import run_train_evaluator
from tasks.generate.stage import load_model
from tasks.shared.images import dataset_version, encode_rows
from tasks.shared.model_dir import model_version
from tasks.train.stage import run_train
from tasks.train.train_eval import FixedBatchScorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("a", "b", "c")


def make_dataset(directory: Path, per_class: int = 12, size: int = 8, seed: int = 0) -> Path:
    """3 classes of noisy 8x8 grey images: a horizontal bar, a vertical bar, a diagonal."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (len(CLASSES) * per_class, 1, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    for image, label in zip(images, labels, strict=True):
        k = int(rng.integers(1, size - 1))
        if label == 0:
            image[0, k, :] = 255
        elif label == 1:
            image[0, :, k] = 255
        else:
            image[0, np.arange(size), np.arange(size)] = 255
    with ShardWriter(directory, IMAGE_SCHEMA, shard_rows=16) as writer:
        for png, label in zip(encode_rows(torch.from_numpy(images)), labels, strict=True):
            writer.append(
                {
                    "id": content_id(png),
                    "label": CLASSES[label],
                    "split": "train",
                    "source": "test",
                    "image": png,
                    "height": size,
                    "width": size,
                    "channels": 1,
                }
            )
    return directory


def make_yardstick(root: Path) -> None:
    """What train's evaluation reads, where the defaults put them under `root`: a real
    split in data/clean/{train,val,test} and a tiny evaluator trained on it (models/evaluator)."""
    clean = root / "data/clean"
    for seed, split in enumerate(("train", "val", "test"), start=10):
        make_dataset(clean / split, per_class=12 if split == "train" else 6, seed=seed)
    cfg = EvaluatorConfig(
        width=4, feature_dim=8, epochs=2, batch_size=16, device="cpu", input=clean,
        output=root / "models/evaluator", report=root / "reports/evaluator.json",
    )  # fmt: skip
    run_train_evaluator(cfg)


def tiny_cfg(root: Path, data: Path, name: str = "run", **overrides: object) -> TrainConfig:
    values: dict = {
        "family": "cgan",
        "steps": 12,
        "batch_size": 8,
        "device": "cpu",
        "log_every": 5,
        "checkpoint_every": 6,
        "eval_every": 3,  # divides checkpoint_every: a stop at a checkpoint is a real kill
        "eval_per_class": 4,
        "evaluator": root / "models/evaluator",
        "val_data": root / "data/clean/val",
        "cgan": {"width": 8, "z_dim": 8},
        "diffusion": {"width": 8, "timesteps": 50, "sample_steps": 3},
        "vae": {"width": 8, "latent_dim": 4},
        "transformer": {"n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.1},
        "input": data,
        "output": root / name / "models/generator",
        "checkpoints": root / name / "checkpoints",
        "reports": root / name / "reports",
    }
    return TrainConfig.model_validate(values | overrides)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    make_yardstick(tmp_path)
    return make_dataset(tmp_path / "fused")


def test_writes_model_card_config_weights_and_reports(tmp_path: Path, data: Path) -> None:
    cfg = tiny_cfg(tmp_path, data, steps=6)
    card = run_train(cfg)

    weights = load_file(cfg.output / "weights.safetensors")
    assert weights and all(k.startswith(("embed", "fc", "norms", "convs", "out")) for k in weights)
    config = json.loads((cfg.output / "config.json").read_text())
    assert config["train"]["family"] == "cgan"
    assert TrainConfig.model_validate(config["train"]) == cfg
    assert (config["classes"], config["num_classes"]) == (list(CLASSES), 3)
    assert (config["channels"], config["size"]) == (1, 8)

    on_disk = json.loads((cfg.output / "model_card.json").read_text())
    assert on_disk == card
    assert card["family"] == "cgan" and card["steps"] == 6
    assert card["data_version"] == dataset_version(data)
    assert card["model_version"] == model_version(cfg.output / "weights.safetensors")
    assert card["train_counts"] == {"a": 12, "b": 12, "c": 12}
    assert set(card["final_losses"]) == {"loss_d", "loss_g", "d_real", "d_fake", "d_real_sign"}
    assert card["images_per_second"] > 0 and card["flops_per_image"] > 0
    assert card["device"].startswith("cpu")
    assert card["parameters"]["G"] == card["parameters"]["G_ema"] > 0

    with open(cfg.reports / "losses.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert set(rows[0]) == {"step", "loss_d", "loss_g", "d_real", "d_fake", "d_real_sign"}
    summary = json.loads((cfg.reports / "summary.json").read_text())
    assert summary["model_version"] == card["model_version"] and summary["steps"] == 6
    assert (summary["best_step"], summary["stopped_early"]) == (card["best_step"], False)
    assert summary["best_score"] == card["best_score"]
    assert (cfg.checkpoints / "last.pt").is_file()

    # evaluated at steps 3 and 6; the output is the best of the two, as the curve says
    assert card["eval_metric"] == "kid + rejected" and card["eval_seconds"] >= 0
    curve = [(row["step"], row["score"]) for row in card["eval_curve"]]
    for row in card["eval_curve"]:  # the score is its parts summed; a share is a share
        assert row["score"] == pytest.approx(row["kid"] + row["rejected"], abs=1e-7)
        assert 0.0 <= row["rejected"] <= 1.0
    assert [step for step, _ in curve] == [3, 6] and all(np.isfinite(k) for _, k in curve)
    best = min(curve, key=lambda point: point[1])  # min keeps the first of a tie, as training
    assert (card["best_step"], card["best_score"]) == best
    with open(cfg.reports / "eval.csv") as fh:
        on_csv = [(int(r["step"]), float(r["score"])) for r in csv.DictReader(fh)]
    assert on_csv == curve
    ckpt = torch.load(cfg.checkpoints / "last.pt", weights_only=True)
    assert ckpt["evaluations"]["stopping"]["best_step"] == card["best_step"]
    kept = ckpt["evaluations"]["best_weights"]
    assert kept.keys() == weights.keys()
    assert all(torch.equal(weights[k], kept[k]) for k in weights)
    assert not list(cfg.output.parent.glob(".generator.*"))  # no temporaries left behind


@pytest.mark.parametrize("family", ["cgan", "diffusion", "vae", "transformer"])
def test_resume_reaches_the_uninterrupted_weights(
    tmp_path: Path, data: Path, family: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasks.train.stage")
    whole = tiny_cfg(tmp_path, data, "whole", family=family)
    run_train(whole)

    # The "killed" run: it stopped after its step-6 checkpoint; the resume finishes it.
    first = tiny_cfg(tmp_path, data, "parts", family=family, steps=6)
    run_train(first)
    assert "resumed from step" not in caplog.text
    resumed = tiny_cfg(tmp_path, data, "parts", family=family, resume=True)
    run_train(resumed)
    assert "resumed from step 6" in caplog.text

    expected = load_file(whole.output / "weights.safetensors")
    got = load_file(resumed.output / "weights.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # every network, EMA and optimizer state matches too, and so do the logged losses
    a = torch.load(whole.checkpoints / "last.pt", weights_only=True)
    b = torch.load(resumed.checkpoints / "last.pt", weights_only=True)
    torch.testing.assert_close(b["family"], a["family"], rtol=0, atol=1e-6)
    assert b["losses"] == [pytest.approx(row) for row in a["losses"]]
    assert (resumed.reports / "losses.csv").read_text() == (
        whole.reports / "losses.csv"
    ).read_text()
    card = json.loads((resumed.output / "model_card.json").read_text())
    assert card["resumed_from_step"] == 6
    # the evaluations too: the same curve, so the same best step and output weights
    whole_card = json.loads((whole.output / "model_card.json").read_text())
    assert [p["step"] for p in card["eval_curve"]] == [3, 6, 9, 12]
    for key in ("best_step", "best_score", "eval_curve", "stopped_early", "model_version"):
        assert card[key] == whole_card[key], key
    assert (resumed.reports / "eval.csv").read_text() == (whole.reports / "eval.csv").read_text()


def test_resume_refuses_other_data(tmp_path: Path, data: Path) -> None:
    run_train(tiny_cfg(tmp_path, data, steps=4))
    other = make_dataset(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="data version") as err:
        run_train(tiny_cfg(tmp_path, other, resume=True))
    assert "resume: false" in str(err.value)


def test_resume_refuses_other_settings(tmp_path: Path, data: Path) -> None:
    run_train(tiny_cfg(tmp_path, data, steps=4))
    with pytest.raises(ValueError, match="train.family"):
        run_train(tiny_cfg(tmp_path, data, family="diffusion", resume=True))
    with pytest.raises(ValueError, match="train.cgan"):
        run_train(tiny_cfg(tmp_path, data, resume=True, cgan={"width": 16, "z_dim": 8}))
    with pytest.raises(ValueError, match="beyond train.steps=2"):
        run_train(tiny_cfg(tmp_path, data, steps=2, resume=True))


def test_resume_without_a_checkpoint_starts_over(
    tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasks.train.stage")
    card = run_train(tiny_cfg(tmp_path, data, steps=3, resume=True))
    assert "no checkpoint" in caplog.text and card["resumed_from_step"] is None


def test_checkpoints_inside_the_output_are_refused(tmp_path: Path, data: Path) -> None:
    cfg = tiny_cfg(tmp_path, data, checkpoints=tmp_path / "run/models/generator/ckpt")
    with pytest.raises(ValueError, match="must not be inside train.output"):
        run_train(cfg)


def test_gpu_stages_import_without_prefect_dvc_or_great_expectations() -> None:
    code = (
        "import sys\n"
        "import tasks.train.stage, tasks.generate.stage, tasks.shared.generators\n"
        "import tasks.shared.generators.cgan, tasks.shared.generators.diffusion\n"
        "import tasks.shared.generators.transformer\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in {'prefect', 'dvc', 'great_expectations'})\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported: {proc.stdout.strip()}"


def test_class_balance_draws_every_class_equally_often():
    from tasks.train.stage import class_balance_weights, draw_batch

    labels = torch.tensor([0] * 90 + [1] * 10)
    assert class_balance_weights(labels, 0.0) is None  # uniform over rows: plain randint
    for balance, share_of_short in ((1.0, 0.5), (0.5, 0.25)):
        weights = class_balance_weights(labels, balance)
        drawn = draw_batch(weights, 100, 20_000, torch.Generator().manual_seed(0), labels.device)
        short = float((labels[drawn] == 1).float().mean())
        # the short class gets 10^(1-b) / (10^(1-b) + 90^(1-b)) of the draws
        assert short == pytest.approx(share_of_short, abs=0.02), balance


# KID by the family's step (no rejected samples): best at 4, then two evaluations without
# improvement
SCRIPTED = {2: 3.0, 4: 1.0, 6: 2.0, 8: 1.0, 10: 0.5, 12: 0.1}


@pytest.fixture
def scripted_scores(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The scorer measures KID SCRIPTED[step], nothing rejected; the list records the steps
    it scored."""
    scored: list[int] = []

    def measure(self: FixedBatchScorer, family) -> dict[str, float]:
        scored.append(family.steps)
        return {"kid": SCRIPTED[family.steps], "rejected": 0.0}

    monkeypatch.setattr(FixedBatchScorer, "measure", measure)
    return scored


def test_the_output_is_the_best_evaluation_and_patience_stops_training(
    tmp_path: Path, data: Path, scripted_scores: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tasks.train.stage")
    cfg = tiny_cfg(tmp_path, data, eval_every=2, patience=2)
    card = run_train(cfg)

    assert scripted_scores == [2, 4, 6, 8]  # 8 is no better than 4 (a tie): stop there
    assert "early stop at step 8" in caplog.text
    assert (card["steps"], card["best_step"], card["best_score"]) == (8, 4, 1.0)
    assert card["stopped_early"] is True
    assert card["eval_curve"] == [
        {"step": s, "score": SCRIPTED[s], "kid": SCRIPTED[s], "rejected": 0.0} for s in (2, 4, 6, 8)
    ]
    with open(cfg.reports / "losses.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(1, 9))
    assert (cfg.reports / "eval.csv").read_text().splitlines() == [
        "step,score,kid,rejected", "2,3,3,0", "4,1,1,0", "6,2,2,0", "8,1,1,0",
    ]  # fmt: skip
    summary = json.loads((cfg.reports / "summary.json").read_text())
    assert (summary["best_step"], summary["stopped_early"], summary["steps"]) == (4, True, 8)

    # The output is the EMA of step 4: what 4 steps without evaluation end with (sampling
    # for the scores draws from no training stream, so the runs agree bit for bit).
    at_four = tiny_cfg(tmp_path, data, "four", steps=4, eval_every=0)
    four_card = run_train(at_four)
    assert four_card["best_step"] is None and four_card["eval_metric"] is None
    assert card["model_version"] == four_card["model_version"]
    got = load_file(cfg.output / "weights.safetensors")
    expected = load_file(at_four.output / "weights.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_an_early_stop_resumes_to_the_uninterrupted_result(
    tmp_path: Path, data: Path, scripted_scores: list[int]
) -> None:
    whole = run_train(tiny_cfg(tmp_path, data, "whole", eval_every=2, patience=2))
    # killed after the step-6 checkpoint (evaluations at 2, 4, 6; patience 1 of 2 spent)
    run_train(tiny_cfg(tmp_path, data, "parts", eval_every=2, patience=2, steps=6))
    resumed_cfg = tiny_cfg(tmp_path, data, "parts", eval_every=2, patience=2, resume=True)
    resumed = run_train(resumed_cfg)
    assert scripted_scores == [2, 4, 6, 8] + [2, 4, 6] + [8]
    for key in ("steps", "best_step", "best_score", "stopped_early", "eval_curve"):
        assert resumed[key] == whole[key], key
    assert resumed["model_version"] == whole["model_version"]
    # a resume of the stopped run trains no further and writes the same model
    again = run_train(resumed_cfg)
    assert scripted_scores[-1] == 8 and len(scripted_scores) == 8
    assert (again["steps"], again["model_version"]) == (8, whole["model_version"])


def test_patience_zero_trains_every_step_and_keeps_the_best(
    tmp_path: Path, data: Path, scripted_scores: list[int]
) -> None:
    card = run_train(tiny_cfg(tmp_path, data, eval_every=2, patience=0))
    assert scripted_scores == [2, 4, 6, 8, 10, 12]
    assert (card["steps"], card["best_step"], card["stopped_early"]) == (12, 12, False)


def test_a_missing_evaluator_is_refused_unless_evaluation_is_off(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "fused")  # no evaluator, no val split
    with pytest.raises(FileNotFoundError, match="run the train_evaluator stage") as err:
        run_train(tiny_cfg(tmp_path, data, steps=2))
    assert "eval_every: 0" in str(err.value)
    cfg = tiny_cfg(tmp_path, data, steps=2, eval_every=0)
    card = run_train(cfg)
    assert (card["best_step"], card["eval_curve"], card["stopped_early"]) == (None, [], False)
    assert (cfg.reports / "eval.csv").read_text().splitlines() == ["step,score,kid,rejected"]


def test_the_score_counts_the_samples_validate_would_reject_for_their_class(
    tmp_path: Path, data: Path
) -> None:
    """The rejected share follows the acceptance line: none under a line of 0, all over a
    line no probability reaches, and in between the share the evaluator itself gives."""
    cfg = tiny_cfg(tmp_path, data, steps=3, eval_every=0)
    run_train(cfg)
    family = load_model(cfg.output, torch.device("cpu")).family

    def scorer(line: float) -> FixedBatchScorer:
        return FixedBatchScorer(
            cfg.evaluator, cfg.val_data, len(CLASSES), 8, 0, torch.device("cpu"), 16, line
        )

    assert scorer(0.0).measure(family)["rejected"] == 0.0
    assert scorer(1.5).measure(family)["rejected"] == 1.0
    half = scorer(0.5)
    images = half.samples(family)
    intended = half.evaluator.probabilities(images)[torch.arange(len(images)), half.labels]
    parts = half.measure(family)
    assert parts["rejected"] == pytest.approx(float((intended < 0.5).float().mean()))
    assert parts["kid"] == scorer(0.0).measure(family)["kid"]  # the line moves only its part
