"""The generator families side by side: speed, fidelity, utility and memory in one table.

    python benchmarks/families.py [--params params.yaml] [--data data/fused] [--real data/clean]
        [--evaluator models/evaluator] [--families cgan,diffusion,vae,transformer]
        [--baseline cgan] [--steps N] [--set vae.beta=0.5 ...] [--per-class N]
        [--repeats 1] [--temperatures 1.0] [--utility-seeds N] [--utility-steps N]
        [--device auto] [--threads 1] [--peak-tflops T] [--json PATH]

Settings are params.yaml's (train, generate, train_evaluator, validate, augment); the paths
default to params.yaml's too (train.input, validate.clean, validate.evaluator). --families
defaults to every family in the registry (tasks.shared.generators.FAMILIES).

Per family (and per repeat; the families take turns, so load from other jobs hits each
alike), one fresh subprocess, so its peak memory is its own:
  train    the train stage itself (tasks.train.stage.run_train: params.yaml's train section, the
           family, --steps and --set overrides), early stopping included: the best EMA
           weights by KID against the real val split, as the stage picks them. Train img/s
           is the model card's (the loop alone, evaluations excluded).
  sample   --per-class images of every class (generate.per_class; its feedback extras are
           left out) from the exported model (tasks.generate.stage.load_model), in generate's
           batches from a CPU generator seeded generate.seed, as generate draws them; timed
           after one small untimed warm-up batch. vae: every --temperatures value is sampled
           from the same model (the rate is the first one's).
  memory   peak RSS of the subprocess (VmHWM, benchmarks/memory.py: data, training and
           sampling; the RSS after the imports is printed for reference); on CUDA also
           torch.cuda.max_memory_allocated and MFU (the card's flops_per_image x train img/s
           over the device's bf16 peak, benchmarks/train_throughput.py's table).

Then, in this process, the first repeat's samples are judged as validate judges them, with
tasks/validate/stage.py's own functions and the evaluator trained on real data (on CPU a repeat
trains the same weights bit for bit; repeats are for the timings):
  fidelity class consistency (share the evaluator assigns to the intended class) and FID
           in the evaluator's feature space against the real train split (validate's
           `fidelity`), with a `real test` row: the real test split against real train,
           the floor two real samples of the data already show (FID grows as the sample
           shrinks: the test split is smaller than the samples, so a family can score
           below the floor without being closer to real data than real data is);
  accepted validate's acceptance (evaluator confidence, near copies, memorisation,
           duplicates): the rows validate would pass on to utility;
  utility  validate's protocol (tasks.validate.utility_protocol.compare_arms with validate's
           UtilityTrainer: class-balanced draws, validate.utility_steps, validate.utility_seeds
           paired seeds, the baseline chosen on val as validate chooses it) on the accepted rows.
           The baseline arms, trained on the real split alone, are trained once and shared
           by every family (`SharedBaseline`), so every family's delta is paired against
           the very same baseline classifiers. Reported: the short-class and overall delta
           (accuracy points) with its 95% Student-t interval and the verdict (helped / no
           evidence / hurt).

Speeds are medians over --repeats, each also as a ratio to --baseline's median in this run.
Prints a markdown table; --json writes every figure. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
for path in (PROJECT, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from memory import peak_rss_mib  # noqa: E402 (benchmarks/memory.py)

from synthloop.config import Params, TrainConfig, load_params  # noqa: E402
from synthloop.dataset import content_id  # noqa: E402
from tasks.shared.evaluator import Splits, load_evaluator  # noqa: E402
from tasks.shared.generators import FAMILIES  # noqa: E402
from tasks.shared.images import ImageTensors, encode_rows, load_image_tensors, resolve_device  # noqa: E402
from tasks.shared.metrics import class_consistency, near_copy_rate  # noqa: E402
from tasks.validate.figures import fidelity, privacy  # noqa: E402
from tasks.validate.gates import acceptance  # noqa: E402
from tasks.validate.promotion import subset  # noqa: E402
from tasks.validate.utility_protocol import Recipe, Trainer, compare_arms, run_now  # noqa: E402
from tasks.validate.utility_trainer import TrainerPool, UtilityTrainer  # noqa: E402


def set_value(values: dict, assignment: str) -> None:
    """'vae.beta=0.5' -> values["vae"]["beta"] = 0.5 (the value parsed as YAML); a number
    after a list indexes it: 'ingest.sources.0.short_keep=25'."""
    key, _, raw = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(leaf) if isinstance(node, list) else leaf] = yaml.safe_load(raw)


def rows_digest(data: ImageTensors) -> str:
    """The rows' identity: their ids (content hashes) and labels, in order."""
    digest = hashlib.sha256("\n".join(data.ids).encode())
    digest.update(data.labels.numpy().tobytes())
    return digest.hexdigest()


