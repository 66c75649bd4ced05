"""Hot reload under load: a good new version is swapped in, a corrupt one and one whose answers do
not reproduce its recorded check-set accuracy are refused; no call fails and the right version answers."""

from __future__ import annotations

import collections
import json
import logging
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.client.client import DigitClient
from digitserve.client.errors import CallError
from digitserve.repository import ModelNotFoundError, ModelRepository
from digitserve.server.health import MODEL_UPDATES_SERVICE
from tests.servers import ServerThread, make_settings
from tests.support import expect_error, publish_copy, wait_for


def publish_variant(repo: ModelRepository, source_dir: Path, model_bytes: bytes | None = None,
                    roll_classes: bool = False) -> int:
    """Publishes a copy of ``source_dir`` as the next version, optionally with other model bytes
    or with the output classes rotated (a valid model that gets everything wrong)."""

    def build(staging: Path, version: int) -> dict[str, Any]:
        shutil.copy(source_dir / "check_set.npz", staging / "check_set.npz")
        if model_bytes is not None:
            (staging / "model.keras").write_bytes(model_bytes)
        elif roll_classes:
            import keras

            model = keras.saving.load_model(source_dir / "model.keras", compile=False)
            kernel, bias = model.layers[-1].get_weights()
            model.layers[-1].set_weights([np.roll(kernel, 1, axis=1), np.roll(bias, 1)])
            model.save(staging / "model.keras")
        else:
            shutil.copy(source_dir / "model.keras", staging / "model.keras")
        metadata: dict[str, Any] = json.loads((source_dir / "metadata.json").read_text())
        metadata.pop("files", None)
        return metadata

    version, _ = repo.publish("tiny", build)
    return version


def test_hot_reload_swaps_good_versions_and_refuses_bad_ones_under_load(
    tiny_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root)
    repo = ModelRepository(root)
    v1_dir = repo.version_dir("tiny", 1)
    server = ServerThread(make_settings(tmp_path, model_repo=root, model_name="tiny",
                                        reload_interval=0.2), None)
    try:
        server.load()
        images = np.random.default_rng(0).integers(0, 256, size=(32, 784), dtype=np.uint8)
        stop = threading.Event()
        seen: list[int] = []
        by_thread: list[list[int]] = [[] for _ in range(4)]
        failures: collections.Counter[str] = collections.Counter()

        def load(k: int) -> None:
            with DigitClient(server.target, timeout=10) as client:
                i = 0
                while not stop.is_set() and i < 100_000:
                    try:
                        version = client.predict(images[i % 32 : i % 32 + 2]).model_version
                        by_thread[k].append(version)
                        seen.append(version)
                    except CallError as exc:
                        failures[exc.code().name] += 1
                    i += 1

        threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        with DigitClient(server.target, timeout=10) as client:
            wait_for(lambda: len(seen) > 50)
            calls_at_publish = len(seen)
            published = time.monotonic()
            assert publish_variant(repo, v1_dir) == 2
            wait_for(lambda: client.model_info()["version"] == 2)
            swap_seconds = time.monotonic() - published
            calls_at_swap = len(seen)
            wait_for(lambda: len(seen) > calls_at_swap + 50)

            assert publish_variant(repo, v1_dir, model_bytes=b"not a keras archive") == 3
            wait_for(lambda: "3" in client.model_info()["refused_versions"])
            assert publish_variant(repo, v1_dir, roll_classes=True) == 4
            wait_for(lambda: "4" in client.model_info()["refused_versions"])
            calls_at_refusals = len(seen)
            wait_for(lambda: len(seen) > calls_at_refusals + 50)
            stop.set()
            for t in threads:
                t.join(30)

            info = client.model_info()
            assert info["version"] == 2 and info["loaded_versions"] == [2, 1]
            assert "cannot load" in info["refused_versions"]["3"]
            # the classes rotated: its answers do not reproduce the figure v1's metadata records
            assert "does not reproduce the 1.0000" in info["refused_versions"]["4"]
            assert client.predict(images[:1], model_version=1).model_version == 1
            with pytest.raises(CallError) as pinned:
                client.predict(images[:1], model_version=4)
            assert pinned.value.code() == grpc.StatusCode.NOT_FOUND
            assert "it was refused: check-set accuracy" in pinned.value.details()
            health = health_pb2_grpc.HealthStub(client.channel)
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service=MODEL_UPDATES_SERVICE)).status \
                == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        stop.set()
        server.stop()

    assert failures == collections.Counter()
    assert set(seen) == {1, 2}
    assert all(v == 1 for v in seen[:calls_at_publish])
    # One clean cut: no caller gets version 1 again once it got 2, and after the first 2 only the
    # calls the other 3 callers had in flight may still land as 1 (at most one each).
    for versions in by_thread:
        assert versions == sorted(versions), versions
    late_v1 = seen[seen.index(2):].count(1)
    assert late_v1 <= len(threads) - 1, (late_v1, seen)
    assert all(v == 2 for v in seen[calls_at_swap + 8:])
    with capsys.disabled():
        print(f"\nhot reload under load: {len(seen)} calls sent, {sum(failures.values())} failed; "
              f"version 2 served {swap_seconds:.2f}s after publishing; versions 3 (corrupt) and "
              f"4 (accuracy off its recorded figure) refused while version 2 kept serving")


