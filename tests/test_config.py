from pathlib import Path

import pytest
import yaml

from synthloop.config import ConfigError, load_params, parse_params
from tests.conftest import REPO, small_params


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.ingest.sources[0].kind == "demo"
    assert params.clean.output == REPO / "data/clean"


def test_relative_paths_resolve_against_the_params_folder(tmp_path, shapes_folder):
    params = load_params(write(tmp_path, small_params("shapes")))
    assert params.ingest.sources[0].path == tmp_path / "shapes"
    assert params.clean.report == tmp_path / "reports/clean.json"


@pytest.mark.parametrize(
    ("mutate", "key", "problem"),
    [
        (lambda p: p["clean"].update(image_sise=8), "clean.image_sise", "unknown key"),
        (lambda p: p["clean"].update(image_size=-4), "clean.image_size", "greater than 0"),
        (lambda p: p["clean"].update(channels="rgb"), "clean.channels", "1 or 3"),
        (lambda p: p["clean"].update(max_pixels="lots"), "clean.max_pixels", "integer"),
        (lambda p: p["ingest"]["sources"][0].update(path="nowhere"), "ingest.sources.0", "nowhere"),
        (lambda p: p["ingest"]["sources"][0].update(kind="ftp"), "ingest.sources.0", "kind"),
        (
            lambda p: p["clean"].update(split={"train": 0.5, "val": 0.1, "test": 0.1}),
            "clean.split",
            "must be 1",
        ),
        (
            lambda p: p["clean"].update(
                split={"train": 0.8, "val": 0.1, "test": 0.1, "train_min_share": 1.2}
            ),
            "clean.split.train_min_share",
            "less than or equal to 1",
        ),
        (
            lambda p: p["validate"].update(utility_max_points_per_test_image=0),
            "validate.utility_max_points_per_test_image",
            "greater than 0",
        ),
        (lambda p: p.update(trian={}), "trian", "unknown key"),
    ],
)
def test_bad_values_name_the_key_and_the_problem(tmp_path, shapes_folder, mutate, key, problem):
    params = small_params("shapes")
    mutate(params)
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, params))
    message = str(err.value)
    assert key in message and problem in message, message
    assert str(tmp_path / "params.yaml") in message


def test_missing_path_message_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.sources\.0\.image_folder\.path: path does not"):
        parse_params(small_params("missing/folder"), root=tmp_path)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "params.yaml")


def test_per_run_overrides_merge_per_stage(tmp_path, shapes_folder):
    path = write(tmp_path, small_params("shapes"))
    params = load_params(path, overrides={"clean": {"image_size": 12}})
    assert params.clean.image_size == 12
    assert params.clean.channels == 3  # untouched keys keep their file values


# Keys whose right value depends on the dataset. params.yaml sets them for the embedded
# demo (its labels, its "seven" typo, a split sized for its short classes); the code's
# default is the neutral choice for data it knows nothing about.
DATASET_KEYS = {
    "clean.labels",
    "clean.label_map",
    "clean.split",
    "clean.split_tolerance",
    "clean.min_class_count",
}


def _defaults_against_yaml(model: type, data: dict, prefix: str = "") -> tuple[list, list]:
    """(keys whose code default differs from params.yaml, tunable keys params.yaml lacks).
    Paths are left out: they wire stages together, and dvc.yaml declares them."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    differ, missing = [], []
    for attribute, field in model.model_fields.items():
        name = field.alias or attribute
        key = f"{prefix}{name}"
        if key in DATASET_KEYS or field.annotation in (Path, Path | None):
            continue
        if name not in data:
            missing.append(key)
            continue
        value = data[name]
        if field.default is PydanticUndefined and field.default_factory is None:
            continue  # required: params.yaml is the only owner
        default = field.get_default(call_default_factory=True)
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            sub_differ, sub_missing = _defaults_against_yaml(section, value, f"{key}.")
            differ += sub_differ
            missing += sub_missing
        elif default != value:
            differ.append(f"{key}: code {default!r}, params.yaml {value!r}")
    return differ, missing


def test_params_yaml_holds_every_value_and_the_code_defaults_agree():
    import yaml

    from synthloop.config import Params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    differ, missing = _defaults_against_yaml(Params, raw)
    assert not differ, "\n".join(differ)
    assert not missing, f"only in code, not in params.yaml: {missing}"


def test_the_agreement_check_sees_a_changed_default_and_a_missing_key():
    import yaml

    from synthloop.config import Params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["steps"] += 1
    del raw["augment"]["shard_rows"]
    differ, missing = _defaults_against_yaml(Params, raw)
    assert differ == [f"train.steps: code 1500, params.yaml {1501}"]
    assert missing == ["augment.shard_rows"]


def test_the_run_form_gates_are_derived_from_the_config_gates():
    from flows.parameters import GateParameters
    from synthloop.config import GateConfig

    assert list(GateParameters.model_fields) == list(GateConfig.model_fields)
    form = GateParameters.model_json_schema()
    config = GateConfig.model_json_schema()["properties"]
    assert form["additionalProperties"] is False
    bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    for name, field in form["properties"].items():
        assert field["default"] is None and {"type": "null"} in field["anyOf"], name
        number = next(t for t in field["anyOf"] if t != {"type": "null"})
        assert {k: number.get(k) for k in bounds} == {k: config[name].get(k) for k in bounds}
        assert field["description"] == config[name]["description"], name
    assert GateParameters().model_dump(exclude_none=True) == {}
    with pytest.raises(ValueError):
        GateParameters(max_membership_auc=0.4)  # the config's bound
