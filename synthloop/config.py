"""Typed configuration: `params.yaml`, grouped by stage, loaded into validated models.

Long by design: one pydantic model per params.yaml section, the one owner of every
parameter's type, bounds and description (params.yaml holds the values; a test holds the
two equal). A new stage's section goes here beside the others. Split into a package that
re-exported the same names, every stage would still import every part (each reads `Params`,
which holds all sections), so the split would buy no narrower DVC deps, only more files.

Every model forbids unknown keys, so a typo stops the run before any work with a message
that names the key. Relative paths resolve against the folder that holds `params.yaml`.

Every path an ingest source names (`ingest.sources[i].path`, a torchvision `root`) must
resolve, symlinks included, inside one of `ingest.allowed_roots` (default `data/raw`).
`check_allowed_roots` enforces it inside `parse_params`, before any other check, so
every reader of the params refuses the same way: `synthloop run`, `synthloop stage ingest`
(what `dvc repro` runs) and the Prefect flow, which loads its params, run parameters
included, before it takes the workspace lock or writes anything. The roots themselves are
set in params.yaml only: a run's parameters cannot widen them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PARAMS_FILE = "params.yaml"
# The params file `synthloop stage` loaded, exported for what runs beneath it: a
# distributed train stage re-runs itself under torchrun; the shard cache lives beside it.
PARAMS_ENV = "SYNTHLOOP_PARAMS"


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names the key and the problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _refuse_removed(data: Any, key: str, instead: str, was: str = "a setting") -> Any:
    """`data` as it is, unless it still sets `key`, which no longer exists (it `was` a
    setting, a share...): then an error that names it and what replaced it."""
    if isinstance(data, dict) and key in data:
        raise ValueError(f"{key}: no longer {was}; {instead}, so remove this key")
    return data


def _resolve(path: Path, info: ValidationInfo) -> Path:
    root = (info.context or {}).get("root")
    path = Path(path).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    return path


def _existing(path: Path, info: ValidationInfo) -> Path:
    path = _resolve(path, info)
    if (info.context or {}).get("check_paths", True) and not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return path


# A path a stage reads or writes; a relative one resolves against the params file's folder.
ResolvedPath = Annotated[Path, AfterValidator(_resolve)]


class ImageFolderSource(_Model):
    """A folder with one sub-folder per class; nested folders below a class are allowed."""

    kind: Literal["image_folder"]
    path: Path
    name: str | None = None

    _check_path = field_validator("path")(_existing)


class ManifestSource(_Model):
    """A CSV or Parquet table of `path,label`; relative paths resolve against its folder."""

    kind: Literal["manifest"]
    path: Path
    name: str | None = None

    _check_path = field_validator("path")(_existing)

    @field_validator("path")
    @classmethod
    def _table_suffix(cls, path: Path) -> Path:
        if path.suffix.lower() not in {".csv", ".parquet"}:
            raise ValueError(f"a manifest must be a .csv or .parquet file, got {path.name}")
        return path


class TorchvisionSource(_Model):
    """A torchvision dataset stored under a local root; downloads only when asked to."""

    kind: Literal["torchvision"]
    dataset: str = Field(description="torchvision.datasets class name, e.g. MNIST, CIFAR10")
    root: ResolvedPath
    train: bool = True
    download: bool = False
    limit: PositiveInt | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _root_exists_unless_downloading(self) -> TorchvisionSource:
        if not self.download and not self.root.exists():
            raise ValueError(f"root does not exist: {self.root} (set download: true to fetch)")
        return self


class DemoSource(_Model):
    """The embedded default: scikit-learn's bundled handwritten digits plus seeded defects."""

    kind: Literal["demo"]
    seed: int = 0
    defects: bool = True
    short_classes: list[str] = Field(
        default_factory=lambda: ["3", "5", "8"],
        description="digits cut to `short_keep` images each (a seeded choice): the long tail "
        "of the target user; [] keeps every digit",
    )
    short_keep: PositiveInt = Field(
        51, description="images kept of each short class; clean.split shares them out"
    )
    name: str | None = None