def test_a_version_refused_while_incomplete_is_served_once_its_files_are_complete(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    root, scratch = tmp_path / "repo", tmp_path / "scratch"
    shutil.copytree(tiny_repo, root)
    shutil.copytree(tiny_repo, scratch)
    assert publish_copy(ModelRepository(scratch), scratch / "tiny" / "1") == 2
    complete = scratch / "tiny" / "2"
    server = ServerThread(make_settings(tmp_path, model_repo=root, model_name="tiny",
                                        reload_interval=0.1), None)
    try:
        server.load()
        with DigitClient(server.target, timeout=10) as client:
            # Version 2 arrives without its model.keras, as a copy that is not atomic leaves it.
            partial = root / "tiny" / ".copy-2"
            shutil.copytree(complete, partial, ignore=shutil.ignore_patterns("model.keras"))
            partial.rename(root / "tiny" / "2")
            wait_for(lambda: "2" in client.model_info()["refused_versions"], timeout=30)
            assert client.model_info()["refused_versions"]["2"].endswith("model.keras: missing")
            assert client.health(MODEL_UPDATES_SERVICE) == "NOT_SERVING"
            registry = server.app.telemetry.registry
            # Ten more looks: its files did not change, it is not tried again.
            source = server.source
            assert source is not None
            looks = source.calls["versions"]
            wait_for(lambda: source.calls["versions"] >= looks + 10, 30, "ten more looks")
            assert registry.get_sample_value("digitserve_model_reloads_total",
                                             {"model_name": "tiny", "outcome": "refused"}) == 1
            assert source.calls["load 2"] == 1

            completed = time.monotonic()
            shutil.copy(complete / "model.keras", root / "tiny" / "2" / "model.keras")
            wait_for(lambda: client.model_info()["version"] == 2, timeout=30)
            seconds = time.monotonic() - completed
            info = client.model_info()
            assert info["refused_versions"] == {} and info["loaded_versions"] == [2, 1]
            assert client.health(MODEL_UPDATES_SERVICE) == "SERVING"
            assert registry.get_sample_value("digitserve_model_reloads_total",
                                             {"model_name": "tiny", "outcome": "refused"}) == 1
            assert registry.get_sample_value("digitserve_model_reloads_total",
                                             {"model_name": "tiny", "outcome": "served"}) == 1
    finally:
        server.stop()
    assert any("was refused but its files changed: trying it again" in r.getMessage()
               for r in caplog.records)
    with capsys.disabled():
        print(f"\nrefused while incomplete (model.keras missing), tried once while unchanged; "
              f"served {seconds:.2f}s after the file was completed")


def test_a_served_version_deleted_from_disk_is_replaced_after_the_grace_period_as_a_restart_would(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    grace = 2.0
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root)
    repo = ModelRepository(root)
    assert publish_copy(repo, repo.version_dir("tiny", 1)) == 2
    settings = make_settings(tmp_path, model_repo=root, model_name="tiny", reload_interval=0.1,
                             removed_version_grace=grace)
    server = ServerThread(settings, None)
    fresh: list[ServerThread] = []
    try:
        server.load()
        registry = server.app.telemetry.registry
        images = np.zeros((1, 784), np.uint8)
        with DigitClient(server.target, timeout=10) as client:
            assert client.model_info()["version"] == 2
            deleted = time.monotonic()
            shutil.rmtree(repo.version_dir("tiny", 2))
            wait_for(lambda: client.health(MODEL_UPDATES_SERVICE) == "NOT_SERVING", timeout=30)
            assert registry.get_sample_value("digitserve_served_version_missing") == 1
            if time.monotonic() - deleted < grace - 0.5:  # within the grace: still from memory
                assert client.predict(images).model_version == 2
            wait_for(lambda: client.model_info()["version"] == 1, timeout=30)
            replaced = time.monotonic() - deleted
            assert replaced >= grace
            info = client.model_info()
            assert info["loaded_versions"] == [1] and info["refused_versions"] == {}
            expect_error(lambda: client.predict(images, model_version=2), grpc.StatusCode.NOT_FOUND,
                         "version 2 is not served (serving version 1; loaded: 1)")
            assert client.health() == "SERVING"
            assert client.health(MODEL_UPDATES_SERVICE) == "SERVING"
            assert registry.get_sample_value("digitserve_served_version_missing") == 0
            assert registry.get_sample_value("digitserve_model_unloads_total") == 1

            # A fresh server on the same repository (a restart, another replica) agrees.
            fresh.append(ServerThread(replace(settings, reload_interval=0), None))
            fresh[-1].load()
            with DigitClient(fresh[-1].target, timeout=10) as other:
                assert other.model_info()["version"] == 1

            # No version left: it keeps serving from memory, ModelUpdates says so, loudly logged;
            # a fresh start serves nothing.
            shutil.rmtree(repo.version_dir("tiny", 1))
            wait_for(lambda: any("no remaining version passes the checks" in r.getMessage()
                                 for r in caplog.records), timeout=30)
            assert client.predict(images).model_version == 1
            assert client.health() == "SERVING"
            assert client.health(MODEL_UPDATES_SERVICE) == "NOT_SERVING"
            fresh.append(ServerThread(replace(settings, reload_interval=0), None))
            with pytest.raises(ModelNotFoundError, match="model 'tiny' has no published version"):
                fresh[-1].load()
    finally:
        for other_server in fresh:
            other_server.stop()
        server.stop()
    gone = [r for r in caplog.records if "is gone from" in r.getMessage()]
    assert gone and gone[0].levelno == logging.WARNING
    assert any(r.levelno == logging.WARNING and "unloaded it and serving version 1" in r.getMessage()
               for r in caplog.records)
    assert any(r.levelno == logging.ERROR and "still serving it from memory" in r.getMessage()
               for r in caplog.records)
    with capsys.disabled():
        print(f"\nserved version 2 deleted: version 1 served {replaced:.2f}s later (grace "
              f"{grace:g}s), as a fresh server on the repository serves; with no version left the "
              f"server kept version 1 from memory, ModelUpdates NOT_SERVING")
