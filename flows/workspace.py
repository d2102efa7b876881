"""One workspace, one run at a time; what a run changed; how a run is versioned.

- `WorkspaceLock`: an exclusive lock file, so two runs (a nightly one and a manual one, or a
  `make run` beside them) never write the same workspace at once.
- `input_fingerprint`: everything a run reads (params, raw sources, feedback, pool, code);
  equal to the last successful run's means there is nothing to do.
- `record_run`: one git commit per successful run on a branch of its own, made without
  touching the working tree, the index or the checked-out branch; `dvc_push` sends the
  datasets and models to the DVC remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from flows.loop import run_dvc
from synthloop.config import Params
from synthloop.dataset import file_hash

LOCK_FILE = ".synthloop/workspace.lock"
# Code the stages run: a change here is a reason to run again.
CODE_DIRS = ("synthloop", "tasks", "flows")


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace lock."""


class WorkspaceLock:
    """An exclusive lock on `<workspace>/.synthloop/workspace.lock` (`filelock`: flock on
    POSIX, so the kernel drops it when the holder's process dies and a crashed run never
    leaves the workspace locked).

    The holder writes who it is beside the lock (`workspace.lock.holder`), so a refused run
    can say which run it waited for. flock is per host: a workspace shared by several
    machines over a network file system needs the Prefect concurrency limit instead.
    """

    def __init__(self, workspace: Path, timeout_s: float = 0.0, holder: str = "") -> None:
        self.path = workspace / LOCK_FILE
        self.holder_file = self.path.with_name(self.path.name + ".holder")
        self.timeout_s = timeout_s
        self.holder = holder or f"pid {os.getpid()}"
        # Not thread-local: a flow may release from another thread than the one that took it.
        self._lock = FileLock(self.path, thread_local=False)

    def acquire(self) -> WorkspaceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=self.timeout_s, poll_interval=0.2)
        except Timeout:
            owner = _read(self.holder_file) or "another process"
            raise WorkspaceBusy(
                f"workspace {self.path.parent.parent} is in use by {owner}; this run "
                f"stopped after waiting {self.timeout_s:g} s without changing anything "
                "(orchestration.lock_timeout_s sets the wait)"
            ) from None
        since = datetime.now(UTC).isoformat(timespec="seconds")
        self.holder_file.write_text(
            f"{self.holder} (pid {os.getpid()} on {socket.gethostname()}, since {since})"
        )
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.holder_file.write_text("")
            self._lock.release()

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


# ---------------------------------------------------------------------------- fingerprint


def _tree_entries(root: Path) -> list[str]:
    """`relative path, size, mtime` of every file below root (stat only: cheap for big data)."""
    if root.is_file():
        st = root.stat()
        return [f"{root}:{st.st_size}:{st.st_mtime_ns}"]
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return entries


def _file_digest(path: Path) -> str:
    return file_hash(path) if path.is_file() else ""


def _source_roots(params: Params) -> list[Path]:
    roots = []
    for source in params.ingest.sources:
        if source.kind in ("image_folder", "manifest"):
            # A manifest's rows point into its folder (relative paths resolve there).
            roots.append(source.path if source.kind == "image_folder" else source.path.parent)
        elif source.kind == "torchvision":
            roots.append(source.root)
    return roots


def input_fingerprint(workspace: Path, params_file: Path, params: Params) -> dict[str, str]:
    """Digests of everything a run reads, by part, so a change can be named."""

    def digest(lines: list[str]) -> str:
        return hashlib.blake2b("\n".join(lines).encode(), digest_size=16).hexdigest()

    code = []
    for folder in CODE_DIRS:
        for path in sorted((workspace / folder).rglob("*.py")):
            code.append(f"{path.relative_to(workspace)}:{_file_digest(path)}")
    pool = params.loop.pool
    return {
        "params": _file_digest(params_file),
        "pipeline": _file_digest(workspace / "dvc.yaml"),
        "raw": digest(
            [
                e
                for root in [workspace / "data/raw", *_source_roots(params)]
                if root.exists()
                for e in [str(root), *_tree_entries(root)]
            ]
        ),
        "feedback": digest(
            [
                f"{p.name}:{_file_digest(p)}"
                for p in sorted(params.fuse.feedback.glob("*"))
                if p.is_file()
            ]
            if params.fuse.feedback.is_dir()
            else []
        ),
        "pool": digest(
            [f"{p.name}:{_file_digest(p)}" for p in sorted(pool.glob("*.dvc"))]
            if pool.is_dir()
            else []
        ),
        "code": digest(code),
    }