Source = Annotated[
    ImageFolderSource | ManifestSource | TorchvisionSource | DemoSource,
    Field(discriminator="kind"),
]


DEFAULT_ALLOWED_ROOTS = (Path("data/raw"),)


class IngestConfig(_Model):
    sources: list[Source] = Field(min_length=1)
    allowed_roots: list[Path] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_ROOTS),
        min_length=1,
        description="folders every source path must resolve into (symlinks included); a "
        "manifest row outside them is quarantined",
    )
    shard_rows: PositiveInt = 8192
    output: ResolvedPath = Path("data/ingested")
    quarantine: ResolvedPath = Path("data/quarantine/ingest.parquet")
    report: ResolvedPath = Path("reports/ingest.json")

    @field_validator("allowed_roots")
    @classmethod
    def _roots(cls, roots: list[Path], info: ValidationInfo) -> list[Path]:
        return [_resolve(root, info).resolve() for root in roots]

    @model_validator(mode="after")
    def _unique_names(self) -> IngestConfig:
        names = [source_name(s, i) for i, s in enumerate(self.sources)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self


def source_name(source: Any, index: int) -> str:
    return source.name or f"{source.kind}{index}"


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether `path`, resolved (symlinks followed), lies in one of the resolved `roots`."""
    real = Path(path).resolve()
    return any(real == root or root in real.parents for root in roots)


# The keys of a source that name a place to read from, by kind.
_SOURCE_PATH_KEYS = {"image_folder": ("path",), "manifest": ("path",), "torchvision": ("root",)}


def check_allowed_roots(raw: dict[str, Any], root: Path) -> None:
    """Refuse a source path that resolves outside `ingest.allowed_roots`, naming its key.

    Runs on the raw mapping, before the models check that a path exists: a refused path
    is never looked at, so the message cannot tell anyone what lies outside the roots.
    A malformed section is left to the models to report.
    """
    ingest = raw.get("ingest")
    if not isinstance(ingest, dict) or not isinstance(ingest.get("sources", []), list):
        return
    given = ingest.get("allowed_roots", [str(p) for p in DEFAULT_ALLOWED_ROOTS])
    if not isinstance(given, list) or not all(isinstance(p, str | Path) for p in given):
        return
    roots = [(root / Path(p).expanduser()).resolve() for p in given]
    shown = ", ".join(str(p) for p in given)
    for index, source in enumerate(ingest.get("sources", [])):
        if not isinstance(source, dict):
            continue
        for key in _SOURCE_PATH_KEYS.get(source.get("kind"), ()):
            value = source.get(key)
            if isinstance(value, str | Path) and not inside(root / Path(value).expanduser(), roots):
                raise ValueError(
                    f"ingest.sources[{index}].{key}: {str(value)!r} is outside the allowed "
                    f"roots ({shown}, in {root}). Put the data under one of them, or add "
                    "its folder to ingest.allowed_roots in params.yaml."
                )


class SplitConfig(_Model):
    """Per class: the training share first, then val, then test (see `counts`)."""

    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    train_min_share: float = Field(
        0.6,
        ge=0,
        le=1,
        description="every class keeps at least this share of its rows (rounded up; 2 rows "
        "at least) for training, whatever test_min_per_class asks: the generator and the "
        "classifiers learn a short class from its train split",
    )
    test_min_per_class: int = Field(
        0,
        ge=0,
        description="hold out at least this many test images of every class, as far as "
        "train_min_share and the val share leave rows for them, so a short class's test set "
        "can resolve a gain",
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self

    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def train_floor(self, n: int) -> int:
        """Rows of a class of n that training keeps whatever else asks:
        min(n - v, max(2, ceil(train_min_share * n))), where v = 1 when the val fraction gives
        the class a val row (round(n * val) >= 1), else 0. Two rows at least, as the test
        minimum always left; the one val row stays, as a class without one is invisible to
        what val decides (early stopping, the utility baseline's choice)."""
        share = math.ceil(self.train_min_share * n - 1e-9)  # 0.7 * 10 is 7.000000000000001
        keep_val = min(1, round(n * self.val))
        return min(n - keep_val, max(2, share))

    def counts(self, n: int) -> tuple[int, int]:
        """(val, test) rows of a class of n; train gets the rest. In order: the train floor
        (`train_floor`); val, round(n * val) of what is left; test, max(round(n * test),
        test_min_per_class) of what is left; the rest to train."""
        left = n - self.train_floor(n)
        n_val = min(round(n * self.val), left)
        n_test = min(max(round(n * self.test), self.test_min_per_class), left - n_val)
        return n_val, n_test


class CleanConfig(_Model):
    image_size: PositiveInt = Field(8, description="output images are image_size x image_size")
    channels: Literal[1, 3] = 1
    max_pixels: PositiveInt = Field(
        4096 * 4096, description="decompression-bomb cap: images with more pixels are rejected"
    )
    near_duplicate_distance: int = Field(
        4, ge=0, le=16, description="max Hamming distance between 64-bit dHashes"
    )
    near_duplicate_size: int = Field(
        32,
        ge=8,
        le=32,
        description="side of the grey thumbnails that confirm a near-duplicate (at most "
        "image_size; from 24 px copies cropped by a few pixels are aligned); each kept row "
        "costs side * side bytes of a file during clean (9/8 of that for RGB)",
    )
    near_duplicate_difference: float = Field(
        0.04,
        ge=0,
        le=1,
        description="max mean absolute difference of two standardised thumbnails (mean "
        "removed, divided by pixel std): 0 identical, ~0.15+ distinct drawings; blurred "
        "and aligned thumbnails are allowed 2.5 times this",
    )
    near_duplicate_contrast: float = Field(
        1.25, ge=1, description="max ratio of two thumbnails' pixel stds (larger/smaller)"
    )
    near_duplicate_local: float = Field(
        0.16,
        ge=0,
        description="max local difference of two thumbnails of 24 px or more: the largest "
        "mean absolute difference over a 3x3 window of the blurred, standardised, aligned "
        "comparison (in stds). A copy differs little everywhere; two photos of look-alike "
        "things differ somewhere (a print, a strap)",
    )
    near_duplicate_sheet_pairs: int = Field(
        32, ge=0, le=1024, description="removed/kept pairs shown in near_duplicate_sheet"
    )
    blank_std: float = Field(
        2.0, ge=0, description="images whose pixel std (0-255 scale) is below this are blank"
    )
    labels: list[str] | None = Field(None, description="allow-list; None keeps every label")
    label_map: dict[str, str] = Field(default_factory=dict, description="rename labels first")
    split: SplitConfig = SplitConfig()
    split_tolerance: float = Field(0.05, ge=0, le=1)
    min_class_count: int = Field(5, ge=0)
    seed: int = 0
    workers: int = Field(0, ge=0, description="decode processes; 0: one per CPU core")
    shard_rows: PositiveInt = 8192
    input: ResolvedPath = Path("data/ingested")
    output: ResolvedPath = Path("data/clean")
    quarantine: ResolvedPath = Path("data/quarantine/clean.parquet")
    report: ResolvedPath = Path("reports/clean.json")
    near_duplicate_sheet: ResolvedPath = Path("reports/near_duplicates.png")
    data_docs: ResolvedPath = Path("reports/great_expectations")

    @field_validator("near_duplicate_difference", mode="before")
    @classmethod
    def _relative_difference(cls, value: object) -> object:
        # Before it was relative the same key took 0-255 (e.g. 3.0): say so, not just "<= 1".
        if isinstance(value, int | float) and value > 1:
            raise ValueError(
                f"{value} is over 1: near_duplicate_difference is relative to the thumbnails' "
                "pixel std now (e.g. 0.04), no longer a 0-255 pixel difference"
            )
        return value


Device = Literal["auto", "cpu", "cuda"]
# The generator families (tasks/shared/generators FAMILIES implements each; a test holds the two
# equal). The run form, the CLI and TrainConfig take their choices from here.
FamilyName = Literal["cgan", "diffusion", "vae", "transformer"]
# loop.target_per_class: a rule (tasks/shared/pool.py pool_targets), one bound for every
# class, or none
TargetRule = PositiveInt | Literal["auto", "proportional"] | None
FAMILY_NAMES: tuple[str, ...] = get_args(FamilyName)


class AugmentPolicy(_Model):
    """torchvision transforms.v2 settings; a probability or magnitude of 0 turns one off."""

    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    rotate_degrees: float = Field(10.0, ge=0, le=180)
    translate: float = Field(0.1, ge=0, le=0.5, description="max shift, fraction of size")
    scale_min: float = Field(0.9, gt=0)
    scale_max: float = Field(1.1, gt=0)
    color_jitter: float = Field(
        0.0, ge=0, le=1, description="brightness/contrast/saturation jitter (RGB only)"
    )
    noise_std: float = Field(0.03, ge=0, le=1, description="Gaussian noise, 0-1 pixel scale")

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentPolicy:
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must not exceed scale_max")
        return self


class AugmentConfig(_Model):
    target_per_class: PositiveInt | None = Field(
        None, description="real + augmented rows per class; None: the largest class's count"
    )
    min_copies: int = Field(1, ge=0, description="augmented copies of every image at least")
    max_copies: int = Field(4, ge=0, description="augmented copies of one image at most")
    policy: AugmentPolicy = AugmentPolicy()
    batch_size: PositiveInt = 512
    device: Device = "auto"
    seed: int = 0
    shard_rows: PositiveInt = 8192
    input: ResolvedPath = Path("data/clean/train")
    output: ResolvedPath = Path("data/augmented")
    report: ResolvedPath = Path("reports/augment.json")

    @model_validator(mode="after")
    def _copies(self) -> AugmentConfig:
        if self.min_copies > self.max_copies:
            raise ValueError(f"min_copies {self.min_copies} exceeds max_copies {self.max_copies}")
        return self


class FuseConfig(_Model):
    max_share: dict[Literal["augmented"], float] = Field(
        default_factory=lambda: {"augmented": 0.4},
        description="each source at most this share of any class in the fused set; a "
        "class's synthetic rows are capped at its pool target instead (loop.target_per_class)",
    )
    seed: int = 0
    shard_rows: PositiveInt = 8192
    clean: ResolvedPath = Path("data/clean/train")
    augmented: ResolvedPath = Path("data/augmented")
    pool: ResolvedPath = Path("data/pool")
    feedback: ResolvedPath = Path("data/feedback")
    output: ResolvedPath = Path("data/fused")
    report: ResolvedPath = Path("reports/fusion.json")

    @field_validator("max_share", mode="before")
    @classmethod
    def _no_synthetic_share(cls, shares: Any) -> Any:
        return _refuse_removed(
            shares,
            "synthetic",
            "fuse mixes in at most a class's pool target (loop.target_per_class, "
            "loop.synthetic_multiple)",
            was="a share",
        )

    @field_validator("max_share")
    @classmethod
    def _shares(cls, shares: dict[str, float]) -> dict[str, float]:
        for source, share in shares.items():
            if not 0 <= share < 1:
                raise ValueError(f"{source}: a share must be in [0, 1), got {share}")
        return shares


class CganConfig(_Model):
    z_dim: PositiveInt = 64
    width: PositiveInt = Field(32, description="base channel count of G and D")
    lr_d: float = Field(4e-4, gt=0)
    diffaug: bool = Field(False, description="differentiable augmentation for small data")


class DiffusionConfig(_Model):
    width: PositiveInt = Field(32, description="base channel count of the UNet")
    schedule: Literal["cosine", "edm"] = "cosine"
    timesteps: PositiveInt = 1000
    sample_steps: PositiveInt = Field(20, description="DDIM steps when sampling")
    guidance: float = Field(2.0, ge=0, description="classifier-free guidance scale")
    p_uncond: float = Field(0.1, ge=0, lt=1, description="label dropout while training")


class VaeConfig(_Model):
    latent_dim: PositiveInt = 32
    width: PositiveInt = Field(32, description="base channel count of encoder and decoder")
    beta: float = Field(1.0, ge=0, description="the KL term's weight in the ELBO")
    kl_warmup: int = Field(500, ge=0, description="steps over which the KL weight rises to beta")
    temperature: float = Field(1.0, ge=0, description="sampling: scales the prior's std")
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    lr: float = Field(1e-3, gt=0, description="the VAE's Adam lr (train.lr is the others')")


class TransformerConfig(_Model):
    """The autoregressive family over quantised pixels (tasks/shared/generators/transformer.py)."""

    levels: int = Field(16, ge=2, le=256, description="values a pixel is quantised to")
    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    n_embd: PositiveInt = Field(48, description="width; a multiple of n_head")
    lr: float = Field(1e-3, gt=0, description="its Adam lr (train.lr is cgan's and diffusion's)")
    dropout: float = Field(0.0, ge=0, lt=1, description="embeddings and residual branches")
    temperature: float = Field(0.9, gt=0, description="sampling: logits are divided by it")
    top_k: int = Field(8, ge=0, description="sample from the k likeliest levels; 0: all")
    max_tokens: PositiveInt = Field(
        1024, description="longest sequence (channels x size^2) accepted; larger is refused"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        return self


class DistributedConfig(_Model):
    """Data-parallel training under torchrun (DDP); one process per device."""

    nproc_per_node: PositiveInt = Field(1, description="processes (GPUs) per node; >1: torchrun")
    nnodes: PositiveInt = Field(1, description="nodes; >1 needs rdzv_endpoint")
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (node 0)")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on CUDA")

    @property
    def enabled(self) -> bool:
        return self.nproc_per_node * self.nnodes > 1

    @model_validator(mode="after")
    def _multi_node_needs_endpoint(self) -> DistributedConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of node 0)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        return self


class TrainConfig(_Model):
    family: FamilyName = "cgan"
    steps: PositiveInt = 1500
    batch_size: PositiveInt = 64
    lr: float = Field(1e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    class_balance: float = Field(
        1.0,
        ge=0,
        le=1,
        description="0: batches drawn uniformly over rows; 1: every class equally often "
        "(a short class gets as many steps as a rich one); between: counts^(1-balance)",
    )
    seed: int = 0
    device: Device = "auto"
    cpu_threads: int = Field(0, ge=0, description="torch threads on CPU; 0: synthloop/threads.py")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the networks")
    checkpoint_every: PositiveInt = 500
    log_every: PositiveInt = 100
    resume: bool = Field(False, description="continue from the last checkpoint if any")
    eval_every: int = Field(
        250,
        ge=0,
        description="steps between evaluations of the EMA weights (KID of a fixed batch "
        "against the real val split); the best is the output. 0: no evaluation, the last "
        "weights are the output",
    )
    patience: int = Field(
        3, ge=0, description="evaluations without improvement before stopping; 0: never stop"
    )
    eval_per_class: PositiveInt = Field(20, description="samples per class of the fixed batch")
    gpu_dataset_max_bytes: PositiveInt = Field(
        2 * 1024**3, description="decode the dataset onto the GPU only below this size"
    )
    cgan: CganConfig = CganConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    vae: VaeConfig = VaeConfig()
    transformer: TransformerConfig = TransformerConfig()
    distributed: DistributedConfig = DistributedConfig()
    input: ResolvedPath = Path("data/fused")
    output: ResolvedPath = Path("models/generator")
    checkpoints: ResolvedPath = Path("models/checkpoints/train")
    reports: ResolvedPath = Path("reports/train")
    evaluator: ResolvedPath = Path("models/evaluator")
    val_data: ResolvedPath = Path("data/clean/val")


class GenerateConfig(_Model):
    per_class: PositiveInt = Field(100, description="synthetic images per class")
    per_class_extra: dict[str, int] = Field(
        default_factory=dict, description="extra images for some classes (label -> count)"
    )
    error_quota: float = Field(
        1.0,
        ge=0,
        description="the class with the largest evaluator val error gets this many times "
        "per_class extra, the others in proportion to their error (0: off)",
    )
    batch_size: PositiveInt = 256
    seed: int = 0
    device: Device = "auto"
    shard_rows: PositiveInt = 8192
    model: ResolvedPath = Path("models/generator")
    output: ResolvedPath = Path("data/synthetic")
    grid: ResolvedPath = Path("reports/samples.png")
    grid_per_class: PositiveInt = 10

    @property
    def summary(self) -> Path:
        """generate's JSON summary, beside the grid in reports/ (a DVC metric)."""
        return self.grid.with_name("generate.json")


class EvaluatorConfig(_Model):
    """A small CNN classifier trained on real clean data only: the validation yardstick."""

    width: PositiveInt = Field(32, description="base channel count")
    feature_dim: PositiveInt = Field(128, description="penultimate feature size (FID space)")
    epochs: PositiveInt = 15
    batch_size: PositiveInt = 128
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    device: Device = "auto"
    cpu_threads: int = Field(
        0, ge=0, description="torch threads on CPU (also validate's); 0: synthloop/threads.py"
    )
    inception_weights: Path | None = Field(
        None, description="local torchvision inception_v3 weights; standard FID when present"
    )
    input: ResolvedPath = Path("data/clean")
    output: ResolvedPath = Path("models/evaluator")
    report: ResolvedPath = Path("reports/evaluator.json")

    @field_validator("inception_weights")
    @classmethod
    def _weights(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _existing(path, info)


class GateConfig(_Model):
    """Quality gates: the loop promotes synthetic data only when every gate passes.

    The run form (flows/parameters.py) derives its gate fields from these: a new gate is one
    field here (with its bounds and description) and its check in `evaluate_gates`."""

    min_class_consistency: float = Field(
        0.7, ge=0, le=1, description="evaluator agrees with the intended class, at least"
    )
    max_near_copy_rate: float = Field(
        0.1, ge=0, le=1, description="share of samples that nearly copy a real image, at most"
    )
    max_fid_ratio: float = Field(
        10.0,
        gt=0,
        description="synthetic FID over the real train-vs-test floor, both class-matched "
        "(weighted to the train split's class shares), at most",
    )
    min_utility_delta: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="lower bound of the 95% interval of the accuracy gain of baseline+synthetic "
        "over the baseline (short classes when there are any), at least",
    )
    max_memorisation_ratio: float = Field(
        0.05,
        ge=0,
        le=1,
        description="share of samples whose nearest training image is much closer than the "
        "second nearest (pixels or evaluator features, the larger), at most",
    )
    max_membership_auc: float = Field(
        0.65,
        ge=0.5,
        le=1,
        description="membership-inference AUC of the stronger attack (upper 95% bound), at most",
    )


class ValidateConfig(_Model):
    min_confidence: float = Field(
        0.6, ge=0, le=1, description="accept a sample when the evaluator gives its class this much"
    )
    delivery_order: Literal["generated", "hardest"] = Field(
        "generated",
        description="the order the accepted rows are offered to the pool in (a class with "
        "less room takes the first ones): as generated, or hardest first (least evaluator "
        "confidence in the intended class, every one above min_confidence)",
    )
    near_copy_percentile: float = Field(5.0, gt=0, lt=100)
    k: PositiveInt = Field(5, description="neighbours for precision/recall/density/coverage")
    utility_steps: PositiveInt = Field(
        200, description="optimizer steps of each utility classifier, whatever its data size"
    )
    utility_seeds: int = Field(
        5, ge=2, description="paired seeds of the utility arms (2 at least: an interval needs 2)"
    )
    utility_synthetic_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="at most this share of a class's draws go to its synthetic rows in the "
        "synthetic arm, so a few real images are not drowned out (1: every row alike)",
    )
    utility_workers: int = Field(
        0,
        ge=0,
        description="processes training the utility classifiers; 0: one per usable CPU on "
        "the CPU when the trainings are long enough to pay a worker's start, else 1",
    )
    short_class_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a class with fewer real train images than this share of the largest "
        "class is short: the utility gate reads the short classes when there are any",
    )
    utility_max_points_per_test_image: float = Field(
        5.0,
        gt=0,
        le=100,
        description="the decisive classes' test split resolves a gain only when one of its "
        "images is worth at most this many points of their accuracy (100 / test images, so "
        "5 asks for 20 images); a smaller one gives the verdict `no evidence` and says so",
    )
    memorisation_distance_ratio: float = Field(
        0.3333,
        gt=0,
        lt=1,
        description="a sample is memorised when its nearest training image is closer than "
        "this share of the distance to the second nearest",
    )
    privacy_bootstrap: int = Field(
        1000, ge=100, description="bootstrap resamples of the privacy figures' 95% intervals"
    )
    density_dims: PositiveInt = Field(
        8, description="principal axes of the evaluator features for the density attack"
    )
    batch_size: PositiveInt = 256
    shard_rows: PositiveInt = Field(
        8192, description="images per feature shard (rounded up to a multiple of batch_size)"
    )
    seed: int = 0
    device: Device = "auto"
    gates: GateConfig = GateConfig()
    synthetic: ResolvedPath = Path("data/synthetic")
    clean: ResolvedPath = Path("data/clean")
    evaluator: ResolvedPath = Path("models/evaluator")
    accepted: ResolvedPath = Path("data/accepted")
    report: ResolvedPath = Path("reports/validation.json")

    @model_validator(mode="before")
    @classmethod
    def _no_utility_balanced(cls, data: Any) -> Any:
        return _refuse_removed(
            data,
            "utility_balanced",
            "the utility baseline is the best on val of {real, real+aug} x "
            "{class-balanced draws, logit-adjusted loss} (tasks/validate/utility_protocol.py)",
        )


