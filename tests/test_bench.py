"""`sr1step bench` measures both paths in one run and reports ratios (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from sr1step.bench import BenchResult, compare
from sr1step.cli import run


def test_compare_pairs_paths_into_ratios():
    ours = BenchResult(64, "ours", 1.0, [1.0], 100.0, "cpu_rss_above_model", 1, "cpu", "float32", 256)
    ref = BenchResult(64, "reference", 3.0, [3.0], 250.0, "cpu_rss_above_model", 1, "cpu", "float32", 512)
    (row,) = compare([ours, ref])
    assert row["speedup"] == pytest.approx(3.0) and row["memory_ratio"] == pytest.approx(0.4)


@pytest.mark.slow
def test_bench_cli_runs_both_paths(capsys):
    code = run(
        [
            "bench",
            "--random",
            "small",
            "--sizes",
            "24",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert row["size"] == 24 and row["ours_median_s"] > 0 and row["ref_median_s"] > 0
    assert row["speedup"] > 0 and "memory_ratio" in row


def test_bench_needs_a_model_choice(capsys):
    assert run(["bench", "--sizes", "16"]) == 1
    assert "--model or --random" in capsys.readouterr().err
    assert run(["bench", "--random", "huge"]) == 1
