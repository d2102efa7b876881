"""How many intra-op threads torch should use on the CPU: what this process may run on,
and what the work can use.

torch's default is one thread per core it sees. That is wrong twice on shared machines:
- a container or a `taskset` may allow fewer CPUs than the machine has (`usable_cpus`
  reads the affinity mask and the cgroup quota);
- ops on small images are too small to split: every thread waits at every op's barrier
  for the slowest one, so a busy neighbour on one core stalls all of them. One thread is
  then both faster when quiet and far faster when contended, and it makes CPU runs
  bit-identical across machines.

`intra_op_threads(requested, image_size)` is the rule; `cpu_threads(device, n)` applies
it for a block and restores the previous count. A stage's `cpu_threads` param (0: the rule)
overrides it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

# Images up to this side (pixels) train and infer on one intra-op thread.
SMALL_IMAGE = 16
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (
    Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
)


def cgroup_cpu_limit() -> float | None:
    """CPUs the cgroup's quota allows (None: no quota, or no cgroup file to read)."""
    try:
        if _CGROUP_V2.is_file():
            quota, period = _CGROUP_V2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = _CGROUP_V1
        if quota_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(allowed, math.ceil(limit)) if limit else allowed)


def intra_op_threads(requested: int, image_size: int) -> int:
    """`requested` when set (> 0); else 1 for small images, the usable CPUs otherwise."""
    if requested > 0:
        return requested
    return 1 if image_size <= SMALL_IMAGE else usable_cpus()


@contextlib.contextmanager
def cpu_threads(device_type: str, threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` on the CPU for the block, then restored.
    A CUDA device leaves them alone (the host only feeds the GPU)."""
    if device_type != "cpu":
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