class SharedBaseline:
    """compare_arms' trainer: `trainer` (a plain trainer or a `TrainerPool`), with its runs on
    `train`'s rows (the baseline arms: the real split alone, per seed and recipe) trained
    once and reused. Every family's arms are then paired with the very same baseline
    classifiers, and the baseline is not retrained per family. `memo` carries the baseline
    runs over to another trainer of the same settings and splits (fashion_lt.py: every loop
    seed's clean split is the same); a run is a deterministic function of its rows, seed
    and recipe (tests/test_utility_trainer.py), so reuse changes no figure."""

    def __init__(
        self, trainer: Trainer | TrainerPool, train: ImageTensors, memo: dict | None = None
    ) -> None:
        self._submit = getattr(trainer, "submit", None) or run_now(trainer)
        self.kept: dict[tuple[str, int, Recipe], Future] = {} if memo is None else memo
        self.baseline = rows_digest(train)

    def submit(self, data: ImageTensors, seed: int, recipe: Recipe) -> Future:
        if rows_digest(data) != self.baseline:
            return self._submit(data, seed, recipe)
        key = (self.baseline, seed, recipe)
        if key not in self.kept:
            self.kept[key] = self._submit(data, seed, recipe)
        return self.kept[key]


# --- one family in its own process -------------------------------------------------------


def worker(spec: dict) -> None:
    """Train, sample and time one family; samples and figures into spec["out"]."""
    import gpu_check  # the peak-memory helpers
    import train_throughput as tt  # the bf16 peak table

    from tasks.generate.stage import load_model
    from tasks.shared.images import to_uint8
    from tasks.train.stage import run_train

    out = Path(spec["out"])
    torch.set_num_threads(spec["threads"])
    rss_start = peak_rss_mib()
    cfg = TrainConfig.model_validate(spec["train"])
    device = resolve_device(cfg.device)
    gpu_check.reset_peak(device)
    card = run_train(cfg)
    torch.set_num_threads(spec["threads"])  # run_train restores the threads it found
    model = load_model(cfg.output, device)
    classes = len(model.classes)
    labels = torch.arange(classes).repeat_interleave(spec["per_class"])
    result: dict = {"card": {k: card.get(k) for k in CARD_KEYS}, "samples": {}}
    temperatures = spec["temperatures"] if cfg.family == "vae" else [None]
    for t in temperatures:
        if t is not None:
            vae = model.family.cfg.vae.model_copy(update={"temperature": t})
            model.family.cfg = model.family.cfg.model_copy(update={"vae": vae})
        with torch.no_grad():
            warm = torch.arange(min(len(labels), 2 * classes)) % classes
            model.family.sample(warm, torch.Generator().manual_seed(spec["seed"] + 1))
            generator = torch.Generator().manual_seed(spec["seed"])  # as generate draws
            sync(device)
            began = time.perf_counter()
            images = torch.cat(
                [
                    to_uint8(model.family.sample(batch, generator)).cpu()
                    for batch in labels.split(spec["batch_size"])
                ]
            )
            sync(device)
            seconds = time.perf_counter() - began
        name = cfg.family if t is None else f"{cfg.family} T={t:g}"
        torch.save({"images": images, "labels": labels}, out / f"{len(result['samples'])}.pt")
        result["samples"][name] = {"file": f"{len(result['samples'])}.pt", "seconds": seconds}
    first = next(iter(result["samples"].values()))
    peak = tt.peak_flops(device, spec["peak_tflops"])
    result |= {
        "train_images_per_second": card["images_per_second"],
        "sample_images_per_second": len(labels) / first["seconds"],
        "rss_start_mib": rss_start,
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": gpu_check.peak_memory_mib(device),
        "mfu": card["flops_per_image"] * card["images_per_second"] / peak if peak else None,
        "device": tt.device_name(device),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


CARD_KEYS = ("steps", "best_step", "stopped_early", "train_seconds", "flops_per_image")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Linux carries a process's peak RSS across exec from the memory it was started from, so a
# worker spawned straight from this (large) process would report at least this process's
# peak. A bare interpreter starts it instead: its own peak is then what it reports (plus at
# most the launcher's ~13 MiB).
LAUNCHER = [
    sys.executable,
    "-S",
    "-c",
    "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
]


def run_family(spec: dict) -> dict:
    """`worker(spec)` in a fresh Python process; its result."""
    out = Path(spec["out"])
    out.mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps(spec))
    worker_cmd = [sys.executable, str(HERE), "--worker", str(out / "spec.json")]
    subprocess.run([*LAUNCHER, *worker_cmd], check=True)
    return json.loads((out / "result.json").read_text())


