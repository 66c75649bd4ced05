"""The load tester against a model repository server (issue 15), over a real channel on 127.0.0.1:
it targets a model and a label in both protocols and reports which versions answered, so that a
canary split can be read off a run (text and JSON), with and without --no-verify."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from digitserve.client.cli import main
from digitserve.loadtest import PROTOCOLS
from tests.client.test_repository_client import CANARY_WEIGHT, labelled_repository
from tests.servers import ServerThread


@pytest.fixture
def repo_server(tiny_repo: Path, tmp_path: Path,
                start_server: Callable[..., ServerThread]) -> ServerThread:
    repo, config = labelled_repository(tiny_repo, tmp_path)
    return start_server(model_repo=repo, model_config=config)


def loadtest(capsys: pytest.CaptureFixture[str], target: str, *args: str) -> tuple[int, Any, str]:
    code = main(["--target", target, "--timeout", "10", "loadtest", *args])
    captured = capsys.readouterr()
    out = json.loads(captured.out) if "--json" in args else captured.out
    return code, out, captured.err


def version(protocol: str, number: int) -> int | str:
    """A version as the answers of ``protocol`` give it: a number, or V2's text."""
    return number if protocol == "digitserve" else str(number)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_canary_split_is_read_off_the_version_mix(
        repo_server: ServerThread, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str],
        protocol: str) -> None:
    n = 2000
    for verify in ([], ["--no-verify"]):
        code, result, err = loadtest(
            capsys, repo_server.target, "--data-dir", str(synthetic_data_dir), "--protocol",
            protocol, "--model-name", "tiny", "--concurrency", "8", "--requests", str(n), "--json",
            *verify)
        assert (code, err, result["ok"], result["errors"]) == (0, "", n, {}), verify
        mix = {(v["model_name"], v["model_version"]): v for v in result["versions"]}
        stable, canary = ("tiny", version(protocol, 1)), ("tiny", version(protocol, 2))
        assert list(mix) == [stable, canary], verify  # ordered by version
        assert mix[stable]["count"] + mix[canary]["count"] == n
        assert mix[canary]["fraction"] == mix[canary]["count"] / n
        # 2,000 draws of weight 0.25: a standard deviation of 0.0097; 5 of them either side.
        assert abs(mix[canary]["fraction"] - CANARY_WEIGHT) < 0.05, mix


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_label_or_another_model_is_all_its_versions_answers(
        repo_server: ServerThread, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str],
        protocol: str) -> None:
    data = str(synthetic_data_dir)
    target = repo_server.target
    code, out, err = loadtest(capsys, target, "--data-dir", data, "--protocol", protocol,
                              "--label", "canary", "--requests", "300", "--concurrency", "4")
    assert (code, err) == (0, "")
    assert "versions    tiny 2: 300 (100.0 %)" in out.splitlines()
    code, result, err = loadtest(capsys, target, "--data-dir", data, "--protocol", protocol,
                                 "--model-name", "other", "--requests", "50", "--json")
    assert (code, err) == (0, "")
    assert result["versions"] == [{"model_name": "other", "model_version": version(protocol, 1),
                                   "count": 50, "fraction": 1.0}]
    # No model named: the server's default, in V2 too (ListModels names it).
    code, result, err = loadtest(capsys, target, "--data-dir", data, "--protocol", protocol,
                                 "--model-version", "3", "--requests", "50", "--json")
    assert (code, err) == (0, "")
    assert result["versions"] == [{"model_name": "tiny", "model_version": version(protocol, 3),
                                   "count": 50, "fraction": 1.0}]
