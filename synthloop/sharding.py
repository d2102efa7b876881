"""Sharded stages: plan -> shard -> merge, with a content-addressed cache of shard results.

A sharded stage splits its work into `Shard`s (a deterministic plan from the stage's params
and inputs), computes each shard into a folder of its own, and merges the folders, in shard
order, into exactly the stage's outputs. So the outputs do not depend on where, or in what
order, the shards were computed.

Shard results are cached under `<workspace>/.synthloop/shards/<stage>/<key>/`. The key hashes
everything a result depends on: the shard's inputs (`Shard.fingerprint`), the stage's params
and the source of every project module the shard's code imports (synthloop/codegraph.py), so
a changed input, param or line of code never reuses a stale result. The Prefect flow can
therefore compute shards beforehand, anywhere that sees the workspace (`flows/sharded.py`),
and `synthloop stage NAME`, which DVC runs, merges them, computing inline any shard it does
not find. DVC stays the authority on what is stale and versions what the merge writes; the
merge consumes the cache.

A stage module opts in with a module-level `SHARDING = StageSpec(...)` (tasks/stages.py finds
it there); the registry runs it as `run_inline(SHARDING, params)`, and its plain
`run_<stage>(cfg)` is `run_uncached`, the same code without a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic_core import to_jsonable_python

from synthloop.codegraph import import_closure, module_file
from synthloop.config import PARAMS_ENV, Params
from synthloop.dataset import atomic_dir, write_json

log = logging.getLogger(__name__)

CACHE_DIR = Path(".synthloop") / "shards"
DONE_FILE = "shard.json"  # written last (inside the atomic folder): its summary

C = TypeVar("C")


@dataclass(frozen=True)
class Shard:
    """One unit of a stage's work. `work` says what to do (small and picklable: row ranges,
    file references); `fingerprint` digests everything the result depends on besides the
    stage's params and code (file stats, content ids of rows)."""

    stage: str
    index: int
    count: int
    fingerprint: str
    work: Any

    @property
    def name(self) -> str:
        return f"{self.stage} shard {self.index} (of {self.count})"


@dataclass(frozen=True)
class StageSpec(Generic[C]):
    """How a stage shards. `config` picks the stage's params out of all of them (what the
    cache key hashes); `merge` gets the shard folders in shard order. The code a shard's
    result depends on is what `run_shard`'s module imports (`code_digest`)."""

    stage: str
    config: Callable[[Params], C]
    plan: Callable[[C], list[Shard]]
    run_shard: Callable[[C, Shard, Path], dict]
    merge: Callable[[C, list[Path]], dict]


class ShardFailed(RuntimeError):
    """A shard's computation failed; says which stage and shard, and why."""

    def __init__(self, stage: str, index: int, count: int, reason: str) -> None:
        # All four in args, so the exception pickles (back from a Dask worker) unchanged.
        super().__init__(stage, index, count, reason)
        self.stage, self.index, self.count, self.reason = stage, index, count, reason

    def __str__(self) -> str:
        return f"stage {self.stage!r}: shard {self.index} (of {self.count}) failed: {self.reason}"


# --- pure pieces ---------------------------------------------------------------------------


def digest(*parts: object) -> str:
    """A stable hex digest of JSON-able parts (pydantic models and paths included)."""
    text = json.dumps(to_jsonable_python(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def chunks(count: int, size: int) -> list[range]:
    """[0, count) in consecutive ranges of `size` (the last one shorter)."""
    return [range(lo, min(lo + size, count)) for lo in range(0, count, size)]


def code_digest(module: str) -> str:
    """The source of `module` and of every project module it imports: a code change is a
    new key."""
    h = hashlib.blake2b(digest_size=16)
    for name in import_closure(module):
        h.update(name.encode() + b"\0" + module_file(name).read_bytes() + b"\0")
    return h.hexdigest()


def shard_key(spec: StageSpec, config: Any, shard: Shard) -> str:
    code = code_digest(spec.run_shard.__module__)
    return digest(spec.stage, shard.index, shard.count, shard.fingerprint, config, code)


def cache_dir(workspace: Path, stage: str) -> Path:
    return Path(workspace) / CACHE_DIR / stage


# --- the cache ---------------------------------------------------------------------------


def default_workspace() -> Path:
    """The folder of the params file `synthloop stage` loaded (the CLI exports it as
    PARAMS_ENV), else the current folder, where DVC runs stage commands."""
    params = os.environ.get(PARAMS_ENV)
    return Path(params).resolve().parent if params else Path.cwd()


def cached_result(folder: Path) -> dict | None:
    done = folder / DONE_FILE
    return json.loads(done.read_text()) if done.is_file() else None


def compute_shard(
    spec: StageSpec, config: Any, shard: Shard, root: Path, key: str | None = None
) -> tuple[Path, dict, bool]:
    """(folder, summary, reused): the shard's result under `root`, computed unless present.

    The folder appears in one rename once complete, so a killed or failed shard leaves
    nothing a later run could take for a result."""
    folder = Path(root) / (key or shard_key(spec, config, shard))
    summary = cached_result(folder)
    if summary is not None:
        return folder, summary, True
    started = time.perf_counter()
    try:
        with atomic_dir(folder) as tmp:
            summary = spec.run_shard(config, shard, tmp)
            write_json(tmp / DONE_FILE, summary)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        raise ShardFailed(shard.stage, shard.index, shard.count, reason) from err
    log.debug("%s: computed in %.2fs", shard.name, time.perf_counter() - started)
    return folder, summary, False


def run_inline(spec: StageSpec, params: Params, workspace: Path | None = None) -> dict:
    """Run a sharded stage in this process: plan, use the cached shards under `workspace`
    (default: `default_workspace()`), compute the missing ones,
    merge into the stage's outputs, then drop the stage's cache."""
    stage = spec.stage
    config = spec.config(params)
    root = cache_dir(workspace or default_workspace(), stage)
    shards = spec.plan(config)
    folders, reused = [], 0
    for shard in shards:
        folder, _, hit = compute_shard(spec, config, shard, root)
        folders.append(folder)
        reused += hit
    result = spec.merge(config, folders)
    shutil.rmtree(root, ignore_errors=True)  # consumed; older keys are stale by definition
    log.info(
        "%s: %d shard(s), %d from the cache, %d computed here",
        stage,
        len(shards),
        reused,
        len(shards) - reused,
    )
    return result


def run_uncached(spec: StageSpec[C], config: C) -> dict:
    """Plan, compute every shard into a temporary folder, merge: the stage without a cache
    (what the stage functions of the task modules do when called directly)."""
    shards = spec.plan(config)
    with tempfile.TemporaryDirectory(prefix=f"synthloop-{spec.stage}-") as tmp:
        folders = [compute_shard(spec, config, s, Path(tmp), f"{s.index:06d}")[0] for s in shards]
        return spec.merge(config, folders)
