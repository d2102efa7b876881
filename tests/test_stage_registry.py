"""The stage list has one owner (tasks/stages.py), dvc.yaml's code deps are exactly the code
each stage runs, and the layers import one way."""

import json
from pathlib import Path

import pytest
import yaml

from synthloop.codegraph import PACKAGES, ROOT, direct_imports, import_closure, module_file
from tasks.stages import STAGE_ORDER, STAGES, is_sharded, stage_code, stage_module
from tests.conftest import REPO, run_tool


def dvc_stages(path: Path = REPO / "dvc.yaml") -> dict:
    return yaml.safe_load(path.read_text())["stages"]


def dep_path(dep: object) -> str:
    return next(iter(dep)) if isinstance(dep, dict) else str(dep)


def code_dep_problems(name: str, stage: dict, root: Path = REPO) -> list[str]:
    """What is wrong with one dvc.yaml stage's code deps: a file the stage runs but DVC does
    not watch, one DVC watches that the stage does not run, or a whole package as a dep."""
    files: set[str] = set()
    problems = []
    for dep in map(dep_path, stage.get("deps", [])):
        if dep.split("/")[0] not in PACKAGES:
            continue
        path = root / dep
        if path.is_dir():
            if "/" not in dep.rstrip("/"):
                problems.append(f"{name}: depends on the whole package {dep}/")
            files |= {
                p.relative_to(root).as_posix() for p in path.rglob("*.py") if p.stat().st_size
            }
        else:
            files.add(dep)
    needed = set(stage_code(name))
    problems += [f"{name}: runs {f} but dvc.yaml does not list it" for f in sorted(needed - files)]
    problems += [f"{name}: lists {f}, which it does not run" for f in sorted(files - needed)]
    return problems


def test_dvc_yaml_declares_the_registry_stages_in_order_with_the_stage_command():
    stages = dvc_stages()
    assert tuple(stages) == STAGE_ORDER == tuple(STAGES)
    assert {n: s["cmd"] for n, s in stages.items()} == {n: f"synthloop stage {n}" for n in STAGES}


@pytest.mark.parametrize("name", STAGE_ORDER)
def test_each_stage_depends_on_exactly_the_code_it_runs(name):
    problems = code_dep_problems(name, dvc_stages()[name])
    assert not problems, "\n".join(problems) + f"\nits code deps: {stage_code(name)}"


def test_the_dependency_check_fails_on_a_missing_file_an_extra_one_and_a_package():
    stage = dvc_stages()["validate"]
    deps = [dep_path(d) for d in stage["deps"]]
    missing = {"deps": [d for d in deps if d != "tasks/validate/utility_protocol.py"]}
    assert code_dep_problems("validate", missing) == [
        "validate: runs tasks/validate/utility_protocol.py but dvc.yaml does not list it"
    ]
    extra = {"deps": [*deps, "tasks/train/stage.py"]}
    assert code_dep_problems("validate", extra) == [
        "validate: lists tasks/train/stage.py, which it does not run"
    ]
    package = code_dep_problems("validate", {"deps": ["tasks"]})
    assert package[0] == "validate: depends on the whole package tasks/"


def test_the_closure_follows_lazy_imports_but_not_module_names_in_strings():
    # The command line imports the flow inside a function: still part of what it runs.
    assert "flows.closed_loop" in import_closure("cli.main")
    assert {"tasks.validate.utility_protocol", "tasks.validate.online_augment"} <= set(
        import_closure("tasks.validate.stage")
    )
    # The registry names stage modules only as strings: it pulls in no stage (the sharding
    # core it runs sharded stages with is not one).
    assert import_closure("tasks.stages") == (
        "synthloop",
        "synthloop.codegraph",
        "synthloop.config",
        "synthloop.dataset",
        "synthloop.sharding",
        "tasks",
        "tasks.stages",
    )
    # A package's __init__ runs before its submodule: it is part of the closure.
    assert "tasks.shared.generators" in import_closure("tasks.shared.generators.cgan")