class LoopConfig(_Model):
    """The flow's rounds: promote while gates pass, retrain by policy when they fail."""

    max_rounds: PositiveInt = 2
    max_retrains: int = Field(2, ge=0)
    target_per_class: TargetRule = Field(
        "proportional",
        description="a class stops growing in the pool, and fuse mixes in, at most this "
        "many synthetic rows of it; auto: its gap to the largest class, at most "
        "synthetic_multiple times its real train rows (the largest class gets none); "
        "proportional: synthetic_multiple times its real train rows, every class alike; "
        "null: no per-class bound. The run ends once every class is there",
    )
    synthetic_multiple: float = Field(
        1.0,
        gt=0,
        description="target_per_class auto or proportional: a class gets at most this many "
        "synthetic rows per real train row (1: synthetic rows never outnumber a class's "
        "real ones)",
    )
    max_pool_rows: PositiveInt | None = Field(
        50_000, description="the pool as a whole stops growing at this many rows"
    )
    refresh_share: float = Field(
        0.25,
        ge=0,
        le=1,
        description="a class at its target is refreshed: up to this share of its target "
        "(rounded up) of its oldest pooled rows are replaced by new accepted rows when the "
        "replaced set scores at least as well as the pool it replaces (same seeds); the old "
        "rows are retired, restorable; 0: a full class stays as it is",
    )
    families: list[FamilyName] = Field(
        default_factory=list,
        description="bake-off: each round's first attempt trains every listed family on the "
        "same fused data, validates each the same way and keeps the one whose samples help "
        "most; empty: train.family alone",
    )
    retrain: Literal["auto"] | list[dict[str, dict[str, Any]]] = Field(
        "auto",
        description="auto: each retrain changes what the failed attempt's evidence points "
        "at (flows/retrain.py); or a list of param overrides by stage, one per retrain "
        "attempt (the last one repeats)",
    )
    retrain_max_steps: PositiveInt = Field(
        6000, description="auto retrain: train.steps is doubled at most up to this"
    )
    overfit_sign: float = Field(
        0.6,
        ge=0,
        le=1,
        description="auto retrain: the discriminator overfits when the mean sign of its "
        "output on real training images exceeds this (ADA's r_t)",
    )
    drift_threshold: float = Field(
        50.0, ge=0, description="evaluator-space FID between old and new clean train data"
    )
    pool: ResolvedPath = Path("data/pool")
    report: ResolvedPath = Path("reports/loop.json")

    @field_validator("families")
    @classmethod
    def _a_real_bakeoff(cls, families: list[str]) -> list[str]:
        if len(set(families)) != len(families):
            raise ValueError(f"lists a family twice: {families}")
        if len(families) == 1:
            raise ValueError(
                f"a bake-off needs two families or more, got {families}; to train one "
                "family set train.family and leave loop.families empty"
            )
        return families


