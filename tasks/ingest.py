"""Ingest: read every configured source into Parquet shards of raw bytes, unchanged.

Nothing is decoded here (clean does that once); files that cannot even be read go to the
ingest quarantine with their reason. A source that is empty or has a single class stops
the stage: there is nothing to learn a class-conditional model from.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from synthloop.config import IngestConfig, source_name
from synthloop.dataset import (
    INGESTED_SCHEMA,
    QUARANTINE_SCHEMA,
    ShardWriter,
    atomic_dir,
    content_id,
    remove_stale_temporaries,
    write_json,
    write_table,
)
from tasks.sources import Item, Rejected, SourceError, read_source

log = logging.getLogger(__name__)


@dataclass
class SourceSummary:
    items: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    per_class: Counter[str] = field(default_factory=Counter)


def run_ingest(cfg: IngestConfig) -> dict:
    """Read all sources into `cfg.output`; returns the summary also written to `cfg.report`."""
    remove_stale_temporaries(cfg.output)
    quarantine: list[dict] = []
    summaries: dict[str, SourceSummary] = {}
    with atomic_dir(cfg.output) as tmp, ShardWriter(tmp, INGESTED_SCHEMA, cfg.shard_rows) as out:
        for index, source in enumerate(cfg.sources):
            name = source_name(source, index)
            summary = summaries[name] = SourceSummary()
            # Rows go to the writer a block at a time (the same shards as row by row).
            block: dict[str, list] = {"id": [], "label": [], "path": [], "image": []}
            for record in read_source(source):
                if isinstance(record, Rejected):
                    summary.quarantined[record.reason] += 1
                    quarantine.append(
                        {
                            "id": None,
                            "source": name,
                            "path": record.path,
                            "label": record.label,
                            "reason": record.reason,
                            "detail": record.detail,
                        }
                    )
                    continue
                assert isinstance(record, Item)
                summary.items += 1
                summary.per_class[record.label] += 1
                block["id"].append(content_id(record.data))
                block["label"].append(record.label)
                block["path"].append(record.path)
                block["image"].append(record.data)
                if len(block["id"]) >= _BLOCK_ROWS:
                    _write_block(out, block, name)
            _write_block(out, block, name)
            _check_usable(name, source, summary)
    write_table(cfg.quarantine, quarantine, QUARANTINE_SCHEMA)

    result = {
        "ingested": sum(s.items for s in summaries.values()),
        "quarantined": sum(sum(s.quarantined.values()) for s in summaries.values()),
        "sources": {
            name: {
                "items": s.items,
                "classes": len(s.per_class),
                "quarantined": dict(sorted(s.quarantined.items())),
            }
            for name, s in summaries.items()
        },
    }
    write_json(cfg.report, result)
    log.info(
        "ingest: %d items from %d source(s), %d quarantined -> %s",
        result["ingested"],
        len(summaries),
        result["quarantined"],
        cfg.output,
    )
    return result


_BLOCK_ROWS = 1024


def _write_block(out: ShardWriter, block: dict[str, list], source: str) -> None:
    rows = len(block["id"])
    if rows:
        out.extend({**block, "source": [source] * rows}, rows)
        for values in block.values():
            values.clear()


def _check_usable(name: str, source: object, summary: SourceSummary) -> None:
    where = getattr(source, "path", None) or getattr(source, "root", None) or source.kind
    if summary.items == 0:
        rejected = sum(summary.quarantined.values())
        raise SourceError(
            f"source {name!r} ({where}) has no readable files"
            + (f" ({rejected} rejected, see the ingest quarantine)" if rejected else "")
        )
    if len(summary.per_class) < 2:
        only = next(iter(summary.per_class))
        raise SourceError(
            f"source {name!r} ({where}) has one class only ({only!r}); "
            "an image_folder needs one sub-folder per class"
        )