# --- judging the samples as validate does ------------------------------------------------


class Judge:
    """The real splits, their evaluator features and the shared utility trainer, once."""

    def __init__(self, params: Params, real: Path, evaluator_dir: Path, device: torch.device):
        self.cfg = params.validation.model_copy(update={"clean": real, "evaluator": evaluator_dir})
        self.evaluator = load_evaluator(evaluator_dir, device, self.cfg.batch_size)
        classes = self.evaluator.classes
        self.splits = Splits(
            *(load_image_tensors(real / s, classes=classes) for s in ("train", "val", "test"))
        )
        self.features = {
            s: self.evaluator.features(getattr(self.splits, s).images)
            for s in ("train", "val", "test")
        }
        self.trainer = SharedBaseline(
            UtilityTrainer.configured(
                self.cfg, params.train_evaluator, params.augment.policy, self.splits, device
            ),
            self.splits.train,
        )  # fmt: skip

    def floor(self) -> dict:
        """The real test split judged as samples are: the figures real data already show."""
        test = self.splits.test
        consistency, _ = class_consistency(self.evaluator.probabilities(test.images), test.labels)
        fid = self.fidelity(self.features["test"], test.labels)["fid_real_floor"]
        return {"consistency": consistency, "fid": fid}

    def fidelity(self, syn_f: torch.Tensor, labels: torch.Tensor) -> dict:
        f = self.features
        return fidelity(
            f["train"], f["test"], syn_f, self.splits.train.labels, labels,
            self.evaluator.classes, self.cfg.k, self.cfg.seed,
        )  # fmt: skip

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        cfg, splits, classes = self.cfg, self.splits, self.evaluator.classes
        synthetic = ImageTensors(
            images=images,
            labels=labels,
            ids=[content_id(png) for png in encode_rows(images)],  # as generate names rows
            classes=classes,
            sources=["synthetic"] * len(labels),
        )
        features = self.features | {"synthetic": self.evaluator.features(images)}
        figures = self.fidelity(features["synthetic"], labels)
        probs = self.evaluator.probabilities(images)
        consistency, confidence = class_consistency(probs, labels)
        intended = probs.gather(1, labels[:, None])[:, 0].cpu().numpy()
        _, threshold, nearest = near_copy_rate(
            images, splits.train.images, splits.test.images, cfg.near_copy_percentile
        )
        memorised, _ = privacy(cfg, splits, synthetic, features, classes)
        mask, _ = acceptance(
            synthetic.ids,
            intended,
            (nearest < threshold).cpu().numpy(),
            cfg.min_confidence,
            memorised.numpy(),
        )
        accepted = subset(synthetic, torch.from_numpy(np.flatnonzero(mask)))
        seeds = [cfg.seed + s for s in range(cfg.utility_seeds)]  # as validate.utility
        utility = compare_arms(
            splits.train, accepted, splits.val.labels, splits.test.labels, self.trainer,
            seeds, cfg.short_class_share,
        )  # fmt: skip
        return {
            "consistency": consistency,
            "confidence": confidence,
            "fid": figures["fid"],
            "fid_real_floor": figures["fid_real_floor"],
            "accepted": len(accepted),
            "synthetic": len(synthetic),
            "utility": {k: utility[k] for k in UTILITY_KEYS},
        }


