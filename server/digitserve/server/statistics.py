"""Triton's statistics extension: what the server measures of each model version's inference calls
(success and failure counts and times; time queued in the batcher, spent on the input, in the
model and on the answer), kept as plain integers the event loop alone updates, and reported in
the JSON shape of Triton's ``GET /v2/models/stats`` (which the gRPC edge converts to
ModelStatisticsResponse)."""

from __future__ import annotations

import time
from typing import Any

from digitserve.inference import Model


class VersionStatistics:
    """One model version's counters, in nanoseconds. ``queue``/``infer`` are fed by the batcher
    (per request: the time it waited for the model, the time of the model call that answered
    it); ``input`` (checking and converting the pixels, decoding pictures), ``output`` (building
    the answer) and the outcome by server.infer and the edge that answers."""

    __slots__ = (
        "batches",
        "execution_count",
        "fail_count",
        "fail_ns",
        "infer_count",
        "infer_ns",
        "inference_count",
        "input_ns",
        "last_answered",
        "output_ns",
        "queue_count",
        "queue_ns",
        "success_count",
        "success_ns",
    )

    def __init__(self) -> None:
        self.success_count = self.success_ns = 0
        self.fail_count = self.fail_ns = 0
        self.queue_count = self.queue_ns = 0
        self.infer_count = self.infer_ns = 0
        self.input_ns = self.output_ns = 0  # counted by success_count: only answered calls have both
        self.inference_count = 0  # images answered
        self.execution_count = 0  # model calls (a batch of several requests counts once)
        self.last_answered = 0  # time.perf_counter_ns() of the last answer (0: none yet)
        self.batches: dict[int, list[int]] = {}  # batch size -> [model calls, their ns]

    def executed(self, size: int, requests: int, queue_ns: int, infer_ns: int) -> None:
        """One model call of ``size`` images that answered ``requests`` calls, which waited
        ``queue_ns`` in all; it took ``infer_ns``, which each of them counts."""
        self.execution_count += 1
        self.queue_count += requests
        self.queue_ns += queue_ns
        self.infer_count += requests
        self.infer_ns += infer_ns * requests
        batch = self.batches.get(size)
        if batch is None:
            batch = self.batches[size] = [0, 0]
        batch[0] += 1
        batch[1] += infer_ns

    def answered(self, images: int, started_ns: int, predicted_ns: int, input_ns: int) -> None:
        """A call answered: ``images`` images, its answer built from ``predicted_ns`` until now
        (time.perf_counter_ns), the call begun at ``started_ns``, its input taking ``input_ns``."""
        now = time.perf_counter_ns()
        self.success_count += 1
        self.success_ns += now - started_ns
        self.input_ns += input_ns
        self.output_ns += now - predicted_ns
        self.inference_count += images
        self.last_answered = now

    def failed(self, started_ns: int) -> None:
        """A call refused or failed after its model version was chosen."""
        self.fail_count += 1
        self.fail_ns += time.perf_counter_ns() - started_ns

    def last_inference(self) -> int:
        """Milliseconds since the epoch of the last answer; 0 if none (the clock read once here,
        not per call)."""
        if not self.last_answered:
            return 0
        return (time.time_ns() - (time.perf_counter_ns() - self.last_answered)) // 1_000_000

    def as_json(self, name: str, version: int) -> dict[str, Any]:
        """Triton's ModelStatistics as its JSON spells it."""
        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        success = self.success_count
        return {
            "name": name, "version": str(version), "last_inference": self.last_inference(),
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {
                "success": duration(success, self.success_ns),
                "fail": duration(self.fail_count, self.fail_ns),
                "queue": duration(self.queue_count, self.queue_ns),
                "compute_input": duration(success, self.input_ns),
                "compute_infer": duration(self.infer_count, self.infer_ns),
                "compute_output": duration(success, self.output_ns),
                "cache_hit": duration(0, 0), "cache_miss": duration(0, 0),
            },
            # Per batch size, the model calls only: the input and the answer are per request
            # here (before and after the batch), so they are not a batch's (left at zero).
            "batch_stats": [
                {"batch_size": size, "compute_input": duration(0, 0),
                 "compute_infer": duration(count, ns), "compute_output": duration(0, 0)}
                for size, (count, ns) in sorted(self.batches.items())],
        }


class PlaneStatistics:
    """The statistics of one model's versions (one per data plane), by version number."""

    __slots__ = ("versions",)

    def __init__(self) -> None:
        self.versions: dict[int, VersionStatistics] = {}

    def of(self, model: Model) -> VersionStatistics:
        """``model``'s counters (made at zero the first time)."""
        version = model.spec.version
        stats = self.versions.get(version)
        if stats is None:
            stats = self.versions[version] = VersionStatistics()
        return stats


def report(versions: list[tuple[str, int, PlaneStatistics]]) -> dict[str, Any]:
    """``{"model_stats": [...]}`` of (model name, version, its model's statistics) each."""
    empty = VersionStatistics()
    return {"model_stats": [(plane.versions.get(version) or empty).as_json(name, version)
                            for name, version, plane in versions]}
