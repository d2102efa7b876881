"""The pool under DVC: rename legacy shards, adopt orphans, retire shards, reset, show.

`tasks/shared/pool.py` owns the shards' contents; this module owns their DVC records (a new
shard is versioned with `flows.loop.dvc_add`). Every change goes through DVC (`dvc add`,
`dvc move`, `dvc remove`), so `.dvc` files, DVC's
`.gitignore` entries and the cache stay in step, and git keeps the history: a retired
shard's old `.dvc` file is in the run branch's earlier commits, and its data in the DVC
cache and remote. Callers hold the workspace lock (the flow does; so does `synthloop pool`).
The flow retires shards itself (`retire_shards`) when the real data moved beyond
`loop.drift_threshold` (flows/attempt.py).
"""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import yaml

from flows.loop import dvc_add, run_dvc
from tasks.shared.pool import RETIRED, describe_pool, is_pool_shard, legacy_name, pool_orphans


def migrate_legacy_names(workspace: Path, pool: Path) -> dict[str, str]:
    """Rename `part-rNNNN.parquet` shards (and their `.dvc` files) to the current scheme with
    `dvc move`; returns {old: new}. Shards DVC does not track are renamed in place."""
    renamed = {}
    for folder in (pool, pool / RETIRED):
        if not folder.is_dir():
            continue
        for shard in sorted(folder.glob("part-r*.parquet")):
            new = legacy_name(shard.name)
            if new is None:
                continue
            if Path(f"{shard}.dvc").is_file():
                run_dvc(workspace, "move", _rel(workspace, shard), _rel(workspace, folder / new))
            else:
                shard.rename(folder / new)
            renamed[shard.name] = new
    return renamed


def adopt_orphans(workspace: Path, pool: Path) -> dict[str, str]:
    """Settle what a promotion killed before `dvc add` left in the pool; returns
    {name: what was done}.

    A shard at its final name is complete (it was renamed into place), and its rows passed
    the gates: it is versioned with `dvc add` as the promotion would have done. A leftover
    temporary is incomplete by definition: removed. A file at a shard's name that does not
    read as a pool shard was not written by a promotion: renamed to `<name>.rejected`, so
    fuse stops reading it and nothing is deleted.
    """
    done = {}
    for path in pool_orphans(pool):
        if path.name.startswith("."):
            path.unlink(missing_ok=True)
            done[path.name] = "removed: a temporary of an interrupted promotion"
        elif is_pool_shard(path):
            dvc_add(workspace, path)
            done[path.name] = "adopted: written by a promotion interrupted before `dvc add`"
        else:
            path.rename(path.with_name(f"{path.name}.rejected"))
            done[path.name] = f"renamed to {path.name}.rejected: not a readable pool shard"
    return done


def retire_shard(workspace: Path, pool: Path, name: str, reason: str) -> Path:
    """Move a live shard into `retired/` (fuse stops reading it), with the reason and time
    in its `.dvc` file's `meta`. Its rows stay known, so they are never promoted again."""
    shard = pool / name
    if not shard.is_file():
        live = ", ".join(e["shard"] for e in describe_pool(pool) if not e["retired"]) or "none"
        raise FileNotFoundError(f"{shard}: no such live pool shard (live shards: {live})")
    if not reason.strip():
        raise ValueError("a retired shard needs a reason (--reason)")
    target = pool / RETIRED / name
    target.parent.mkdir(exist_ok=True)
    if Path(f"{shard}.dvc").is_file():
        run_dvc(workspace, "move", _rel(workspace, shard), _rel(workspace, target))
        record = Path(f"{target}.dvc")
        data = yaml.safe_load(record.read_text())
        data["meta"] = {
            **(data.get("meta") or {}),
            "retired": {"reason": reason, "at": datetime.now(UTC).isoformat(timespec="seconds")},
        }
        record.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        shard.rename(target)
    return target


def retire_shards(workspace: Path, pool: Path, names: list[str], reason: str) -> dict:
    """Retire live shards with one reason, each as `retire_shard` does (restorable: `dvc
    move` it back); returns the shards and their rows, in all and per class."""
    live = {e["shard"]: e for e in describe_pool(pool) if not e["retired"]}
    per_class: Counter[str] = Counter()
    for name in names:
        retire_shard(workspace, pool, name, reason)
        per_class.update(live[name]["per_class"])
    return {
        "shards": list(names),
        "rows": per_class.total(),
        "per_class": dict(sorted(per_class.items())),
    }


def forget_shard(workspace: Path, shard: Path) -> None:
    """Stop tracking a shard a refresh emptied (its rows now live in `retired/`): `dvc
    remove` its record; git's history and the DVC cache keep the old version."""
    if Path(f"{shard}.dvc").is_file():
        run_dvc(workspace, "remove", _rel(workspace, Path(f"{shard}.dvc")))
    shard.unlink(missing_ok=True)


def reset_pool(workspace: Path, pool: Path) -> list[str]:
    """Remove every shard, live and retired, and its DVC record; returns the removed names.

    The DVC cache and remote keep the data and git keeps the old `.dvc` files, so a reset
    pool can still be restored from an earlier run's commit."""
    removed = []
    for folder in (pool, pool / RETIRED):
        if not folder.is_dir():
            continue
        for record in sorted(folder.glob("part-*.parquet.dvc")):
            run_dvc(workspace, "remove", _rel(workspace, record))
        for shard in sorted(folder.glob("part-*.parquet")):
            shard.unlink()
            removed.append(shard.name)
    shutil.rmtree(pool / RETIRED, ignore_errors=True)
    return removed


def pool_table(pool: Path) -> str:
    """The pool per class, per run and per family, as text for a terminal."""
    entries = describe_pool(pool)
    if not entries:
        return f"{pool}: empty"
    live = [e for e in entries if not e["retired"]]
    per_class = sum((Counter(e["per_class"]) for e in live), Counter())
    per_run, per_family = Counter(), Counter()
    for e in live:
        per_run[str(e["run"])] += e["rows"]
        per_family[str(e["family"])] += e["rows"]
    lines = [f"{pool}: {per_class.total()} rows in {len(live)} live shard(s)", ""]
    for title, counts in (
        ("class", dict(sorted(per_class.items()))),
        ("run", per_run),
        ("family", per_family),
    ):
        lines += [f"per {title}:", *(f"  {k:<28} {v:>8}" for k, v in counts.items()), ""]
    lines.append("shards:")
    for e in entries:
        state = "retired" if e["retired"] else "live"
        lines.append(
            f"  {e['shard']:<48} {state:<8} rows {e['rows']:>6}  round {e['round']}  {e['family']}"
        )
    return "\n".join(lines)


def _rel(workspace: Path, path: Path) -> str:
    return str(path.resolve().relative_to(workspace.resolve()))
