"""``python -m bench.presets``: trains a preset per seed in its own process, serves every version and
checks the server's Evaluate against the trainer's figure; the goals decide its exit code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import presets
from bench.presets import Run, verdict


def test_each_seed_is_trained_served_and_evaluated_and_a_missed_goal_exits_1(
        synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = presets.main(["--data-dir", str(synthetic_data_dir), "--preset", "seed", "--seeds", "3",
                         "--epochs", "1", "--max-seconds", "0.001"])
    out, err = capsys.readouterr()
    assert code == 1, err
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"\| [34] \|", line)]
    assert [row[0] for row in rows] == ["| 3"]
    for row in rows:
        assert row[3] == row[2]  # the server's Evaluate equals the trainer's test accuracy
        assert row[4] in ("litert", "tensorflow")
    assert "Preset `seed`, 1 seed(s): minimum test accuracy" in out
    assert re.search(r"goal missed: maximum training time \d+\.\d s is above the goal 0\.001 s", err)


def test_verdict_names_each_missed_goal_and_a_served_figure_that_differs() -> None:
    runs = [Run(seed=1, version=1, test_accuracy=0.9930, holdout_accuracy=None, train_seconds=100.0, epochs=4,
                served_accuracy=0.9930),
            Run(seed=2, version=2, test_accuracy=0.9918, holdout_accuracy=None, train_seconds=121.5, epochs=4,
                served_accuracy=0.9917)]
    assert verdict(runs, 0.992, 120) == [
        "minimum test accuracy 0.9918 is below the goal 0.9920",
        "maximum training time 121.5 s is above the goal 120 s",
        "seed 2: the server's Evaluate gave 0.9917, the trainer 0.9918",
    ]
    assert verdict(runs[:1], 0.992, 120) == []