UTILITY_KEYS = ("baseline", "seeds", "short_classes", "short", "overall", "decisive", "verdict")


# --- the table ---------------------------------------------------------------------------


def delta_cell(summary: dict | None) -> str:
    """A utility summary's delta in accuracy points: 'mean [low, high] verdict'."""
    if not summary:
        return "n/a"
    d = summary["delta"]

    def pts(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:+.1f}"

    return f"{pts(d['mean'])} [{pts(d['low'])}, {pts(d['high'])}] {summary['verdict']}"


def ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"  # small ratios keep two figures


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join(" --- " for _ in rows[0]) + "|")
    return "\n".join(lines)


def report(results: dict, floor: dict, baseline: str, cuda: bool) -> str:
    head = ["family", "train img/s", f"x {baseline}", "sample img/s", f"x {baseline}", "steps",
            "consistency", "FID", "accepted", "short Δ pts [95%]", "overall Δ pts [95%]",
            "peak RSS MiB (+ over imports)"]  # fmt: skip
    if cuda:
        head += ["peak CUDA MiB", "MFU"]
    base = results[baseline]
    rows = [head]
    for r in results.values():
        speed = [
            f"{r['train_images_per_second']:.0f}",
            ratio(r["train_images_per_second"] / base["train_images_per_second"]),
            f"{r['sample_images_per_second']:.0f}",
            ratio(r["sample_images_per_second"] / base["sample_images_per_second"]),
            f"{r['steps']} (best {r['best_step']})",
        ]
        memory = [f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_mib'] - r['rss_start_mib']:.0f})"]
        if cuda:
            mfu = r["mfu"]
            memory += [f"{r['cuda_peak_mib']:.0f}", "n/a" if mfu is None else f"{mfu:.1%}"]
        for i, (name, q) in enumerate(r["quality"].items()):
            cells = speed if i == 0 else [""] * len(speed)
            judged = (
                [f"judging failed: {q['error']}", "", "", "", ""] if "error" in q
                else [f"{q['consistency']:.3f}", f"{q['fid']:.2f}",
                      f"{q['accepted']}/{q['synthetic']}", delta_cell(q["utility"]["short"]),
                      delta_cell(q["utility"]["overall"])]
            )  # fmt: skip
            rows.append([name, *cells, *judged, *(memory if i == 0 else [""] * len(memory))])
    dash = ["–"] * (len(head) - 3)
    rows.append(["real test", *dash[:5], f"{floor['consistency']:.3f}", f"{floor['fid']:.2f}",
                 *dash[5:]])  # fmt: skip
    return markdown(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    p.add_argument("--data", type=Path, help="the training set (default: train.input)")
    p.add_argument("--real", type=Path, help="the clean splits (default: validate.clean)")
    p.add_argument("--evaluator", type=Path, help="default: validate.evaluator")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--baseline", default="cgan", help="speeds are also given as ratios to it")
    p.add_argument("--steps", type=int, help="train.steps (default: params.yaml's)")
    p.add_argument("--set", action="append", default=[], help="a train override: vae.beta=0.5")
    p.add_argument("--per-class", type=int, help="samples per class (default: generate.per_class)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--temperatures", default="1.0", help="vae: comma-separated")
    p.add_argument("--utility-seeds", type=int, help="default: validate.utility_seeds")
    p.add_argument("--utility-steps", type=int, help="default: validate.utility_steps")
    p.add_argument("--device", help="default: train.device")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--peak-tflops", type=float, help="the GPU's bf16 peak, for MFU")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker.read_text()))

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    validation = {"utility_seeds": args.utility_seeds, "utility_steps": args.utility_steps}
    params = params.model_copy(
        update={
            "validation": params.validation.model_copy(
                update={k: v for k, v in validation.items() if v is not None}
            )
        }
    )
    data = args.data or params.train.input
    real = args.real or params.validation.clean
    evaluator = args.evaluator or params.validation.evaluator
    device = resolve_device(args.device or params.train.device)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families + [args.baseline]) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; the registry has {list(FAMILIES)}")
    if args.baseline not in families:
        families.insert(0, args.baseline)
    per_class = args.per_class or params.generate.per_class

    runs: dict[str, list[dict]] = {f: [] for f in families}
    quality: dict[str, dict] = {}
    judge = Judge(params, real, evaluator, device)
    with tempfile.TemporaryDirectory(prefix="families-") as tmp:
        for repeat in range(args.repeats):
            for family in families:
                values = params.train.model_dump(mode="json") | {"family": family}
                for assignment in args.set:
                    set_value(values, assignment)
                run = Path(tmp) / f"{family}-{repeat}"
                values |= {
                    "input": str(data),
                    "evaluator": str(evaluator),
                    "val_data": str(real / "val"),
                    "device": device.type,
                    "output": str(run / "model"),
                    "checkpoints": str(run / "checkpoints"),
                    "reports": str(run / "reports"),
                } | ({"steps": args.steps} if args.steps else {})
                spec = {
                    "train": values, "out": str(run / "out"), "per_class": per_class,
                    "batch_size": params.generate.batch_size, "seed": params.generate.seed,
                    "temperatures": [float(t) for t in args.temperatures.split(",")],
                    "threads": args.threads, "peak_tflops": args.peak_tflops,
                }  # fmt: skip
                result = run_family(spec)
                runs[family].append(result)
                print(
                    f"repeat {repeat} {family}: {result['card']['steps']} steps, "
                    f"{result['train_images_per_second']:.0f} train img/s, "
                    f"{result['sample_images_per_second']:.0f} sample img/s, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
                if repeat == 0:  # on CPU a repeat trains the same weights: judge once
                    for name, s in result["samples"].items():
                        samples = torch.load(Path(spec["out"]) / s["file"])
                        try:
                            quality[name] = judge(samples["images"], samples["labels"])
                        except Exception as err:  # keep the other families' figures
                            quality[name] = {"error": f"{type(err).__name__}: {err}"}
                        print(f"  {name}: {summary_line(quality[name])}", flush=True)

    results = {}
    for family, family_runs in runs.items():
        first = family_runs[0]
        median = {
            k: statistics.median(r[k] for r in family_runs)
            for k in ("train_images_per_second", "sample_images_per_second", "peak_rss_mib")
        }
        results[family] = {
            **first, **median, "steps": first["card"]["steps"],
            "best_step": first["card"]["best_step"],
            "quality": {n: quality[n] for n in first["samples"]},
            "repeats": [{k: r[k] for k in median} for r in family_runs],
        }  # fmt: skip
    floor = judge.floor()
    first = results[families[0]]
    cuda = device.type == "cuda"
    utility = next((q["utility"] for r in results.values() for q in r["quality"].values()
                    if "utility" in q), None)  # fmt: skip
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"device: {first['device']}; data {data} ({per_class} samples per class); "
        f"train overrides: {args.set or 'none'}{f', steps {args.steps}' if args.steps else ''}; "
        + (
            f"utility: baseline {utility['baseline']}, seeds {utility['seeds']}, "
            f"{params.validation.utility_steps} steps, short classes {utility['short_classes']}; "
            if utility
            else ""
        )
        + f"RSS after imports {first['rss_start_mib']:.0f} MiB\n"
    )
    print(report(results, floor, args.baseline, cuda))
    if args.json:
        command = shlex.join([sys.executable, *sys.argv])
        args.json.write_text(
            json.dumps({"command": command, "floor": floor, "families": results}, indent=2)
        )


def summary_line(q: dict) -> str:
    if "error" in q:
        return f"judging failed: {q['error']}"
    u = q["utility"]
    return (
        f"consistency {q['consistency']:.3f}, FID {q['fid']:.2f}, accepted {q['accepted']}/"
        f"{q['synthetic']}, short {delta_cell(u['short'])}, overall {delta_cell(u['overall'])}"
    )


if __name__ == "__main__":
    main()
