"""Server settings: built once in main() from flags and MNIST_* environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from digitserve.config import ENV_PREFIX, Parser, add_fields, env_name, env_only
from digitserve.repository import is_model_name

__all__ = ["ENV_PREFIX", "Settings", "build_parser", "load_settings"]

# The allowed values are the fields' types: flags, variables and --help take them from there.
# (digitserve.inference.INFERENCE_CHOICES, digitserve.server.logs.FORMATS and
# digitserve.server.logs.ACCESS_LOG_MODES hold the same; tests/core/test_config.py checks.)
Inference = Literal["auto", "litert", "tensorflow"]
LogFormat = Literal["auto", "json", "text"]
AccessLogMode = Literal["auto", "on", "off"]
INFERENCE_CHOICES: tuple[str, ...] = get_args(Inference)
FORMATS: tuple[str, ...] = get_args(LogFormat)
ACCESS_LOG_MODES: tuple[str, ...] = get_args(AccessLogMode)


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told. Each field is also read from MNIST_<FIELD> (upper case)."""

    model_repo: Path = field(metadata={"help": "Root of the model repository (``REPO/NAME/VERSION/``)."})
    model_name: tuple[str, ...] = field(default=(), metadata={
        "help": "A model of the repository to serve (repeat the flag for several; comma-separated "
                "in the variable); none serves every model in the repository, and models that "
                "appear later.", "default_text": "every model"})
    model_version: int = field(default=0, metadata={
        "help": "Version to serve (with one --model-name); 0 serves the newest that passes the gate."})
    default_model: str = field(default="", metadata={
        "help": "The model a request without model_name gets; empty: the first --model-name, or "
                "the only model served.", "default_text": "the only model"})
    model_config: Path | None = field(default=None, metadata={
        "help": "A model config file (TOML: models, version policy, labels, canary weight, gate "
                "rules; docs/models.md), read again when it changes; instead of --model-name, "
                "--model-version and --default-model."})
    host: str = field(
        default="127.0.0.1", metadata={"help": "Address to listen on; use 0.0.0.0 or [::] in a container."}
    )
    port: int = field(default=50051, metadata={"help": "Port to listen on; 0 picks a free one (logged)."})
    grace_period: float = field(
        default=10.0, metadata={"help": "Seconds in-flight calls get to finish after SIGTERM/SIGINT."}
    )
    max_images_per_request: int = field(
        default=1024, metadata={"help": "Most images in one Predict request or one Evaluate message."}
    )
    max_message_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata={"help": "Largest gRPC message accepted or sent, and largest HTTP request body."}
    )
    max_connection_age: float = field(
        default=0.0,
        metadata={
            "help": "Seconds after which a client connection is closed (gracefully) so clients "
            "rebalance over new replicas; 0 keeps connections open."
        },
    )
    # HTTP/2 limits of every listener (grpc core channel arguments; see server_options).
    max_concurrent_streams: int = field(
        default=100,
        metadata={
            "help": "Most streams (calls) one client connection may have open at once "
            "(SETTINGS_MAX_CONCURRENT_STREAMS); more are refused with REFUSED_STREAM, which grpc "
            "clients queue. Bounds what a flood of data-less streams can hold."
        },
    )
    max_deallocating_streams: int = field(
        default=100,
        metadata={
            "help": "Streams of one connection that have ended but whose calls the server has not "
            "yet released, allowed beyond --max-concurrent-streams before its new streams are "
            "refused (REFUSED_STREAM). Bounds an HTTP/2 rapid reset (HEADERS then RST_STREAM at "
            "once); 0 also refuses well-behaved clients that keep to the stream limit."
        },
    )
    handshake_timeout: float = field(
        default=10.0,
        metadata={
            "help": "Seconds a new connection may take to send the HTTP/2 preface and SETTINGS "
            "(and finish TLS) before the server closes it; idle sockets that never speak are "
            "closed after it."
        },
    )
    max_connections: int = field(
        default=0,
        metadata={
            "help": "Most gRPC connections open at once (per worker); one more is closed at once "
            "(the client sees UNAVAILABLE). 0: the file-descriptor limit (RLIMIT_NOFILE) less "
            "128 files and --http-max-connections when --http-port is on, so that accepting "
            "connections never exhausts the files the server needs.",
            "default_text": "from the file limit"
        },
    )
    max_connection_idle: float = field(
        default=60.0,
        metadata={
            "help": "Seconds a connection may stay without any call before the server closes it "
            "(GOAWAY; grpc clients reconnect at their next call); 0 never closes idle connections."
        },
    )
    keepalive_time: float = field(
        default=60.0,
        metadata={
            "help": "Seconds between the server's keepalive pings on a connection, to find peers "
            "that vanished without closing it; 0 sends none."
        },
    )
    keepalive_timeout: float = field(
        default=20.0,
        metadata={"help": "Seconds a keepalive ping may wait for its answer before the connection closes."},
    )
    min_ping_interval: float = field(
        default=10.0,
        metadata={
            "help": "Shortest interval (seconds) allowed between a client's pings while the server "
            "sends nothing; each faster ping is a strike (client keepalive must not be shorter)."
        },
    )
    max_ping_strikes: int = field(
        default=2,
        metadata={
            "help": "Pings too early tolerated before the connection is closed (GOAWAY "
            "ENHANCE_YOUR_CALM 'too_many_pings'); 0 tolerates any number."
        },
    )
    max_metadata_bytes: int = field(
        default=8192,
        metadata={
            "help": "Largest header block (request metadata, HPACK-decoded) of a call; larger "
            "ones are refused with RESOURCE_EXHAUSTED before the call reaches the server's code."
        },
    )
    max_batch_size: int = field(
        default=256,
        metadata={"help": "Most images the dynamic batcher puts into one model call."},
    )
    max_queue_delay_ms: float = field(
        default=0.0,
        metadata={
            "help": "Milliseconds the batcher waits for more calls before running a batch that is "
            "not full; 0 runs at once (calls that arrive while the model is busy still batch)."
        },
    )
    max_queued_images: int = field(
        default=8192,
        metadata={"help": "Images allowed to wait for the model; beyond that calls get RESOURCE_EXHAUSTED."},
    )
    max_picture_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata={
            "help": "Largest picture accepted (Image.encoded, an element of a V2 BYTES input: PNG or "
            "JPEG bytes); a larger one is INVALID_ARGUMENT, refused before any picture of the call "
            "is decoded."
        },
    )
    max_picture_request_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata={"help": "Most bytes of pictures in one request, all its pictures together."},
    )
    max_picture_pixels: int = field(
        default=4096 * 4096,
        metadata={
            "help": "Most pixels (width × height) of one picture, read from its header before it "
            "is decoded: a decompression bomb is refused unread. The default takes a 12-megapixel "
            "photo."
        },
    )
    max_picture_decoded_bytes: int = field(
        default=48 * 1024 * 1024,
        metadata={
            "help": "Most bytes one picture may decode to (width × height × bytes per pixel: 1 "
            "grey or palette, 2 16-bit grey, 4 colour or alpha, 6 or 8 16-bit colour; a JPEG at "
            "the reduced scale it is decoded at, plus 2 bytes per coefficient when progressive or "
            "multi-scan), read from its header before it is decoded: INVALID_ARGUMENT beyond. "
            "Each picture thread holds about this much at most. The default takes a 12-megapixel "
            "photo (JPEG, or PNG up to 4096×3072 RGBA) and any 8- or 16-bit grey picture within "
            "--max-picture-pixels."
        },
    )
    picture_threads: int = field(
        default=2,
        metadata={
            "help": "Threads that decode and preprocess pictures, shared by every model (never the "
            "event loop: a 640×480 JPEG takes milliseconds)."
        },
    )
    max_queued_pictures: int = field(
        default=64,
        metadata={
            "help": "Pictures allowed to wait for (or be in) decoding, all calls together; beyond "
            "that calls get RESOURCE_EXHAUSTED before any of their pictures is decoded. Also the "
            "most pictures in one request (more: INVALID_ARGUMENT)."
        },
    )
    inline_max_images: int = field(
        default=64,
        metadata={
            "help": "Most images of a call computed on the event loop, for a model that runs "
            "inline (LiteRT) and only while it is idle; lowered per model at load until such a call "
            "takes at most 1 ms. Larger calls queue for the model thread. 0: never on the loop."
        },
    )
    workers: int = field(
        default=1,
        metadata={"help": "Server processes sharing the port (SO_REUSEPORT), each with its own model."},
    )
    worker_start_retries: int = field(
        default=5,
        metadata={
            "help": "With --workers N: a worker that dies is restarted with exponential backoff "
            "(0.5 s doubling to 30 s); one that fails this many times in a row before serving "
            "(no model, a taken metrics port) halts the server (exit 1), as gunicorn does."
        },
    )
    worker_heartbeat_timeout: float = field(
        default=10.0,
        metadata={
            "help": "With --workers N: each worker's event loop beats a heartbeat every second; "
            "one silent this many seconds (stopped, deadlocked, stuck on the loop) is logged, "
            "killed with SIGKILL and restarted. 0 turns the check off."
        },
    )
    reload_interval: float = field(
        default=5.0,
        metadata={
            "help": "Seconds between looks for a newer published version (hot reload); 0 turns it "
            "off. A pinned --model-version is never replaced."
        },
    )
    repository_timeout: float = field(
        default=30.0,
        metadata={
            "help": "Seconds a repository read (listing the versions, loading and checking one "
            "version) may take before it counts as hung: it is logged and counted "
            "(digitserve_repository_timeouts_total), the version is skipped for now and retried "
            "later once the hung read returns; other versions still load."
        },
    )
    removed_version_grace: float = field(
        default=30.0,
        metadata={
            "help": "Seconds the served version keeps serving from memory after its directory "
            "vanished from the repository; then the newest remaining version that passes the "
            "checks is served, as a fresh start would."
        },
    )
    min_check_accuracy: float = field(
        default=0.0,
        metadata={
            "help": "A floor on a version's accuracy on its check set (check_set.npz), on top of "
            "the gate's own checks (its accuracy reproduces the trainer's figure); 0 turns it off."
        },
    )
    max_regression: float = field(
        default=1.0,
        metadata={
            "help": "A new version is served only if its check-set accuracy is at most this much "
            "below the version now serving (0.01: one point); 1 turns it off."
        },
    )
    exit_if_no_model: bool = field(
        default=False,
        metadata={
            "help": "Exit at start when the repository has no servable version of the model "
            "(exit 2 when none is published, 1 when all are refused), instead of waiting, health "
            "NOT_SERVING, for one to be published."
        },
    )
    allow_missing_check_set: bool = field(
        default=False,
        metadata={
            "help": "Serve versions that have no check set (check_set.npz), their answers "
            "unchecked; without it they are refused."
        },
    )
    inference: Inference = field(
        default="auto",
        metadata={
            "help": "How the model runs: 'litert' (LiteRT/XNNPACK, one thread: microseconds per "
            "call), 'tensorflow' (a tf.function), or 'auto': LiteRT when its probabilities agree "
            "with model.predict on the version's check set to 1e-6 or to TensorFlow's own "
            "batch-1 spread, else TensorFlow."
        },
    )
    keep_versions: int = field(
        default=2,
        metadata={"help": "Newest versions kept loaded, so requests can pin the previous one."},
    )
    log_level: str = field(default="INFO", metadata={"help": "Python logging level."})
    log_format: LogFormat = field(
        default="auto",
        metadata={
            "help": "Log lines as 'json' (one object per line), 'text', or 'auto': text when stderr "
            "is a terminal, JSON otherwise."
        },
    )
    access_log: AccessLogMode = field(
        default="auto",
        metadata={
            "help": "One line per call (method, status, latency, peer, request id): 'on', 'off', or "
            "'auto': on, except for text lines on a terminal, where a line per call would flood "
            "the screen (JSON lines, files and pipes get them). --log-level WARNING turns them off."
        },
    )
    metrics_port: int = field(
        default=-1,
        metadata={
            "help": "Port of the Prometheus endpoint (http://HOST:PORT/metrics); -1 turns it off, 0 "
            "picks a free one (logged). With --workers N, worker i serves on PORT+i."
        },
    )
    http_port: int = field(
        default=-1,
        metadata={
            "help": "Port of the HTTP/JSON edge (the Open Inference Protocol's REST binding: "
            "/v2/health/ready, /v2/models/NAME/infer, ...; /metrics too), served by the same "
            "process, data plane and token check as gRPC; -1 turns it off, 0 picks a free one "
            "(logged). With --workers N, the workers share it (SO_REUSEPORT), as they share --port."
        },
    )
    http_max_connections: int = field(
        default=512,
        metadata={
            "help": "Most HTTP connections open at once (per worker). Above three quarters of it, "
            "each new connection closes the oldest idle keep-alive one; with none idle, one more "
            "is answered 503 (Connection: close) and closed."
        },
    )
    http_max_connections_per_peer: int = field(
        default=128,
        metadata={
            "help": "Most HTTP connections open at once from one client address (per worker); "
            "one more closes that address's oldest idle connection, or with none idle is answered "
            "503 and closed, so that one client cannot hold every connection. Raise it (or 0: no "
            "limit) behind a proxy that sends every client's requests from one address."
        },
    )
    http_read_timeout: float = field(
        default=10.0,
        metadata={
            "help": "Seconds an HTTP client may take to send a request's headers (from their first "
            "byte, or from the connection's start), and again its body; a slower one is closed "
            "(headers) or answered 408 (body). Idle keep-alive connections are closed after "
            "--max-connection-idle."
        },
    )
    low_confidence: float = field(
        default=0.5,
        metadata={
            "help": "Top-1 probability below which a Predict answer counts as low-confidence "
            "(metric digitserve_low_confidence_predictions_total)."
        },
    )
    tls_cert: Path | None = field(
        default=None,
        metadata={"help": "PEM certificate chain of the server; with --tls-key the port speaks TLS only."},
    )
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of --tls-cert."})
    tls_client_ca: Path | None = field(
        default=None,
        metadata={
            "help": "PEM CA certificate(s): clients must present a certificate signed by one (mTLS); "
            "needs --tls-cert."
        },
    )
    tls_expiry_warning_days: float = field(
        default=14.0,
        metadata={
            "help": "Start-up warns when the TLS certificate expires within this many days (its "
            "expiry is also the metric digitserve_tls_certificate_expiry_timestamp_seconds); an "
            "expired or not yet valid certificate stops start-up. 0: no warning."
        },
    )
    auth_token_file: Path | None = field(
        default=None,
        metadata={
            "help": "File of accepted bearer tokens, one per line: every call but health must send "
            "'authorization: Bearer <token>'. MNIST_AUTH_TOKEN (no flag) may hold one token instead."
        },
    )
    # A secret: from the environment only (a flag would show in `ps`), never printed by repr().
    auth_token: str | None = field(
        default=None, repr=False, metadata={"help": "Accepted bearer token.", "env_only": True}
    )

    def __post_init__(self) -> None:
        problems = []
        names = (self.model_name,) if isinstance(self.model_name, str) else tuple(self.model_name or ())
        object.__setattr__(self, "model_name", tuple(dict.fromkeys(n for n in names if n)))
        for name in self.model_name:
            if not is_model_name(name):
                problems.append(f"model name {name!r} is not a model directory's name (letters, "
                                "digits, '.', '_', '-', starting with a letter or digit)")
        if self.model_version and len(self.model_name) != 1:
            problems.append("--model-version pins a version of one model: give exactly one --model-name")
        if self.model_config is not None and (self.model_name or self.model_version or self.default_model):
            problems.append("--model-config lists the models, their versions and the default model: "
                            "leave out --model-name, --model-version and --default-model")
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if self.grace_period < 0:
            problems.append(f"grace period {self.grace_period} is negative")
        if self.max_images_per_request < 1:
            problems.append(f"max images per request {self.max_images_per_request} is below 1")
        if self.max_message_bytes < 1024:
            problems.append(f"max message bytes {self.max_message_bytes} is below 1024")
        if self.model_version < 0:
            problems.append(f"model version {self.model_version} is negative")
        if self.max_connection_age < 0:
            problems.append(f"max connection age {self.max_connection_age} is negative")
        if self.max_concurrent_streams < 1:
            problems.append(f"max concurrent streams {self.max_concurrent_streams} is below 1")
        if self.max_deallocating_streams < 0:
            problems.append(f"max deallocating streams {self.max_deallocating_streams} is negative")
        if self.handshake_timeout <= 0:
            problems.append(f"handshake timeout {self.handshake_timeout} is not positive")
        if self.max_connections < 0:
            problems.append(f"max connections {self.max_connections} is negative")
        for name in ("max_connection_idle", "keepalive_time", "min_ping_interval", "max_ping_strikes"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', ' ')} {getattr(self, name)} is negative")
        if self.keepalive_timeout <= 0:
            problems.append(f"keepalive timeout {self.keepalive_timeout} is not positive")
        if self.max_metadata_bytes < 1024:
            problems.append(f"max metadata bytes {self.max_metadata_bytes} is below 1024")
        if self.max_batch_size < 1:
            problems.append(f"max batch size {self.max_batch_size} is below 1")
        if self.max_queue_delay_ms < 0:
            problems.append(f"max queue delay {self.max_queue_delay_ms} ms is negative")
        if self.max_queued_images < self.max_images_per_request:
            problems.append(
                f"max queued images {self.max_queued_images} is below max images per request "
                f"{self.max_images_per_request}"
            )
        if self.max_picture_bytes < 1024:
            problems.append(f"max picture bytes {self.max_picture_bytes} is below 1024")
        if self.max_picture_request_bytes < self.max_picture_bytes:
            problems.append(
                f"max picture request bytes {self.max_picture_request_bytes} is below max picture "
                f"bytes {self.max_picture_bytes}")
        if self.max_picture_pixels < 28 * 28:
            problems.append(f"max picture pixels {self.max_picture_pixels} is below 784")
        if self.max_picture_decoded_bytes < 28 * 28 * 4:
            problems.append(f"max picture decoded bytes {self.max_picture_decoded_bytes} is below "
                            "3136 (a 28×28 picture in colour)")
        if not 1 <= self.picture_threads <= 64:
            problems.append(f"picture threads {self.picture_threads} is not in 1..64")
        if self.max_queued_pictures < 1:
            problems.append(f"max queued pictures {self.max_queued_pictures} is below 1")
        if self.inline_max_images < 0:
            problems.append(f"inline max images {self.inline_max_images} is negative")
        if self.reload_interval < 0:
            problems.append(f"reload interval {self.reload_interval} is negative")
        if not 0 < self.repository_timeout <= 86400:
            problems.append(f"repository timeout {self.repository_timeout} is not in (0, 86400] seconds")
        if self.removed_version_grace < 0:
            problems.append(f"removed version grace {self.removed_version_grace} is negative")
        if not 0 <= self.min_check_accuracy <= 1:
            problems.append(f"min check accuracy {self.min_check_accuracy} is not in [0, 1]")
        if not 0 <= self.max_regression <= 1:
            problems.append(f"max regression {self.max_regression} is not in [0, 1]")
        if self.keep_versions < 1:
            problems.append(f"keep versions {self.keep_versions} is below 1")
        if self.workers < 1:
            problems.append(f"workers {self.workers} is below 1")
        if self.worker_start_retries < 0:
            problems.append(f"worker start retries {self.worker_start_retries} is negative")
        if self.worker_heartbeat_timeout != 0 and not 2 <= self.worker_heartbeat_timeout <= 86400:
            problems.append(f"worker heartbeat timeout {self.worker_heartbeat_timeout} is not 0 (off) "
                            "or in [2, 86400] seconds")
        if self.inference not in INFERENCE_CHOICES:
            problems.append(f"inference {self.inference!r} is not one of {', '.join(INFERENCE_CHOICES)}")
        if self.log_format not in FORMATS:
            problems.append(f"log format {self.log_format!r} is not one of {', '.join(FORMATS)}")
        if self.access_log not in ACCESS_LOG_MODES:
            problems.append(f"access log {self.access_log!r} is not one of {', '.join(ACCESS_LOG_MODES)}")
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"metrics port {self.metrics_port} is not in -1..65535")
        elif self.metrics_port > 0 and self.metrics_port + self.workers - 1 > 65535:
            problems.append(f"metrics ports {self.metrics_port}+0..{self.workers - 1} exceed 65535")
        if not -1 <= self.http_port <= 65535:
            problems.append(f"http port {self.http_port} is not in -1..65535")
        if self.http_max_connections < 1:
            problems.append(f"http max connections {self.http_max_connections} is below 1")
        if self.http_max_connections_per_peer < 0:
            problems.append(f"http max connections per peer {self.http_max_connections_per_peer} "
                            "is negative")
        if not 0 < self.http_read_timeout <= 3600:
            problems.append(f"http read timeout {self.http_read_timeout} is not in (0, 3600] seconds")
        if not 0 <= self.low_confidence <= 1:
            problems.append(f"low confidence {self.low_confidence} is not in [0, 1]")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS plus client certs)")
        if not 0 <= self.tls_expiry_warning_days <= 3650:
            problems.append(f"tls expiry warning days {self.tls_expiry_warning_days} is not in [0, 3650]")
        if self.auth_token is not None and self.auth_token_file is not None:
            problems.append("set MNIST_AUTH_TOKEN or --auth-token-file, not both")
        elif self.auth_token is not None and not self.auth_token.strip():
            problems.append("MNIST_AUTH_TOKEN is set but empty")  # fail closed, never open
        if problems:
            raise ValueError("; ".join(problems))


