"""The intra-op thread rule: the CPUs a process may use, and one thread for small images."""

import os

import pytest
import torch

from synthloop import threads
from synthloop.threads import cgroup_cpu_limit, cpu_threads, intra_op_threads, usable_cpus


@pytest.mark.parametrize(
    ("v2", "limit"), [("max 100000\n", None), ("150000 100000\n", 1.5), ("50000 100000", 0.5)]
)
def test_the_cgroup_v2_quota_is_read(tmp_path, monkeypatch, v2, limit):
    (tmp_path / "cpu.max").write_text(v2)
    monkeypatch.setattr(threads, "_CGROUP_V2", tmp_path / "cpu.max")
    assert cgroup_cpu_limit() == limit


def test_the_cgroup_v1_quota_is_read_and_minus_one_means_none(tmp_path, monkeypatch):
    quota, period = tmp_path / "quota", tmp_path / "period"
    monkeypatch.setattr(threads, "_CGROUP_V2", tmp_path / "absent")
    monkeypatch.setattr(threads, "_CGROUP_V1", (quota, period))
    quota.write_text("200000\n")
    period.write_text("100000\n")
    assert cgroup_cpu_limit() == 2.0
    quota.write_text("-1\n")
    assert cgroup_cpu_limit() is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota(monkeypatch):
    allowed = len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert usable_cpus() == allowed
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.5)
    assert usable_cpus() == 1  # a fraction of a CPU still runs one thread
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: allowed + 8.0)
    assert usable_cpus() == allowed


def test_small_images_get_one_thread_larger_ones_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 6)
    assert intra_op_threads(0, 8) == intra_op_threads(0, 16) == 1
    assert intra_op_threads(0, 32) == 6
    assert intra_op_threads(3, 8) == 3  # the param wins


def test_cpu_threads_sets_and_restores_and_leaves_cuda_alone():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with cpu_threads("cpu", target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with cpu_threads("cuda", target):
        assert torch.get_num_threads() == before
