"""Pass 1's decode worker processes, and the Great Expectations import that runs beside them.

Contract: `DecodePool.stage` yields `stage_batch` of each batch, in batch order, whether it
runs in worker processes or in this one (`workers` <= 1): the results, and the staging files
they write, are the same either way. Memory stays bounded (at most `workers + 2` batches in
flight). The pool is an object its owner passes around (tasks/clean/stage.py's `StageRun`):
nothing here is module state. Leaving its `with` block waits for the workers to exit; on an
error it cancels what is queued and waits for what runs, so no worker outlives the stage.
`start_gx_import` returns its thread; whoever validates joins it first.

Arrow memory: clean's processes allocate Arrow buffers from the system allocator
(`system_arrow_memory`, and each worker from its start): pyarrow's default, mimalloc, kept
~40 MiB more resident per process for the same batches (16x16 PNGs, 4096-row batches), and
more in the merge's process (100,000 rows: 478 -> 379 MiB peak), at no cost in time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa

from synthloop.config import CleanConfig
from tasks.clean.decode import BATCH_ROWS, StagedBatch, stage_batch

# Below this many ingested rows pass 1 runs in this process. Starting a worker (a fresh
# interpreter importing numpy, Pillow, pyarrow and this package: ~0.3 s of CPU, more without
# cached bytecode) and feeding it cost about as much as decoding ~10,000 small images; on 2
# cores the pool was no faster than one process at 20,000 (16x16 PNGs, validation on) and
# ~1.7x faster in pass 1 at 100,000. Small runs (tests, the demo) also stay in-process.
POOL_MIN_ROWS = 20_000


def decode_workers(cfg: CleanConfig, rows: int) -> int:
    """How many processes pass 1 uses for `rows` ingested rows: 1 means this one.

    clean.workers (0: one per usable CPU core), never more than there are batches of
    BATCH_ROWS, and 1 below POOL_MIN_ROWS rows."""
    if rows < POOL_MIN_ROWS:
        return 1
    workers = cfg.workers or _cpu_count()
    return max(1, min(workers, -(-rows // BATCH_ROWS)))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class DecodePool:
    """Pass 1's decode worker processes, or none (`workers` <= 1: all in this process).

    `stage` runs `stage_batch` on each batch; `finish` lets the workers exit in the
    background while the stage goes on; leaving the `with` block waits for them, or, on an
    error, cancels what is queued and waits for what is running.

    (This process only feeds the workers and keeps their results: decoding here as well,
    with one worker fewer, used less CPU time in all but was slower on 2 free cores, its
    decoding and the Great Expectations import taking turns on one interpreter lock.)
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._exiting: threading.Thread | None = None
        if workers > 1:
            # spawn, not fork: the caller may have threads (the GX import, torch) that fork
            # would copy mid-operation. Workers are this process's children: their CPU time
            # and peak RSS show in getrusage(RUSAGE_CHILDREN) once they are waited for.
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
            )

    def stage(
        self, batches: Iterator[pa.RecordBatch], staging: Path, cfg: CleanConfig
    ) -> Iterator[StagedBatch]:
        """`stage_batch` of each batch into staging/part-<n>.parquet, in batch order; with
        workers, at most `workers + 2` batches submitted and not yet consumed, so memory
        stays bounded however large the input."""

        def file(n: int) -> str:
            return str(staging / f"part-{n:09d}.parquet")

        if self._pool is None:
            for n, batch in enumerate(batches):
                yield stage_batch(batch, file(n), cfg)
            return
        pending: deque[Future] = deque()
        for n, batch in enumerate(batches):
            pending.append(self._pool.submit(stage_batch, _compact(batch), file(n), cfg))
            if len(pending) > self.workers + 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def finish(self) -> None:
        if self._pool is not None and self._exiting is None:
            self._exiting = threading.Thread(
                target=self._pool.shutdown, name="clean-decode-pool-exit", daemon=True
            )
            self._exiting.start()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *_: object) -> None:
        if self._pool is None:
            return
        if self._exiting is not None:
            self._exiting.join()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _compact(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with buffers of its own rows only: a slice pickles its parent's buffers."""
    if batch.get_total_buffer_size() <= 2 * batch.nbytes + 4096:
        return batch
    return pa.RecordBatch.from_arrays(
        [pa.concat_arrays([c]) for c in batch.columns], schema=batch.schema
    )


def _init_worker() -> None:
    """Workers leave Ctrl-C to the parent, which stops the pool and cleans up; they
    allocate Arrow buffers as the stage's own process does (`system_arrow_memory`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pa.set_memory_pool(pa.system_memory_pool())


@contextlib.contextmanager
def system_arrow_memory() -> Iterator[None]:
    """Arrow buffers allocated within come from the system allocator (the previous default
    pool is restored on leaving; a buffer is freed to the pool it came from)."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def start_gx_import() -> threading.Thread:
    """Import Great Expectations (seconds, mostly idle-core time) in the background while
    pass 1 runs; validation joins the thread first. A failed import is left for the real
    import in the main thread to report."""

    def run() -> None:
        try:
            from tasks.shared.expectations import _import_gx

            _import_gx()
        except Exception:  # the main thread imports it again, and reports the error
            pass

    thread = threading.Thread(target=run, name="clean-gx-import", daemon=True)
    thread.start()
    return thread
