"""What ``mnist-train train`` checks before it loads any data (issue 24): a model name the server
would never serve (the server's own rule, digitserve.repository.model_name_error) and a repository
it could not publish into. Each is one line and exit 2, fast, naming neither the data nor TensorFlow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digitserve.repository import ModelRepository, model_name_error, publish_error
from digitserve.server.settings import load_settings
from digitserve.trainer.cli import main
from tests.support import REPO_ROOT

# Names a server never serves; each the trainer published before issue 24 but "my model" refused.
NEVER_SERVED = ["my model", "-dash", "a+b", "12", "é", "x" * 129, "lost+found", "tab\there"]
SERVED = ["mnist", "my_model-2.1", "007", "x" * 128, "A"]
ABSENT_DATA = "/nonexistent/mnist-data"


def _train(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["train", "--data-dir", ABSENT_DATA, "--preset", "seed", *argv])
    out, err = capsys.readouterr()
    assert out == ""
    return code, err.splitlines()


@pytest.mark.parametrize("name", NEVER_SERVED)
def test_the_trainer_and_the_server_refuse_the_same_names_with_the_same_rule(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rule = model_name_error(name)
    assert rule is not None and rule.startswith(f"model name {name!r} is not a model directory's name (")
    code, lines = _train(["--model-repo", str(tmp_path), f"--model-name={name}"], capsys)
    assert code == 2
    assert lines == [f"mnist-train: error: {rule}; the server would never serve it: choose another "
                     "--model-name"]  # not the absent data: the name is checked first
    with pytest.raises(ValueError) as info:  # mnist-serve --model-name
        load_settings(["--model-repo", str(tmp_path), f"--model-name={name}"], env={})
    assert str(info.value) == rule
    if "\t" not in name:  # a folder of that name in the repository is not a model's
        (tmp_path / name).mkdir()
        (tmp_path / name / "1").mkdir()
        assert ModelRepository(tmp_path).models() == []
    assert not any(p for p in tmp_path.rglob("*") if p.name != name and p.parent == tmp_path)


@pytest.mark.parametrize("name", SERVED)
def test_names_the_server_serves_are_taken_by_both(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert model_name_error(name) is None
    settings = load_settings(["--model-repo", str(tmp_path), f"--model-name={name}"], env={})
    assert settings.model_name == (name,)
    (tmp_path / name / "1").mkdir(parents=True)
    assert ModelRepository(tmp_path).models() == [name]
    code, lines = _train(["--model-repo", str(tmp_path / "repo"), f"--model-name={name}"], capsys)
    assert code == 1  # past the checks: the data is what is missing
    assert lines[-1].startswith("mnist-train: error: ") and ABSENT_DATA in lines[-1], lines


def test_a_name_that_is_never_served_stops_the_command_in_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "digitserve.trainer", "train", "--data-dir", ABSENT_DATA,
         "--model-repo", str(tmp_path), "--model-name", "my model"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert time.monotonic() - started < 60  # generous: no TensorFlow import, no data read
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "mnist-train: error: model name 'my model' is not a model directory's name (letters, digits, "
        "'.', '_', '-', starting with a letter or digit); the server would never serve it: choose "
        "another --model-name"]
    assert list(tmp_path.iterdir()) == []


def test_a_file_given_as_the_repository_is_one_line_before_any_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a repository\n")
    code, lines = _train(["--model-repo", str(afile), "--model-name", "digits"], capsys)
    assert code == 2
    assert lines == [f"mnist-train: error: --model-repo {afile}: a file; give the model repository's "
                     "directory (it holds NAME/VERSION/) or a path to create"]
    code, lines = _train(["--model-repo", str(afile / "models"), "--model-name", "digits"], capsys)
    assert code == 2
    assert lines == [f"mnist-train: error: --model-repo {afile}/models: {afile} is a file, so "
                     f"{afile}/models/digits cannot be created; remove it or give another path"]
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "digits").write_text("")  # the model's directory is a file
    code, lines = _train(["--model-repo", str(tmp_path / "repo"), "--model-name", "digits"], capsys)
    assert code == 2
    assert lines == [f"mnist-train: error: --model-repo {tmp_path}/repo: {tmp_path}/repo/digits is a "
                     f"file, so {tmp_path}/repo/digits cannot be created; remove it or give another path"]
    assert afile.read_text() == "not a repository\n"


def _unwritable(tmp_path: Path) -> tuple[Path, str]:
    """A directory this process may not write in, and why (the OS's words): a read-only directory,
    or for root (whom modes do not stop) /sys, where no directory can be made."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked, "Permission denied"
    try:
        os.mkdir("/sys/digitserve-write-check")
    except OSError as error:
        return Path("/sys"), error.strerror or str(error)
    os.rmdir("/sys/digitserve-write-check")
    pytest.skip("no directory here refuses a write from this user")


def test_an_unwritable_repository_or_one_that_cannot_be_created_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked, why = _unwritable(tmp_path)
    code, lines = _train(["--model-repo", str(locked), "--model-name", "digits"], capsys)
    assert code == 2
    assert lines == [f"mnist-train: error: --model-repo {locked}: cannot write in it: {why}; give a "
                     "directory this user may write, or fix its permissions"]
    deep = locked / "models" / "v1"
    code, lines = _train(["--model-repo", str(deep), "--model-name", "digits"], capsys)
    assert code == 2
    assert lines == [f"mnist-train: error: --model-repo {deep}: cannot be created in {locked}: {why}; give "
                     "a directory this user may write, or fix its permissions"]
    assert not (locked / "models").exists()


def test_a_full_file_system_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    code, lines = _train(["--model-repo", str(tmp_path), "--model-name", "digits"], capsys)
    assert code == 2
    assert lines == [f"mnist-train: error: --model-repo {tmp_path}: 10.0 MiB free on its file system, "
                     "less than the 64 MiB a version needs; free some space or give another path"]
    assert list(tmp_path.iterdir()) == []  # the write check left nothing


def test_a_repository_that_will_take_the_version_passes_and_is_left_as_it_was(tmp_path: Path) -> None:
    assert publish_error(tmp_path / "new" / "models", "digits") is None  # created by the publish
    assert publish_error(tmp_path, "digits") is None
    (tmp_path / "digits" / "1").mkdir(parents=True)
    assert publish_error(tmp_path, "digits") is None
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["digits", "digits/1"]


def test_a_file_as_the_repository_stops_the_command_in_seconds(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "digitserve.trainer", "train", "--data-dir", ABSENT_DATA,
         "--model-repo", str(afile), "--model-name", "digits", "--preset", "cnn"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert time.monotonic() - started < 60  # generous: the cnn preset used to train for minutes first
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        f"mnist-train: error: --model-repo {afile}: a file; give the model repository's directory (it "
        "holds NAME/VERSION/) or a path to create"]