SECRET_FLAG = "--auth-token"  # not a flag (the token is env- or file-only), but people try it


def unrecognized(words: Sequence[str]) -> str:
    """The usage error for words no flag took, without echoing a value: a value may be a secret
    (``--auth-token SECRET``), so only option names are shown and other words are counted."""
    names: list[str] = []
    values = 0
    after_secret = False
    for word in words:
        if word.startswith("--") and not after_secret:
            name = word.split("=", 1)[0]
            names.append(name)
            values += "=" in word
            after_secret = name == SECRET_FLAG and "=" not in word
        else:
            values += 1
            after_secret = False
    parts = [" ".join(names)] if names else []
    if values:
        parts.append(f"{values} value{'s' if values > 1 else ''} (not shown: values may be secrets)")
    message = "unrecognized arguments: " + " and ".join(parts)
    if SECRET_FLAG in names:
        message += (f"; the bearer token is never a flag (it would show in `ps`): set "
                    f"{env_name('auth_token')} or --auth-token-file")
    return message


class _Parser(Parser):
    """A config Parser, except that words no flag took are not echoed (argparse prints them all)."""

    def parse_args(  # type: ignore[override]  # only the (argv, namespace) form is used
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized(extras))
        return parsed


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The mnist-serve argument parser; defaults come from ``env`` (MNIST_*). No abbreviations:
    else `--auth-token SECRET` would pass as --auth-token-file (and be logged)."""
    parser = _Parser(
        prog="mnist-serve",
        env=env,
        description="Serve a published MNIST model over gRPC (Predict, Evaluate, GetModelInfo, "
        "health, reflection). Every flag can also be set by the environment variable shown.",
    )
    add_fields(parser, Settings)
    return parser


def load_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Parses flags (falling back to MNIST_* variables). Raises SystemExit(2) on a usage error and
    ValueError for values out of range."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    return Settings(**vars(args), **env_only(Settings, env))
