"""The closed-loop flow's run parameters: what the Prefect UI shows as a form.

Everything is optional: a field left empty keeps params.yaml's value. Types and ranges are
part of the JSON schema Prefect stores with a deployment, so the server rejects a bad value
(a negative round count, an unknown family) before a run is created. What only the
workspace can judge (does this folder exist? is it inside `ingest.allowed_roots`?) is
checked when the run starts, before it writes anything. Nothing here can move a run to
another workspace (the deployment fixes `params_path`, flows/binding.py) or widen the roots
a source may be read from (they are set in params.yaml only).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from synthloop.config import FamilyName, GateConfig


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceParameter(_Form):
    """One ingest source; the same keys as params.yaml's `ingest.sources` entries."""

    kind: Literal["image_folder", "manifest", "torchvision", "demo"] = Field(
        description="image_folder: one sub-folder per class; manifest: a path,label table; "
        "torchvision: a dataset under a local root; demo: the embedded digits"
    )
    path: str | None = Field(
        None, description="image_folder / manifest: path inside ingest.allowed_roots (data/raw)"
    )
    dataset: str | None = Field(None, description="torchvision: class name, e.g. MNIST")
    root: str | None = Field(
        None, description="torchvision: local dataset root inside ingest.allowed_roots"
    )
    seed: int | None = Field(None, description="demo: seed of the injected defects")
    name: str | None = Field(None, description="a name for reports (default: from the path)")


def _optional_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Each field of `model` as an optional form field: the same type, bounds and
    description, default None (keep params.yaml's value)."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        field = FieldInfo.merge_field_infos(info, default=None)
        fields[name] = (info.annotation | None, field)
    return fields


GateParameters = create_model(
    "GateParameters",
    __base__=_Form,
    __doc__="Quality gates for this run; empty keeps params.yaml's `validate.gates`.",
    __module__=__name__,
    **_optional_fields(GateConfig),
)


class RunParameters(_Form):
    """Per-run settings of the closed loop. They are written into params.yaml for the run
    (as `dvc exp run --set-param` does), so DVC sees them and the run's commit records them."""

    sources: list[SourceParameter] | None = Field(
        None, description="ingest sources for this run (replace params.yaml's list)"
    )
    max_rounds: int | None = Field(None, ge=1, le=50, description="rounds of the loop, at most")
    family: FamilyName | None = Field(None, description="generator family")
    families: list[FamilyName] | None = Field(
        None,
        description="bake-off: train each of these families and keep the one that helps "
        "most (loop.families; an empty list switches the bake-off off)",
    )
    gates: GateParameters = Field(default_factory=GateParameters, description="quality gates")
    dry_run: bool = Field(
        False, description="only report what would run (stale stages, changed params)"
    )
    force: bool = Field(False, description="rerun every stage, even if DVC finds it unchanged")

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The params.yaml overrides, by stage, that this run asks for."""
        found: dict[str, dict[str, Any]] = {}
        if self.sources is not None:
            found["ingest"] = {"sources": [s.model_dump(exclude_none=True) for s in self.sources]}
        if self.max_rounds is not None:
            found.setdefault("loop", {})["max_rounds"] = self.max_rounds
        if self.families is not None:
            found.setdefault("loop", {})["families"] = self.families
        if self.family is not None:
            found["train"] = {"family": self.family}
        gates = self.gates.model_dump(exclude_none=True)
        if gates:
            found["validate"] = {"gates": gates}
        return found
