"""Server settings: one declaration per option (type, default, help, group, checks), a pydantic
dataclass. From it come the flags and their ``MNIST_*`` variables (``build_parser``, through
``digitserve.config.Parser``, grouped in ``--help``), the checks and their one-line errors
(pydantic), and the flag reference of docs/configuration.md (``python -m digitserve.server.settings``)."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from digitserve.config import Parser, env_name, show_default
from digitserve.repository import model_name_error
from digitserve.server.versionpolicy import parse_flag

__all__ = ["Settings", "build_parser", "load_settings", "markdown"]

# The allowed values are the fields' types: flags, variables and --help take them from there.
# (digitserve.inference.INFERENCE_CHOICES, digitserve.server.logs.FORMATS and
# digitserve.server.logs.ACCESS_LOG_MODES hold the same; tests/core/test_config.py checks.)
Inference = Literal["auto", "litert", "tensorflow"]
LogFormat = Literal["auto", "json", "text"]
AccessLogMode = Literal["auto", "on", "off"]
ModelControlMode = Literal["none", "explicit"]
EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
SchedulerPolicy = Literal["batch", "normal"]
INFERENCE_CHOICES: tuple[str, ...] = get_args(Inference)
FORMATS: tuple[str, ...] = get_args(LogFormat)
ACCESS_LOG_MODES: tuple[str, ...] = get_args(AccessLogMode)

# --help's groups and the reference's sections, in this order: title -> what the group holds.
GROUPS = {
    "model repository": "what is served, and the gate a version passes first",
    "network": "listeners, connections and shutdown",
    "limits": "the most one call, connection or picture may take",
    "batching": "how the model runs: batcher, threads and worker processes",
    "security": "TLS and bearer tokens (docs/security.md)",
    "observability": "logs and metrics (docs/observability.md)",
}
REPO, NET, LIMITS, BATCH, SECURITY, OBS = GROUPS


def opt(default: Any, group: str, help: str, *, shown: str | None = None, label: str | None = None,
        after: str = "", env_only: bool = False, **checks: Any) -> Any:
    """One option: its default (``...``: required), --help group and text, the default as help
    shows it, and its bounds (``ge``, ``gt``, ``le``). An error names it ``label`` (``{}`` is the
    value; default: the field's name in words) with ``after`` appended. ``env_only``: a secret,
    from its variable only (a flag would show in ``ps``), never in repr()."""
    extra = {"group": group, "shown": shown, "label": label, "after": after, "env_only": env_only}
    return Field(default, description=help, repr=not env_only, json_schema_extra=typing.cast(Any, extra),
                 **checks)


MiB = 1024 * 1024


@dataclass(frozen=True, config=ConfigDict(extra="forbid", hide_input_in_errors=True))
class Settings:
    """Everything the server can be told; each field is also the variable MNIST_<FIELD>."""

    model_repo: Path = opt(..., REPO, "Root of the model repository (REPO/NAME/VERSION/).")
    model_name: tuple[str, ...] = opt((), REPO, shown="every model", help=(
        "A model of the repository to serve (repeat the flag for several; comma-separated in the "
        "variable); none serves every model in the repository, and models that appear later. A name "
        "with no directory in a repository holding other models stops the start (exit 2), naming them."))
    model_version: int = opt(0, REPO, ge=0, help=(
        "Version to serve (with one --model-name); 0 serves the newest that passes the gate."))
    version_policy: str = opt("", REPO, shown="latest:1", help=(
        "Which versions of each model stay loaded, as TF Serving's and Triton's version policy: "
        "latest:N (the N newest that pass the gate), all, or specific:V,V,...; pinned calls reach "
        "any of them, unpinned ones the newest (or the stable label's). With --model-config: for "
        "models whose table sets neither version nor version_policy."))
    default_model: str = opt("", REPO, shown="the only model", help=(
        "The model a request without model_name gets; empty: the first --model-name, or the only model "
        "served."))
    model_config: Path | None = opt(None, REPO, help=(
        "A model config file (TOML: models, version policy, labels, canary weight, gate rules; "
        "docs/models.md), read again when it changes; instead of --model-name, --model-version and "
        "--default-model."))
    host: str = opt("127.0.0.1", NET, "Address to listen on; use 0.0.0.0 or [::] in a container.")
    port: int = opt(50051, NET, "Port to listen on; 0 picks a free one (logged).", ge=0, le=65535)
    grace_period: float = opt(10.0, NET, "Seconds in-flight calls get to finish after SIGTERM/SIGINT.", ge=0)
    max_images_per_request: int = opt(1024, LIMITS, ge=1, help=(
        "Most images in one Predict request or one Evaluate message."))
    max_message_bytes: int = opt(16 * MiB, LIMITS, ge=1024, help=(
        "Largest gRPC message accepted or sent, and largest HTTP request body (413 beyond)."))
    max_connection_age: float = opt(0.0, NET, ge=0, help=(
        "Seconds after which a client connection is closed (gracefully) so clients rebalance over new "
        "replicas; 0 keeps connections open."))
    max_concurrent_streams: int = opt(100, LIMITS, ge=1, help=(
        "Most streams (calls) one client connection may have open at once "
        "(SETTINGS_MAX_CONCURRENT_STREAMS); more are refused with REFUSED_STREAM, which grpc clients "
        "queue. Bounds what a flood of data-less streams can hold."))
    max_deallocating_streams: int = opt(100, LIMITS, ge=0, help=(
        "Streams of one connection that have ended but whose calls the server has not yet released, "
        "allowed beyond --max-concurrent-streams before its new streams are refused (REFUSED_STREAM). "
        "Bounds an HTTP/2 rapid reset (HEADERS then RST_STREAM at once); 0 also refuses well-behaved "
        "clients that keep to the stream limit."))
    handshake_timeout: float = opt(10.0, LIMITS, gt=0, help=(
        "Seconds a new connection may take to send the HTTP/2 preface and SETTINGS (and finish TLS) "
        "before the server closes it; idle sockets that never speak are closed after it."))
    max_connections: int = opt(0, LIMITS, shown="from the file limit", ge=0, help=(
        "Most gRPC connections open at once (per worker); one more is closed at once (the client sees "
        "UNAVAILABLE). 0: the file-descriptor limit (RLIMIT_NOFILE) less 128 files and "
        "--http-max-connections when --http-port is on (at least 16; no cap when unlimited), so that "
        "accepting connections never exhausts the files the server needs."))
    max_connection_idle: float = opt(60.0, NET, ge=0, help=(
        "Seconds a connection may stay without any call before the server closes it (GOAWAY; grpc clients "
        "reconnect at their next call); 0 never closes idle connections."))
    keepalive_time: float = opt(60.0, NET, ge=0, help=(
        "Seconds between the server's keepalive pings on a connection, to find peers that vanished "
        "without closing it; 0 sends none."))
    keepalive_timeout: float = opt(20.0, NET, gt=0, help=(
        "Seconds a keepalive ping may wait for its answer before the connection closes."))
    min_ping_interval: float = opt(10.0, NET, ge=0, help=(
        "Shortest interval (seconds) allowed between a client's pings while the server sends nothing; "
        "each faster ping is a strike (client keepalive must not be shorter)."))
    max_ping_strikes: int = opt(2, NET, ge=0, help=(
        "Pings too early tolerated before the connection is closed (GOAWAY ENHANCE_YOUR_CALM "
        "'too_many_pings'); 0 tolerates any number."))
    max_metadata_bytes: int = opt(8192, LIMITS, ge=1024, help=(
        "Largest header block (request metadata, HPACK-decoded) of a call; larger ones are refused with "
        "RESOURCE_EXHAUSTED before the call reaches the server's code (HTTP: 431, and no header line "
        "longer)."))
    max_batch_size: int = opt(256, BATCH, "Most images the dynamic batcher puts into one model call.", ge=1)
    max_queue_delay_ms: float = opt(0.0, BATCH, label="max queue delay {} ms", ge=0, help=(
        "Milliseconds the batcher waits for more calls before running a batch that is not full; 0 runs at "
        "once (calls that arrive while the model is busy still batch)."))
    max_queued_images: int = opt(8192, BATCH, help=(
        "Images allowed to wait for the model; beyond that calls get RESOURCE_EXHAUSTED."))
    max_picture_bytes: int = opt(8 * MiB, LIMITS, ge=1024, help=(
        "Largest picture accepted (Image.encoded, an element of a V2 BYTES input: PNG or JPEG bytes); a "
        "larger one is INVALID_ARGUMENT, refused before any picture of the call is decoded."))
    max_picture_request_bytes: int = opt(16 * MiB, LIMITS, help=(
        "Most bytes of pictures in one request, all its pictures together."))
    max_picture_pixels: int = opt(4096 * 4096, LIMITS, ge=28 * 28, help=(
        "Most pixels (width × height) of one picture, read from its header before it is decoded: a "
        "decompression bomb is refused unread. The default takes a 12-megapixel photo."))
    max_picture_decoded_bytes: int = opt(48 * MiB, LIMITS, ge=28 * 28 * 4,
                                         after=" (a 28×28 picture in colour)", help=(
        "Most bytes one picture may decode to (width × height × bytes per pixel: 1 grey or palette, 2 "
        "16-bit grey, 4 colour or alpha, 6 or 8 16-bit colour; a JPEG at the reduced scale it is decoded "
        "at, plus 2 bytes per coefficient when progressive or multi-scan), read from its header before it "
        "is decoded: INVALID_ARGUMENT beyond. Each picture thread holds about this much at most. The "
        "default takes a 12-megapixel photo (JPEG, or PNG up to 4096×3072 RGBA) and any 8- or 16-bit grey "
        "picture within --max-picture-pixels."))
    picture_threads: int = opt(2, BATCH, ge=1, le=64, help=(
        "Threads that decode and preprocess pictures, shared by every model (never the event loop: a "
        "640×480 JPEG takes milliseconds)."))
    max_queued_pictures: int = opt(64, LIMITS, ge=1, help=(
        "Pictures allowed to wait for (or be in) decoding, all calls together; beyond that calls get "
        "RESOURCE_EXHAUSTED before any of their pictures is decoded. Also the most pictures in one "
        "request (more: INVALID_ARGUMENT)."))
    inline_max_images: int = opt(64, BATCH, ge=0, help=(
        "Most images of a call computed on the event loop, for a model that runs inline (LiteRT) and only "
        "while it is idle; lowered per model at load until such a call takes at most 1 ms. Larger calls "
        "queue for the model thread. 0: never on the loop."))
    workers: int = opt(1, BATCH, ge=1, help=(
        "Server processes sharing the port (SO_REUSEPORT), each with its own model."))
    event_loop: EventLoopChoice = opt("auto", BATCH, help=(
        "The event loop every listener and call of a server process runs on: 'uvloop' (libuv's, in C: "
        "less CPU per call than asyncio's, BENCHMARKS.md), 'asyncio' (the standard library's), or "
        "'auto': uvloop where it is installed (the serve and server extras install it, except on "
        "Windows), else asyncio. The start-up line names the loop."))
    scheduler_policy: SchedulerPolicy = opt("batch", BATCH, help=(
        "Linux scheduling policy of the server's threads: 'batch' (SCHED_BATCH: a thread woken by "
        "another, gRPC's poller waking the event loop, waits for the running one's time slice instead "
        "of preempting it, so a busy core switches threads less: 10 percent less CPU per 1-image V2 "
        "call on one core, BENCHMARKS.md) or 'normal' (SCHED_OTHER, the kernel's default). Where the "
        "kernel refuses, a warning; the start-up line names the policy."))
    worker_start_retries: int = opt(5, BATCH, ge=0, help=(
        "With --workers N: a worker that dies is restarted with exponential backoff (0.5 s doubling to 30 "
        "s); one that fails this many times in a row before serving (no model, a taken metrics port) "
        "halts the server (exit 1), as gunicorn does."))
    worker_heartbeat_timeout: float = opt(10.0, BATCH, help=(
        "With --workers N: each worker's event loop beats a heartbeat every second; one silent this many "
        "seconds (stopped, deadlocked, stuck on the loop) is logged, killed with SIGKILL and restarted. 0 "
        "turns the check off."))
    reload_interval: float = opt(5.0, REPO, ge=0, help=(
        "Seconds between looks for a newer published version (hot reload); 0 turns it off. A pinned "
        "--model-version is never replaced."))
    repository_timeout: float = opt(30.0, REPO, after=" seconds", gt=0, le=86400, help=(
        "Seconds a repository read (listing the versions, loading and checking one version) may take "
        "before it counts as hung: it is logged and counted (digitserve_repository_timeouts_total), the "
        "version is skipped for now and retried later once the hung read returns; other versions still "
        "load."))
    removed_version_grace: float = opt(30.0, REPO, ge=0, help=(
        "Seconds the served version keeps serving from memory after its directory vanished from the "
        "repository; then the newest remaining version that passes the checks is served, as a fresh start "
        "would."))
    min_check_accuracy: float = opt(0.0, REPO, ge=0, le=1, help=(
        "A floor on a version's accuracy on its check set (check_set.npz), on top of the gate's own "
        "checks (its accuracy reproduces the trainer's figure); 0 turns it off."))
    max_regression: float = opt(1.0, REPO, ge=0, le=1, help=(
        "A new version is served only if its check-set accuracy is at most this much below the version "
        "now serving (0.01: one point); 1 turns it off."))
    exit_if_no_model: bool = opt(False, REPO, help=(
        "Exit at start when the repository has no servable version of the model (exit 2 when none is "
        "published, 1 when all are refused), instead of waiting, health NOT_SERVING, for one to be "
        "published."))
    allow_missing_check_set: bool = opt(False, REPO, help=(
        "Serve versions that have no check set (check_set.npz), their answers unchecked; without it they "
        "are refused."))
    inference: Inference = opt("auto", BATCH, help=(
        "How the model runs: 'litert' (LiteRT/XNNPACK, one thread: microseconds per call), 'tensorflow' "
        "(a tf.function), or 'auto': LiteRT when its probabilities agree with model.predict on the "
        "version's check set to 1e-6 or to TensorFlow's own batch-1 spread, else TensorFlow."))
    model_control: ModelControlMode = opt("none", REPO, help=(
        "'explicit' lets RepositoryModelLoad/Unload (gRPC) and POST /v2/repository/models/NAME/load "
        "and /unload serve or stop serving a model of the repository, as Triton's "
        "--model-control-mode=explicit; it needs a bearer token (MNIST_AUTH_TOKEN or "
        "--auth-token-file) and one worker. 'none': those calls are refused (FAILED_PRECONDITION, "
        "403)."))
    keep_versions: int = opt(2, REPO, ge=1, help=(
        "With a latest:N version policy, how many of the newest loaded versions stay loaded when a "
        "newer one replaces them, so calls can still pin the previous one. It loads nothing itself: "
        "a start loads only the policy's versions (--version-policy latest:N keeps N across a "
        "restart); ignored under specific and all."))
    log_level: str = opt("INFO", OBS, "Python logging level.")
    log_format: LogFormat = opt("auto", OBS, help=(
        "Log lines as 'json' (one object per line), 'text', or 'auto': text when stderr is a terminal, "
        "JSON otherwise."))
    access_log: AccessLogMode = opt("off", OBS, help=(
        "One line per call (method, status, latency, peer, request id): 'off' (the default, as in TF "
        "Serving and Triton: a line per call costs about 3 percent of a 1-image call), 'on', or 'auto': on, "
        "except for text lines on a terminal, where a line per call would flood the screen. "
        "--log-level WARNING turns them off."))
    metrics_port: int = opt(-1, OBS, ge=-1, le=65535, help=(
        "Port of the Prometheus endpoint (http://HOST:PORT/metrics); -1 turns it off, 0 picks a free one "
        "(logged). With --workers N, worker i serves on PORT+i."))
    http_port: int = opt(-1, NET, ge=-1, le=65535, help=(
        "Port of the HTTP/JSON edge (the Open Inference Protocol's REST binding: /v2/health/ready, "
        "/v2/models/NAME/infer, ...; /metrics too), served by the same process, data plane and token "
        "check as gRPC; -1 turns it off, 0 picks a free one (logged). With --workers N, the workers share "
        "it (SO_REUSEPORT), as they share --port. The container image sets 8080."))
    http_max_connections: int = opt(512, LIMITS, ge=1, help=(
        "Most HTTP connections open at once (per worker). Above three quarters of it, each new connection "
        "closes the oldest idle keep-alive one (idle at least 0.25 s); with none idle, one more is "
        "answered 503 (Connection: close) and closed."))
    http_max_connections_per_peer: int = opt(128, LIMITS, ge=0, help=(
        "Most HTTP connections open at once from one client address (per worker); one more closes that "
        "address's oldest idle connection, or with none idle is answered 503 and closed, so that one "
        "client cannot hold every connection. Raise it (or 0: no limit) behind a proxy that sends every "
        "client's requests from one address."))
    http_read_timeout: float = opt(10.0, LIMITS, after=" seconds", gt=0, le=3600, help=(
        "Seconds an HTTP client may take to send a request's headers (from their first byte, or from the "
        "connection's start), and again its body; a slower one is closed (headers) or answered 408 "
        "(body). Idle keep-alive connections are closed after --max-connection-idle."))
    low_confidence: float = opt(0.5, OBS, ge=0, le=1, help=(
        "Top-1 probability below which a Predict answer counts as low-confidence (metric "
        "digitserve_low_confidence_predictions_total)."))
    tls_cert: Path | None = opt(None, SECURITY, help=(
        "PEM certificate chain of the server; with --tls-key the port speaks TLS only."))
    tls_key: Path | None = opt(None, SECURITY, "PEM private key of --tls-cert.")
    tls_client_ca: Path | None = opt(None, SECURITY, help=(
        "PEM CA certificate(s): clients must present a certificate signed by one (mTLS); needs "
        "--tls-cert."))
    tls_expiry_warning_days: float = opt(14.0, SECURITY, ge=0, le=3650, help=(
        "Start-up warns when the TLS certificate expires within this many days (its expiry is also the "
        "metric digitserve_tls_certificate_expiry_timestamp_seconds); an expired or not yet valid "
        "certificate stops start-up. 0: no warning."))
    auth_token_file: Path | None = opt(None, SECURITY, help=(
        "File of accepted bearer tokens, one per line: every call but health must send 'authorization: "
        "Bearer <token>'. MNIST_AUTH_TOKEN (no flag) may hold one token instead."))
    auth_token: str | None = opt(None, SECURITY, env_only=True, help=(
        "One accepted bearer token (instead of --auth-token-file)."))

    @field_validator("model_name", mode="before")
    @classmethod
    def _model_names(cls, value: Any) -> tuple[str, ...]:
        """One name or several (repeated flags, the comma-separated variable), once each."""
        names = tuple(dict.fromkeys(n for n in ((value,) if isinstance(value, str) else value or ()) if n))
        bad = [problem for n in names if (problem := model_name_error(n)) is not None]
        if bad:
            raise ValueError("; ".join(bad))
        return names

    @field_validator("version_policy")
    @classmethod
    def _version_policy(cls, value: str) -> str:
        return str(parse_flag(value)) if value.strip() else ""

    @field_validator("worker_heartbeat_timeout")
    @classmethod
    def _heartbeat(cls, value: float) -> float:
        if value != 0 and not 2 <= value <= 86400:
            raise ValueError(f"worker heartbeat timeout {value} is not 0 (off) or in [2, 86400] seconds")
        return value

    @field_validator("auth_token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("MNIST_AUTH_TOKEN is set but empty")  # fail closed, never open
        return value

    @model_validator(mode="after")
    def _together(self) -> Settings:
        """The checks of options against each other, once each option passed its own."""
        problems = [message for bad, message in [
            (self.model_version and len(self.model_name) != 1,
             "--model-version pins a version of one model: give exactly one --model-name"),
            (self.model_version and self.version_policy,
             f"--model-version {self.model_version} and --version-policy {self.version_policy} both "
             "say which versions serve: set one of them (--model-version N is --version-policy "
             "specific:N)"),
            (self.model_config and (self.model_name or self.model_version or self.default_model),
             "--model-config lists the models, their versions and the default model: leave out "
             "--model-name, --model-version and --default-model"),
            (self.max_queued_images < self.max_images_per_request,
             f"max queued images {self.max_queued_images} is below max images per request "
             f"{self.max_images_per_request}"),
            (self.max_picture_request_bytes < self.max_picture_bytes,
             f"max picture request bytes {self.max_picture_request_bytes} is below max picture bytes "
             f"{self.max_picture_bytes}"),
            (self.metrics_port > 0 and self.metrics_port + self.workers - 1 > 65535,
             f"metrics ports {self.metrics_port}+0..{self.workers - 1} exceed 65535"),
            ((self.tls_cert is None) != (self.tls_key is None), "--tls-cert and --tls-key go together"),
            (self.tls_client_ca is not None and self.tls_cert is None,
             "--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS plus client certs)"),
            (self.auth_token is not None and self.auth_token_file is not None,
             "set MNIST_AUTH_TOKEN or --auth-token-file, not both"),
            (self.model_control == "explicit" and self.auth_token is None and self.auth_token_file is None,
             "--model-control explicit lets callers load and unload models: set MNIST_AUTH_TOKEN or "
             "--auth-token-file too"),
            (self.model_control == "explicit" and self.workers > 1,
             f"--model-control explicit with --workers {self.workers}: a load or unload would reach "
             "one worker only; use one worker"),
        ] if bad]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, values: Any, handler: Any) -> Settings:
        """Every problem in one line, as the operator names it (``port 70000 is not in 0..65535``);
        never the values of other fields (the token): the errors hide their input."""
        try:
            return typing.cast(Settings, handler(values))
        except ValidationError as error:
            raise ValueError("; ".join(_problem(e) for e in error.errors())) from None


FIELDS: dict[str, FieldInfo] = getattr(Settings, "__pydantic_fields__")  # noqa: B009  # pydantic's


def _extra(field: FieldInfo) -> dict[str, Any]:
    return typing.cast(dict[str, Any], field.json_schema_extra)


def _problem(error: ErrorDetails) -> str:
    """One of pydantic's errors as one line: the field in words, its value, what is wrong."""
    name = str(error["loc"][0]) if error["loc"] else ""
    field = FIELDS.get(name)
    if error["type"] == "value_error":
        return str(error.get("ctx", {}).get("error"))
    name = name.replace("_", " ")
    if field is None or error["type"] == "missing" or _extra(field)["env_only"]:
        return f"{name}: {error['msg'].lower()}"  # not the input: a secret's, or every field's
    extra = _extra(field)
    shown = (extra["label"] or name + " {}").format(error["input"])
    if error["type"] == "literal_error":
        return f"{name} {error['input']!r} is not one of {', '.join(get_args(field.annotation))}"
    if error["type"] not in ("greater_than", "greater_than_equal", "less_than_equal"):
        return f"{shown}: {error['msg']}"
    ge, gt, le = (next((getattr(m, k) for m in field.metadata if hasattr(m, k)), None)
                  for k in ("ge", "gt", "le"))
    if le is not None:
        shown += f" is not in ({gt}, {le}]" if gt is not None else f" is not in {ge}..{le}" \
            if field.annotation is int else f" is not in [{ge}, {le}]"
    else:
        shown += " is not positive" if gt is not None else " is negative" if ge == 0 else f" is below {ge}"
    return f"{shown}{extra['after']}"


def _default_text(field: FieldInfo) -> str:
    return "required" if field.is_required() else _extra(field)["shown"] or show_default(field.default)


class _Parser(Parser):
    """A config Parser whose usage errors never echo the words no flag took (argparse prints them)."""

    def _unrecognized(self, words: Sequence[str], secret: str = "--auth-token") -> str:
        """Only option names are shown and other words are counted: a value may be a secret
        (``--auth-token SECRET``)."""
        names: list[str] = []
        values, after_secret = 0, False
        for word in words:
            if word.startswith("--") and not after_secret:
                names.append(word.split("=", 1)[0])
                values += "=" in word
                after_secret = names[-1] == secret and "=" not in word
            else:
                values, after_secret = values + 1, False
        parts = [" ".join(names)] if names else []
        if values:
            parts.append(f"{values} value{'s' if values > 1 else ''} (not shown: values may be secrets)")
        return "unrecognized arguments: " + " and ".join(parts) + (
            f"; the bearer token is never a flag (it would show in `ps`): set {env_name('auth_token')} or "
            "--auth-token-file" if secret in names else "")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The mnist-serve argument parser, each field an option in its group; defaults come from
    ``env`` (MNIST_*). No abbreviations: else `--auth-token SECRET` would pass as
    --auth-token-file (and be logged)."""
    parser = _Parser(prog="mnist-serve", env=env, usage="%(prog)s --model-repo DIR [OPTION ...]",
                     description="Serve every model of a model repository over gRPC (digitserve.v1's "
                     "Predict, Evaluate and GetModelInfo, the Open Inference Protocol, health, "
                     "reflection) and, with --http-port, the Open Inference Protocol over HTTP. Every "
                     "flag can also be set by the environment variable shown.")
    groups = {title: parser.add_argument_group(title, about) for title, about in GROUPS.items()}
    for name, field in FIELDS.items():
        if _extra(field)["env_only"]:
            continue
        hint = get_args(field.annotation)[0] if type(None) in get_args(field.annotation) \
            else field.annotation  # X | None is X
        how: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction} if hint is bool  # variable: 1|0|true|false|...
            else {"action": "append"} if typing.get_origin(hint) is tuple  # variable: comma-separated
            else {"type": str, "choices": get_args(hint)} if typing.get_origin(hint) is Literal
            else {"type": hint})
        parser.add_option("--" + name.replace("_", "-"), to=groups[_extra(field)["group"]],
                          help=field.description or "", required=field.is_required(),
                          default=None if field.is_required() else field.default,
                          default_text=_default_text(field), **how)
    return parser


def load_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Flags, falling back to MNIST_* variables. Raises SystemExit(2) on a usage error and
    ValueError (one line) for values the checks refuse."""
    env = os.environ if env is None else env
    values = vars(build_parser(env).parse_args(argv))
    values.update({n: env.get(env_name(n)) for n, f in FIELDS.items() if _extra(f)["env_only"]})
    try:
        return Settings(**values)
    except ValidationError as error:  # the one line _one_line made
        raise ValueError(str(error.errors()[0].get("ctx", {}).get("error"))) from None


def markdown() -> str:
    """docs/configuration.md's flag reference: a table per --help group, in the declaration's words."""
    lines = []
    for title, about in GROUPS.items():
        lines += [f"**{title[0].upper()}{title[1:]}** ({about}):", "",
                  "| flag | variable | default | meaning |", "|---|---|---|---|"]
        for name, field in FIELDS.items():
            flag, extra = "--" + name.replace("_", "-"), _extra(field)
            if extra["group"] != title:
                continue
            flags = "(none: the variable only)" if extra["env_only"] else \
                f"`{flag}`, `--no-{flag[2:]}`" if field.annotation is bool else f"`{flag}`"
            default = _default_text(field) if field.is_required() or extra["shown"] else \
                f"`{_default_text(field)}`"
            text = (field.description or "").replace("|", "\\|")
            lines.append(f"| {flags} | `{env_name(name)}` | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m digitserve.server.settings: the reference docs/configuration.md holds
    sys.stdout.write(markdown())
