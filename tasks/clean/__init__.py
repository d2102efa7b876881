"""Clean: decode-verify, relabel, convert, de-duplicate and split the ingested images.

Rules, in the order a row meets them (its first failure is its quarantine reason):
  label_not_allowed   label (after clean.label_map) outside the clean.labels allow-list
  zero_byte           an empty file
  not_an_image        no image format recognised
  too_many_pixels     header dimensions over clean.max_pixels (checked before decoding)
  truncated           the decoder failed part-way (truncated or corrupt data)
  blank               near-constant pixels (std below clean.blank_std)
  conflicting_labels  identical pixels under different labels: every copy goes
  exact_duplicate     identical pixels (after conversion) as a kept row
  near_duplicate      dHash within clean.near_duplicate_distance bits of a kept row, or of
                      its crop key (its dHash once cropped a pixel or so a side; the
                      candidates), confirmed on grey thumbnails of side
                      min(clean.near_duplicate_size, clean.image_size), each
                      standardised (mean removed, divided by its pixel std): mean absolute
                      difference within clean.near_duplicate_difference (plain, or blurred
                      and aligned for a crop of a few pixels), pixel stds within a ratio
                      of clean.near_duplicate_contrast, from 24 px no 3x3 window
                      differing by over clean.near_duplicate_local, and for RGB colour
                      planes that agree (tasks/clean/near_duplicates.py; relative, so sparse
                      images such as handwriting are judged on their strokes, not on
                      their white background)

Two passes keep memory bounded: pass 1 streams the ingested shards, decodes each image
once, writes the converted PNG to a staging area and keeps only a few numbers per row;
the duplicate and split decisions are made on those numbers; pass 2 streams the staged
rows into `train/`, `val/` and `test/`. Pass 2 also keeps the PNGs of the first
clean.near_duplicate_sheet_pairs near-duplicates (by removed id) and their keepers, for the
sheet at clean.near_duplicate_sheet (reports/near_duplicates.png): each removed image
beside the kept image it matched.

The package, in the order a row goes through it (each module states its own contract):
  rules.py    the rules above, per image, vectorised, and the whole-dataset duplicate rules
  hashing.py  pixel hashes, dHashes and thumbnails: what duplicates are compared by
  image_numbers.py  the dHashes and thumbnails themselves, per image and batched
  candidates.py  near-duplicate candidates: dHashes within a few bits
  near_duplicates.py  the near-duplicate rule's contract, its confirmation and survivors
  alignment.py  the confirmation's blurred, aligned comparison
  sheet.py    the near-duplicate sheet
  splits.py   the seeded, stratified train/val/test assignment
  decode.py   pass 1 on a batch of rows: rules, conversion, staging, numbers
  workers.py  the decode worker processes, the Great Expectations import beside them, and
              the Arrow allocator clean's processes use
  stage.py    the sharded stage (plan, one shard's pass 1, a run's shared pool): `SHARDING`,
              `run_stage(params)` (what tasks/stages.py runs) and `run_clean(cfg)`
  merge.py    the merge, in named steps: gather, decide, route, conclude
  route.py    pass 2: the staged rows into the split folders
  quarantine.py  the quarantine file, written as its rows come
  report.py   reports/clean.json, the near-duplicate sheet, the expectations

Sizes (BATCH_ROWS, POOL_MIN_ROWS, ...) are not re-exported here: each is read where it is
imported, so a test that changes one sets it in the modules that use it.
"""

from tasks.clean.decode import DecodedChunk, StagedBatch, decode_chunk, stage_batch
from tasks.clean.hashing import pixel_hash
from tasks.clean.report import nothing_kept_message
from tasks.clean.rules import (
    Converted,
    Rejection,
    convert_image,
    is_blank,
    map_label,
    resolve_duplicates,
)
from tasks.clean.splits import SPLITS, assign_splits, split_keys
from tasks.clean.stage import SHARDING, StageRun, run_clean, run_stage
from tasks.clean.workers import decode_workers

__all__ = [
    "SHARDING",
    "SPLITS",
    "Converted",
    "DecodedChunk",
    "Rejection",
    "StageRun",
    "StagedBatch",
    "assign_splits",
    "convert_image",
    "decode_chunk",
    "decode_workers",
    "is_blank",
    "map_label",
    "nothing_kept_message",
    "pixel_hash",
    "resolve_duplicates",
    "run_clean",
    "run_stage",
    "split_keys",
    "stage_batch",
]