def _project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_layers_point_one_way_and_nothing_imports_in_a_cycle():
    """core (synthloop/) <- stages (tasks/) <- flows (flows/) <- command line (cli/)."""
    rank = {"synthloop": 0, "tasks": 1, "flows": 2, "cli": 3}
    assert set(rank) == set(PACKAGES)
    modules = _project_modules()
    upward = [
        f"{m} imports {d}"
        for m in modules
        for d in direct_imports(m)
        if rank[d.split(".")[0]] > rank[m.split(".")[0]]
    ]
    assert not upward, "\n".join(upward)

    graph = {m: set(direct_imports(m)) for m in modules}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for child in sorted(graph[module]):
            visit(child, [*path, module])
        done.add(module)

    for module in modules:
        visit(module, [])


# The stage packages under tasks/ (tasks/<package>/), by stage name; every other package
# there is tasks/shared/, what several stages use.
STAGE_PACKAGES = {name: name.removeprefix("train_") for name in STAGES}
SHARED = "shared"


@pytest.mark.parametrize("name", STAGE_ORDER)
def test_each_stage_lives_in_its_own_package_beside_the_module_that_registers_it(name):
    package = ROOT / "tasks" / STAGE_PACKAGES[name]
    assert (package / "__init__.py").is_file(), f"{name}: no package {package}"
    module = STAGES[name]
    assert module.startswith(f"tasks.{STAGE_PACKAGES[name]}."), (
        f"{name}: registered by {module}, outside tasks/{STAGE_PACKAGES[name]}/"
    )
    assert module_file(module).parent == package
    defined = vars(stage_module(name))
    assert "run_stage" in defined or "SHARDING" in defined, (
        f"{module} defines neither run_stage nor SHARDING"
    )


def test_tasks_holds_the_stage_packages_the_shared_package_and_the_registry_only():
    tasks = ROOT / "tasks"
    packages = {p.name for p in tasks.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {*STAGE_PACKAGES.values(), SHARED}
    modules = {p.name for p in tasks.glob("*.py")}
    assert modules == {"__init__.py", "stages.py"}


def test_a_stage_imports_no_other_stage_and_shared_code_imports_no_stage():
    owner = {f"tasks.{package}": name for name, package in STAGE_PACKAGES.items()}

    def stage_of(module: str) -> str | None:
        return owner.get(".".join(module.split(".")[:2]))

    crossing = [
        f"{m} imports {d}"
        for m in _project_modules()
        if m.startswith("tasks.")
        for d in direct_imports(m)
        if stage_of(d) is not None and stage_of(d) != stage_of(m)
    ]
    assert not crossing, "\n".join(crossing)


def test_sharded_stages_are_the_ones_with_a_sharding_spec():
    sharded = [s for s in STAGES if is_sharded(s)]
    assert sharded == ["ingest", "clean", "augment", "validate"]


def _placeholder_outputs(ws: Path) -> None:
    """Stand-in files or folders for every stage output (and data dep), so `dvc commit`
    can record a lock without running the pipeline."""
    for stage in dvc_stages(ws / "dvc.yaml").values():
        for key in ("outs", "metrics", "plots", "deps"):
            for out in map(dep_path, stage.get(key, [])):
                path = ws / out
                if path.exists():
                    continue
                if Path(out).suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}" if path.suffix == ".json" else "x")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("x")


def _changed_stages(ws: Path) -> set[str]:
    status = json.loads(run_tool("dvc", "status", "--json", cwd=ws).stdout or "{}")
    return {name.split(":")[-1] for name in status}


@pytest.mark.integration
@pytest.mark.parametrize(
    "changed", ["tasks/shared/feedback.py", "synthloop/config.py", "tasks/shared/images.py"]
)
def test_changing_code_a_stage_runs_makes_dvc_report_exactly_those_stages(workspace, changed):
    ws = workspace
    _placeholder_outputs(ws)
    run_tool("dvc", "commit", "-f", "-q", cwd=ws)
    assert _changed_stages(ws) == set()
    with (ws / changed).open("a") as source:
        source.write("\n# changed\n")
    expected = {name for name in STAGES if changed in stage_code(name)}
    assert expected  # every file here is run by some stage
    assert _changed_stages(ws) == expected


def test_the_family_names_are_the_registry_families():
    from synthloop.config import FAMILY_NAMES
    from tasks.shared.generators import FAMILIES

    assert tuple(FAMILIES) == FAMILY_NAMES