class OrchestrationConfig(_Model):
    """How the flow runs: the task runner for sharded stages and the workspace lock."""

    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="threads: in the flow's process; dask: a Dask cluster"
    )
    max_workers: PositiveInt = Field(2, description="threads, or local Dask workers")
    dask_address: str | None = Field(
        None, description="scheduler address of a running Dask cluster; null: start a local one"
    )
    lock_timeout_s: float = Field(
        0, ge=0, description="wait this long for another run's workspace lock, then refuse"
    )


class ScheduleConfig(_Model):
    """The `closed-loop/nightly` deployment's schedule, the one source of it: `synthloop
    serve` and `prefect deploy` (prefect.yaml) both read it (flows/deployments.py)."""

    cron: str = Field("0 2 * * *", description="5-field cron expression of the nightly runs")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str) -> str:
        if len(cron.split()) != 5:
            raise ValueError(f"a cron expression has 5 fields, got {cron!r}")
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r}") from None
        return zone


class VersioningConfig(_Model):
    """What a successful run records: a git commit of the versions, a DVC push."""

    git_branch: str | None = Field(
        "synthloop/runs", description="branch that gets one commit per run; null: no commit"
    )
    dvc_push: bool = Field(True, description="push to the default DVC remote when one is set")
    state: ResolvedPath = Field(
        Path("reports/run_state.json"), description="inputs of the last run"
    )


