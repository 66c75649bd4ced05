"""A model the server will not serve is never silent (issue 24): ``--model-name`` naming no model of
a repository that holds others stops the start at once with one line listing them (exit 2), and
each directory of the repository it does not serve (a name no model may have, a model without a
version) is logged once, then every minute while it stays."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digitserve.repository import ModelRepository
from digitserve.server.unserved import REPORT_INTERVAL, UnservedReport
from tests.servers import ServerProcess
from tests.support import REPO_ROOT


def publish_stub(model_dir: Path, *versions: int) -> None:
    """Version directories holding a metadata.json: enough for a listing, nothing is loaded."""
    for version in versions:
        (model_dir / str(version)).mkdir(parents=True)
        (model_dir / str(version) / "metadata.json").write_text("{}")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_typo_in_model_name_stops_the_start_at_once_naming_the_models_there(
    tmp_path: Path, workers: str
) -> None:
    publish_stub(tmp_path / "mnist", 1, 2)
    publish_stub(tmp_path / "tiny", 1)
    started = time.monotonic()
    done = subprocess.run(  # no --exit-if-no-model: it used to wait for 'mnst' forever
        [sys.executable, "-m", "digitserve.server", "--port", "0", "--log-format", "json",
         "--model-repo", str(tmp_path), "--model-name", "mnst", "--workers", workers],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 45  # generous: it used to never end
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR", entry
    assert entry["message"] == (
        f"cannot start: --model-repo {tmp_path}: no model 'mnst' in it; models there: mnist "
        "(versions 1, 2), tiny (version 1); choose one with --model-name, or publish 'mnst' "
        f"(mnist-train train --model-repo {tmp_path} --model-name mnst)")


def test_each_directory_not_served_is_said_once_then_every_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    report = UnservedReport(tmp_path, clock=lambda: now[0])
    lines = lambda: [r.getMessage() for r in caplog.records if r.name == "digitserve.server.unserved"]  # noqa: E731
    caplog.set_level(logging.WARNING, "digitserve.server.unserved")
    report.look({"b": "why b", "a": "why a"})
    assert lines() == [f"not serving {tmp_path}/a: why a", f"not serving {tmp_path}/b: why b"]
    caplog.clear()
    now[0] += REPORT_INTERVAL - 1
    report.look({"a": "why a", "b": "why b"})
    assert lines() == []  # within the minute: nothing again
    report.look({"a": "why a", "b": "another reason"})
    assert lines() == [f"not serving {tmp_path}/b: another reason"]  # a new reason is said at once
    caplog.clear()
    now[0] += 1
    report.look({"a": "why a", "b": "another reason"})
    assert lines() == [f"not serving {tmp_path}/a: why a"]  # a's minute is over, b's is not
    caplog.clear()
    report.look({"b": "another reason"})  # a is gone: forgotten
    now[0] += 1
    report.look({"a": "why a", "b": "another reason"})
    assert lines() == [f"not serving {tmp_path}/a: why a"]
    assert REPORT_INTERVAL == 60.0


def test_the_listing_says_why_a_directory_is_not_a_model_s(tmp_path: Path) -> None:
    for name in ("my model", "12", "mnist", ".hidden", "lost+found", "-x"):
        publish_stub(tmp_path / name, 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("")
    models, others = ModelRepository(tmp_path).listing()
    assert models == {"mnist": True, "empty": False}
    assert others == {
        "my model": "model name 'my model' is not a model directory's name (letters, digits, '.', '_', "
                    "'-', starting with a letter or digit)",
        "12": "model name '12' is not a model directory's name (letters, digits, '.', '_', '-', starting "
              "with a letter or digit; a number alone names a version)",
        "-x": "model name '-x' is not a model directory's name (letters, digits, '.', '_', '-', starting "
              "with a letter or digit)",
    }


def test_a_served_repository_logs_the_directories_it_does_not_serve_once(
    tiny_repo: Path, tmp_path: Path, spawn: type[ServerProcess]
) -> None:
    root = tmp_path / "models"
    shutil.copytree(tiny_repo, root)
    shutil.copytree(root / "tiny", root / "my model")  # what mnist-train published before issue 24
    (root / "empty").mkdir()
    server = spawn("--model-repo", str(root), "--reload-interval", "0.2", "--log-format", "text")
    server.target()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.log.count("not serving") < 2:
        time.sleep(0.2)
    time.sleep(2)  # ten more looks of the watch: not one more line
    said = [line.split(" WARNING digitserve.server.unserved ", 1)[1].rstrip("\n")
            for line in server.lines if "not serving" in line]
    assert said == [
        f"not serving {root}/empty: no version directory (1, 2, …) in it yet; publish one (mnist-train "
        f"train --model-repo {root} --model-name empty)",
        f"not serving {root}/my model: model name 'my model' is not a model directory's name (letters, "
        "digits, '.', '_', '-', starting with a letter or digit); rename it to serve it",
    ], server.log
