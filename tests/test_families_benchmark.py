"""benchmarks/families.py: the baseline arms every family is compared with are trained once
and are the same ones the uncached protocol would train."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tasks.shared.images import ImageTensors
from tasks.validate.utility_protocol import RECIPES, Recipe, compare_arms

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "families.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("families_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dataset(labels: list[int], tag: str) -> ImageTensors:
    n = len(labels)
    return ImageTensors(
        images=torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1),
        labels=torch.tensor(labels),
        ids=[f"{tag}{i}" for i in range(n)],
        classes=["a", "b"],
        sources=[tag] * n,
    )


def test_the_shared_baseline_trains_the_baseline_once_and_changes_no_figure() -> None:
    families = load_benchmark()
    train = dataset([0, 0, 0, 0, 1], "real")
    val, test = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 0, 1])
    calls: list[tuple[int, int, Recipe]] = []

    def trainer(data: ImageTensors, seed: int, recipe: Recipe):
        calls.append((len(data), seed, recipe))
        # predictions depend on the data, the seed and the recipe, like a real trainer's
        g = torch.Generator().manual_seed(1000 * len(data) + 10 * seed + RECIPES.index(recipe))
        return torch.randint(2, (len(val),), generator=g), torch.randint(
            2, (len(test),), generator=g
        )

    shared = families.SharedBaseline(trainer, train)
    seeds = [0, 1, 2]
    samples = [dataset([1, 1], "x"), dataset([1, 0, 1], "y")]
    cached = [compare_arms(train, s, val, test, shared, seeds, 0.5) for s in samples]
    first_round = len(calls)
    plain = [compare_arms(train, s, val, test, trainer, seeds, 0.5) for s in samples]

    assert cached == plain  # the same figures as retraining the baseline every time
    baseline_calls = [c for c in calls[:first_round] if c[0] == len(train)]
    # the menu's recipes on seed 0, then the chosen one on seeds 1 and 2: once, not per family
    assert len(baseline_calls) == len(set(baseline_calls)) == len(RECIPES) + 2
    # every family's own arms are still trained: 3 seeds plus tstr, for each sample set
    assert first_round - len(baseline_calls) == 2 * (len(seeds) + 1)


def test_a_memo_carries_the_baseline_to_a_later_run_on_equal_rows_only() -> None:
    """fashion_lt.py's loop seeds: a new trainer and a reloaded train split with the same rows
    reuse the baseline runs; other rows train afresh."""
    families = load_benchmark()
    calls: list[tuple[str, int, Recipe]] = []

    def trainer(data: ImageTensors, seed: int, recipe: Recipe):
        calls.append((data.ids[0], seed, recipe))
        return torch.zeros(1), torch.zeros(1)

    memo: dict = {}
    recipe = RECIPES[0]
    first = families.SharedBaseline(trainer, dataset([0, 1, 1], "real"), memo)
    first.submit(dataset([0, 1, 1], "real"), 0, recipe).result()
    again = families.SharedBaseline(trainer, dataset([0, 1, 1], "real"), memo)
    again.submit(dataset([0, 1, 1], "real"), 0, recipe).result()  # reused
    again.submit(dataset([0, 1, 1], "real"), 1, recipe).result()  # another seed: trains
    relabelled = families.SharedBaseline(trainer, dataset([1, 1, 1], "real"), memo)
    relabelled.submit(dataset([1, 1, 1], "real"), 0, recipe).result()  # not the same rows
    assert calls == [("real0", 0, recipe), ("real0", 1, recipe), ("real0", 0, recipe)]
    assert len(memo) == 3  # two seeds of the first rows, one of the relabelled ones


def test_delta_cell_reads_an_interval_in_points() -> None:
    families = load_benchmark()
    summary = {"delta": {"mean": 0.0123, "low": -0.004, "high": 0.0286}, "verdict": "no evidence"}
    assert families.delta_cell(summary) == "+1.2 [-0.4, +2.9] no evidence"
    one_seed = {"delta": {"mean": 0.05, "low": None, "high": None}, "verdict": "no evidence"}
    assert families.delta_cell(one_seed) == "+5.0 [n/a, n/a] no evidence"
    assert families.delta_cell(None) == "n/a"
