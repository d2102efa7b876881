"""Which project source files a module runs: its import closure, read from the source.

`import_closure("tasks.validate.stage")` is every project module that
`tasks.validate.stage` imports, directly or through another project module, at the top of a file or
inside a function (lazy imports run too). Only this project's packages count (`PACKAGES`);
third-party code is pinned by uv.lock instead.

Two facts derive from it, so neither can drift from the code:
- a DVC stage's code deps: `tasks.stages.stage_code(name)`, checked against dvc.yaml by
  tests/test_stage_registry.py, so `dvc status` reports a stage whose code changed;
- a shard's cache key (synthloop/sharding.py): a changed line in any module a shard runs is
  a new key.

Imports are read with `ast`, never executed, so the closure is cheap and has no side
effects. Modules named only by a string (importlib) are not followed: name them as roots.
"""

from __future__ import annotations

import ast
import threading
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root, where PACKAGES live
PACKAGES = ("synthloop", "tasks", "flows", "cli")


def module_file(name: str) -> Path:
    """The source file of a project module (a package's `__init__.py`)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise ModuleNotFoundError(f"{name}: no {base}.py or {base}/__init__.py in {ROOT}")


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _exists(name: str) -> bool:
    try:
        module_file(name)
    except ModuleNotFoundError:
        return False
    return True


def _parents(name: str) -> list[str]:
    """Packages Python imports before `name` (their `__init__` runs): a.b.c -> a, a.b."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def direct_imports(name: str) -> frozenset[str]:
    """Project modules named by `name`'s import statements, anywhere in its source."""
    path = module_file(name)
    stat = path.stat()
    return _imports(name, path, stat.st_mtime_ns, stat.st_size)


@cache  # keyed on the file's stat: an edited file is read again, even in a long-lived process
def _imports(name: str, path: Path, _mtime_ns: int, _size: int) -> frozenset[str]:
    with _PARSING:  # shard keys are computed on task-runner threads
        return _parse_imports(name, path)


# CPython 3.11's parser is not safe to enter from two threads at once ("AST constructor
# recursion depth mismatch"); parsing is rare (cached per file), so one lock costs nothing.
_PARSING = threading.Lock()


def _parse_imports(name: str, path: Path) -> frozenset[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            # `from pkg import mod` imports the submodule pkg.mod when there is one.
            found.update(f"{base}.{a.name}" for a in node.names if _exists(f"{base}.{a.name}"))
    return frozenset(m for m in found if m and m != name and _is_project(m) and _exists(m))


def import_closure(*roots: str) -> tuple[str, ...]:
    """The roots and every project module they import, transitively, with the packages
    whose `__init__` Python runs on the way; sorted."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(p for p in _parents(name) if _exists(p))
            todo.extend(direct_imports(name) - seen)
    return tuple(sorted(seen))


def source_files(modules: tuple[str, ...]) -> list[str]:
    """The modules' files, relative to the project root, in POSIX form (as dvc.yaml names
    them). Empty package `__init__.py` files carry no code and are left out."""
    files = (module_file(m) for m in modules)
    return sorted(p.relative_to(ROOT).as_posix() for p in files if p.stat().st_size)