def changed_inputs(state_file: Path, fingerprint: dict[str, str]) -> list[str] | None:
    """What changed since the last successful run (None: no successful run recorded)."""
    if not state_file.is_file():
        return None
    last = json.loads(state_file.read_text())
    if not last.get("passed"):
        return None
    before = last.get("fingerprint", {})
    return sorted(
        k for k in fingerprint.keys() | before.keys() if before.get(k) != fingerprint.get(k)
    )


# ---------------------------------------------------------------------------- versioning


def _git(workspace: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=workspace, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def git_toplevel(workspace: Path) -> Path | None:
    try:
        return Path(_git(workspace, "rev-parse", "--show-toplevel"))
    except (RuntimeError, FileNotFoundError):
        return None


def versioned_paths(workspace: Path, pool: str = "data/pool") -> tuple[list[str], list[str]]:
    """What git records for a run: the DVC lock and params, the pool's .dvc files, and the
    metrics and plots DVC keeps out of its cache (so `dvc metrics diff` compares runs).
    Returns (files, folders)."""
    paths = ["dvc.yaml", "dvc.lock", "params.yaml"]
    pipeline = yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}
    for stage in pipeline.get("stages", {}).values():
        for kind in ("metrics", "plots", "outs"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    ((path, opts),) = entry.items()
                    if isinstance(opts, dict) and opts.get("cache") is False:
                        paths.append(path)
    paths.append("reports/loop.json")
    files = [p for p in dict.fromkeys(paths) if (workspace / p).is_file()]
    return files, [p for p in (pool,) if (workspace / p).is_dir()]


@dataclass
class RunCommit:
    branch: str
    commit: str
    created: bool


def record_run(
    workspace: Path, branch: str, message: str, pool: str = "data/pool"
) -> RunCommit | None:
    """Commit the run's versioned files on `branch` (None: the workspace is not in git).

    Built with git's plumbing in a private index: the tree is HEAD's (the code that ran)
    plus this run's files; parents are the branch's last run and HEAD, so `git log BRANCH`
    lists the runs and each commit checks out to a state `dvc pull` can restore. The
    working tree, the index and the checked-out branch are left alone.
    """
    top = git_toplevel(workspace)
    if top is None:
        return None
    ref = f"refs/heads/{branch}"
    _git(top, "check-ref-format", ref)
    head = _rev(top, "HEAD")
    previous = _rev(top, ref)
    index = top / ".git" / f"synthloop-index-{os.getpid()}"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    env.setdefault("GIT_AUTHOR_NAME", _git_config(top, "user.name") or "synthloop")
    env.setdefault("GIT_AUTHOR_EMAIL", _git_config(top, "user.email") or "synthloop@localhost")
    env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
    env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    try:
        if head:
            _git(top, "read-tree", head, env=env)
        else:
            _git(top, "read-tree", "--empty", env=env)
        prefix = workspace.resolve().relative_to(top.resolve())
        files, folders = versioned_paths(workspace, pool)
        # Named files even where .gitignore hides them (metrics); folders only what git
        # tracks there (the pool's .dvc files, not the data DVC's .gitignore keeps out).
        if files:
            _git(top, "add", "--force", "--all", "--", *(str(prefix / p) for p in files), env=env)
        if folders:
            _git(top, "add", "--all", "--", *(str(prefix / p) for p in folders), env=env)
        tree = _git(top, "write-tree", env=env)
    finally:
        index.unlink(missing_ok=True)
    if previous and _git(top, "rev-parse", f"{previous}^{{tree}}") == tree:
        return RunCommit(branch, previous, created=False)
    parents = [p for p in dict.fromkeys([previous, head]) if p]
    args = ["commit-tree", tree, "-m", message]
    for parent in parents:
        args += ["-p", parent]
    commit = _git(top, *args, env=env)
    # Compare-and-swap: a concurrent writer of the branch makes this fail, not overwrite.
    _git(top, "update-ref", ref, commit, previous or "0" * 40)
    return RunCommit(branch, commit, created=True)


def _rev(top: Path, ref: str) -> str | None:
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=top,
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() or None


def _git_config(top: Path, key: str) -> str | None:
    proc = subprocess.run(["git", "config", key], cwd=top, capture_output=True, text=True)
    return proc.stdout.strip() or None


def dvc_default_remote(workspace: Path) -> str | None:
    proc = run_dvc(workspace, "remote", "default", check=False)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def dvc_push(workspace: Path) -> str:
    """Push every cached output of the pipeline and every `.dvc`-tracked dataset (raw data,
    the pool) to the default remote; returns DVC's last line ("N files pushed")."""
    lines = run_dvc(workspace, "push").stdout.strip().splitlines()
    return lines[-1] if lines else ""