class Params(_Model):
    ingest: IngestConfig
    clean: CleanConfig = Field(default_factory=dict)  # validated: paths resolve
    augment: AugmentConfig = Field(default_factory=dict)  # validated: paths resolve
    fuse: FuseConfig = Field(default_factory=dict)  # validated: paths resolve
    train: TrainConfig = Field(default_factory=dict)  # validated: paths resolve
    generate: GenerateConfig = Field(default_factory=dict)  # validated: paths resolve
    train_evaluator: EvaluatorConfig = Field(default_factory=dict)  # validated: paths resolve
    # `validate` in params.yaml; renamed here because BaseModel.validate exists.
    validation: ValidateConfig = Field(default_factory=dict, alias="validate")
    loop: LoopConfig = Field(default_factory=dict)  # validated: paths resolve
    orchestration: OrchestrationConfig = OrchestrationConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    versioning: VersioningConfig = Field(default_factory=dict)  # validated: paths resolve


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration ({err.error_count()} problem(s))"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if p not in {"function-after[_existing()]"})
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_params(
    raw: dict[str, Any], root: Path, origin: str = PARAMS_FILE, check_paths: bool = True
) -> Params:
    """Validate a params mapping; relative paths resolve against `root`. A source outside
    `ingest.allowed_roots` is refused first."""
    try:
        check_allowed_roots(raw, Path(root))
    except ValueError as err:
        raise ConfigError(f"{origin}: invalid configuration (1 problem(s))\n  {err}") from None
    try:
        return Params.model_validate(raw, context={"root": root, "check_paths": check_paths})
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def load_params(path: Path | str = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate params.yaml, with optional per-run overrides merged in (deeply)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of stage -> settings")
    return parse_params(
        deep_merge(raw, overrides or {}), root=path.resolve().parent, origin=str(path)
    )


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied key by key, recursing into mappings."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
