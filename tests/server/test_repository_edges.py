"""What a repository may hold besides models (issue 21, items 12 and 13): many directories
without a version cost what they are (one listing per look), not a served model each; symlinks
are followed inside the repository only, and a loop or a link out of it is skipped with one
warning, never fatal. Real ``mnist-serve`` processes on 127.0.0.1, the tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.client.errors import CallError
from digitserve.repository import ModelRepository
from tests.servers import ServerProcess
from tests.support import publish_copy, scrape, wait_for

EMPTY_DIRS = 1000


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def serving(server: ServerProcess, timeout: float = 120) -> tuple[str, int]:
    """The server's gRPC target once health "" is SERVING, and its metrics port."""
    target = server.target(timeout)
    with DigitClient(target, timeout=30) as client:
        assert client.wait_until_serving(timeout) == "SERVING"
    port = wait_for(lambda: re.search(r"metrics on http://[\d.]+:(\d+)", server.log), 30, "metrics")
    return target, int(port.group(1))


def health(client: DigitClient, service: str = "") -> str:
    try:
        return client.health(service)
    except CallError as error:
        return str(error.code().name)


def threads(server: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/task"))


def test_empty_model_directories_cost_no_served_model_each(
    spawn: type[ServerProcess], tiny_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """1,000 directories without a version beside the tiny model: the server starts and serves as
    one without them does, with as many metrics series and threads; they are not listed, have no
    health service, and one of them that gets a version is served."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_repo, plain)
    crowded = tmp_path / "crowded"
    shutil.copytree(tiny_repo, crowded)
    for i in range(EMPTY_DIRS):
        (crowded / f"empty{i:04d}").mkdir()
    found: dict[str, tuple[int, int]] = {}
    for repo in (plain, crowded):
        server = spawn("--model-repo", str(repo), "--default-model", "tiny", "--metrics-port", "0",
                       "--reload-interval", "0.5")
        target, metrics = serving(server)
        with DigitClient(target, timeout=30) as client:
            assert client.predict(np.zeros(784, np.uint8)).model_version == 1
            assert [m.name for m in client.list_models().models] == ["tiny"]
            assert client.health() == "SERVING"
            assert client.health("digitserve.v1.Model/tiny") == "SERVING"
        found[repo.name] = (len(scrape(metrics)), threads(server))  # after the same calls
        if repo == crowded:  # no health service; a directory that gets a version is a model
            with DigitClient(target, timeout=30) as client:
                assert health(client, "digitserve.v1.Model/empty0007") == "NOT_FOUND"
                publish_copy(ModelRepository(crowded),
                             ModelRepository(tiny_repo).version_dir("tiny", 1), "empty0007")
                wait_for(lambda c=client: health(c, "digitserve.v1.Model/empty0007") == "SERVING",  # type: ignore[misc]
                         60, "the published directory served")
                answer = client.predict(np.zeros(784, np.uint8), model_name="empty0007")
                assert (answer.model_name, answer.model_version) == ("empty0007", 1)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    (series, plain_threads), (crowded_series, crowded_threads) = found["plain"], found["crowded"]
    assert crowded_series == series, (series, crowded_series)
    assert crowded_threads <= plain_threads + 4, (plain_threads, crowded_threads)
    report(capsys, f"{EMPTY_DIRS} empty model directories: {crowded_series} metrics series "
                   f"({series} without them), {crowded_threads} threads ({plain_threads})")


def test_symlinks_are_followed_inside_the_repository_only_and_a_loop_is_never_fatal(
    spawn: type[ServerProcess], tiny_repo: Path, tmp_path: Path,
) -> None:
    """A model kept on a volume mounted inside the repository and linked in is served; a symlink
    loop, a link to / and a version linked from outside are skipped with one warning each, at
    start and when they appear while serving, and discovery goes on (a model published after
    a loop appeared is served)."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    volume = repo / ".volume"  # hidden: not a model of its own
    publish_copy(ModelRepository(volume), ModelRepository(tiny_repo).version_dir("tiny", 1), "digits")
    (repo / "digits").symlink_to(volume / "digits")
    (repo / "loop").symlink_to("loop")
    outside = tmp_path / "outside"
    shutil.copytree(ModelRepository(tiny_repo).version_dir("tiny", 1), outside / "7")
    (repo / "tiny" / "7").symlink_to(outside / "7")
    server = spawn("--model-repo", str(repo), "--reload-interval", "0.2", "--metrics-port", "0",
                   "--default-model", "tiny")
    target, _ = serving(server)
    with DigitClient(target, timeout=30) as client:
        assert client.predict(np.zeros(784, np.uint8)).model_version == 1  # not the link out
        assert client.predict(np.zeros(784, np.uint8), model_name="digits").model_name == "digits"
        # While serving: a link to / and a two-link loop, then a model is published.
        (repo / "rootlink").symlink_to("/")
        (repo / "ping").symlink_to(repo / "pong")
        (repo / "pong").symlink_to(repo / "ping")
        publish_copy(ModelRepository(repo), ModelRepository(tiny_repo).version_dir("tiny", 1), "later")
        wait_for(lambda: health(client, "digitserve.v1.Model/later") == "SERVING", 60, "model later")
        names = {m.name: [v.version for v in m.versions] for m in client.list_models().models}
    assert names == {"digits": [1], "later": [1], "tiny": [1]}
    time.sleep(2)  # ten more looks of the watch, each of which sees every link again
    ignored = [json.loads(line)["message"] for line in server.lines if '"ignoring ' in line]
    real = Path(os.path.realpath(repo))
    assert sorted(ignored) == sorted([
        f"ignoring {repo / 'loop'}: a symlink that cannot be followed (Too many levels of symbolic "
        "links); fix or remove it",
        f"ignoring {repo / 'ping'}: a symlink that cannot be followed (Too many levels of symbolic "
        "links); fix or remove it",
        f"ignoring {repo / 'pong'}: a symlink that cannot be followed (Too many levels of symbolic "
        "links); fix or remove it",
        f"ignoring {repo / 'rootlink'}: a symlink to /, outside the repository {real}; only "
        "symlinks to directories inside the repository are followed",
        f"ignoring {repo / 'tiny' / '7'}: a symlink to {os.path.realpath(outside / '7')}, outside "
        f"the repository {real}; only symlinks to directories inside the repository are followed",
    ]), ignored
    assert "Traceback" not in server.log and "failed; trying again" not in server.log
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0


HALF = 'default_model = "tiny"\n\n[models.tiny]\n'  # parses: model other dropped, label stable gone
WHOLE = HALF + 'labels = { stable = 1 }\n\n[models.other]\n'


def rewrite_in_place(path: Path, first: str, rest: str) -> None:
    """Rewrites ``path`` as an editor saving in place does: truncate, write, pause, write."""
    with path.open("r+") as file:
        file.truncate(0)
        file.write(first)
        file.flush()
        time.sleep(0.03)
        file.write(rest)


def test_a_config_rewritten_in_place_is_never_applied_half_written_nor_empty(
    spawn: type[ServerProcess], tiny_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The model config rewritten in place 30 times while calls run: no call is answered by the
    wrong version (label stable pins tiny to version 1 of 2) or NOT_FOUND (model other); then
    an empty file is a config error (counted, one line, the previous config in force), and a
    real change still applies."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    repository = ModelRepository(repo)
    publish_copy(repository, repository.version_dir("tiny", 1))  # tiny 2
    publish_copy(repository, repository.version_dir("tiny", 1), "other")
    config = tmp_path / "models.toml"
    config.write_text(WHOLE)
    server = spawn("--model-repo", str(repo), "--model-config", str(config), "--reload-interval", "0.1",
                   "--metrics-port", "0")
    target, metrics = serving(server)
    answers: Counter[str] = Counter()
    stop = threading.Event()

    def calls() -> None:
        with DigitClient(target, timeout=30) as client:
            while not stop.is_set():
                for name in ("tiny", "other"):
                    try:
                        answer = client.predict(np.zeros(784, np.uint8), model_name=name)
                        answers[f"{name} {answer.model_version}"] += 1
                    except CallError as error:
                        answers[f"{name} {error.code().name}"] += 1

    callers = [threading.Thread(target=calls, daemon=True) for _ in range(2)]
    for caller in callers:
        caller.start()
    try:
        for _ in range(30):
            rewrite_in_place(config, HALF, WHOLE[len(HALF):])
            time.sleep(0.3)
        with DigitClient(target, timeout=30) as client:
            # Rewritten every 0.33 s, the file may never hold still for a look (an error, the
            # previous config in force); once the writer stops, it does.
            wait_for(lambda: client.list_models().config_error == "", 60, "the file to settle")
            during = dict(answers)
            assert set(during) == {"tiny 1", "other 1"}, during  # never the half: v2, NOT_FOUND
            errors = scrape(metrics)[("digitserve_model_config_errors_total", frozenset())]
            config.write_text("")  # in place, and left empty
            expected = (f"--model-config {config}: the file is empty (or holds only comments): a file "
                        "being rewritten in place, or truncated; write default_model = \"\" to serve "
                        "every model with the flags' policy")
            wait_for(lambda: client.list_models().config_error == expected, 60, "the error reported")
            time.sleep(1)
            assert [m.name for m in client.list_models().models] == ["other", "tiny"]
            samples = scrape(metrics)
            assert samples[("digitserve_model_config_errors_total", frozenset())] == errors + 1
            assert samples[("digitserve_model_config_ok", frozenset())] == 0
            rewrite_in_place(config, HALF, WHOLE[len(HALF):].replace("stable = 1", "stable = 2"))
            wait_for(lambda: client.predict(np.zeros(784, np.uint8), model_name="tiny").model_version == 2,
                     60, "the label moved to version 2")
            assert client.list_models().config_error == ""
    finally:
        stop.set()
        for caller in callers:
            caller.join(30)
    assert server.log.count("the file is empty") == 1, server.log  # one line, not one per look
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    report(capsys, f"30 in-place rewrites of the model config under calls: {during}")
