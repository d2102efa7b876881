"""Typed configuration: `params.yaml`, grouped by stage, loaded into validated models.

Every model forbids unknown keys, so a typo stops the run before any work with a message
that names the key. Relative paths resolve against the folder that holds `params.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
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


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names the key and the problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
    root: Path
    train: bool = True
    download: bool = False
    limit: PositiveInt | None = None
    name: str | None = None

    @field_validator("root")
    @classmethod
    def _root(cls, root: Path, info: ValidationInfo) -> Path:
        return _resolve(root, info)

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
    name: str | None = None


Source = Annotated[
    ImageFolderSource | ManifestSource | TorchvisionSource | DemoSource,
    Field(discriminator="kind"),
]


class IngestConfig(_Model):
    sources: list[Source] = Field(min_length=1)
    shard_rows: PositiveInt = 8192
    output: Path = Path("data/ingested")
    quarantine: Path = Path("data/quarantine/ingest.parquet")
    report: Path = Path("reports/ingest.json")

    @field_validator("output", "quarantine", "report")
    @classmethod
    def _out(cls, path: Path, info: ValidationInfo) -> Path:
        return _resolve(path, info)

    @model_validator(mode="after")
    def _unique_names(self) -> IngestConfig:
        names = [source_name(s, i) for i, s in enumerate(self.sources)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self


def source_name(source: Any, index: int) -> str:
    return source.name or f"{source.kind}{index}"


class SplitConfig(_Model):
    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self

    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


class CleanConfig(_Model):
    image_size: PositiveInt = Field(8, description="output images are image_size x image_size")
    channels: Literal[1, 3] = 1
    max_pixels: PositiveInt = Field(
        4096 * 4096, description="decompression-bomb cap: images with more pixels are rejected"
    )
    near_duplicate_distance: int = Field(
        4, ge=0, le=16, description="max Hamming distance between 64-bit dHashes"
    )
    near_duplicate_difference: float = Field(
        3.0, ge=0, le=255, description="max mean absolute difference of 8x8 grey thumbnails"
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
    shard_rows: PositiveInt = 8192
    input: Path = Path("data/ingested")
    output: Path = Path("data/clean")
    quarantine: Path = Path("data/quarantine/clean.parquet")
    report: Path = Path("reports/clean.json")
    data_docs: Path = Path("reports/great_expectations")

    @field_validator("input", "output", "quarantine", "report", "data_docs")
    @classmethod
    def _out(cls, path: Path, info: ValidationInfo) -> Path:
        return _resolve(path, info)


class Params(_Model):
    ingest: IngestConfig
    clean: CleanConfig = CleanConfig()


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
    """Validate a params mapping; relative paths resolve against `root`."""
    try:
        return Params.model_validate(raw, context={"root": root, "check_paths": check_paths})
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def load_params(path: Path | str = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate params.yaml, with optional per-run overrides merged per stage."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of stage -> settings")
    for stage, values in (overrides or {}).items():
        raw[stage] = {**(raw.get(stage) or {}), **values}
    return parse_params(raw, root=path.resolve().parent, origin=str(path))
