"""``mnist-client``: predict, evaluate, info, models and health against a running server, and
loadtest (the ``digitserve.loadtest`` package, imported only by that sub-command; it needs the
``loadtest`` extra). Each command that calls a model names it with ``--model-name`` ("": the
server's default model) and its version with ``--model-version`` or ``--label``.

Exit codes: 0 success; 1 an error the command could not get past, printed as one line (the server
cannot be reached, the server refused a call, a file is missing or unreadable, the accuracy is
below --min-accuracy, health is not SERVING); 2 a usage error (argparse's, or an extra the options
need is not installed); 3 ``predict --fail-below P``: the answer came, but its top probability is
below P (a guess a script should not trust); 141 the reader of its output left early (``| head``),
quietly, as ``cat`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from digitserve.client.client import (
    DEFAULT_TIMEOUT,
    EVALUATE_BATCH,
    DigitClient,
    EvaluateResult,
    PredictResult,
)
from digitserve.client.errors import (
    CallError,
    ConnectError,
    DigitServeError,
    NotServedError,
    UnimplementedError,
)
from digitserve.client.images import PREPROCESS, ImageError, is_picture, load_image
from digitserve.client.messages import message_dict
from digitserve.client.security import read_token, tls_credentials
from digitserve.config import Parser
from digitserve.extras import requirement_error
from digitserve.metadata import Metadata
from digitserve.pipes import quiet_on_broken_pipe
from digitserve.v1 import digit_service_pb2 as pb

PROG = "mnist-client"
EXIT_UNSURE = 3  # predict --fail-below: an answer, but below the probability asked for
WAIT_HELP = ("wait up to this many seconds for the server to accept connections (health: to "
             "report SERVING); 0: fail at once when it cannot be reached")
# The client's own variables for the model and label it asks for: MNIST_MODEL_NAME is the
# trainer's and the server's (the models it serves), and the image sets it for every command.
MODEL_NAME_ENV = "MNIST_CLIENT_MODEL_NAME"
LABEL_ENV = "MNIST_CLIENT_LABEL"


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    """The mnist-client parser: every option is also an MNIST_* variable (``env``, default
    os.environ); the load test's own options are MNIST_LOADTEST_*."""
    parser = Parser(prog=PROG, env=env, description="Call the MNIST gRPC server. Every option can "
                    "also be set by the environment variable shown.")
    parser.add_option(
        "--target", default="127.0.0.1:50051",
        help="server address host:port, or dns:///name:port for round_robin over its addresses",
    )
    parser.add_option("--timeout", type=float, default=DEFAULT_TIMEOUT,
                      help="deadline of each call in seconds")
    parser.add_option("--wait", type=float, default=0.0, default_text="0 (do not wait)",
                      help=WAIT_HELP)
    tls = parser.add_argument_group("security (TLS is on when any --tls* option is given)")
    parser.add_option("--tls", to=tls, action="store_true", default=False,
                      help="TLS, the server checked against the system's root certificates")
    parser.add_option("--tls-ca", to=tls, type=Path,
                      help="PEM CA that signed the server's certificate")
    parser.add_option("--tls-cert", to=tls, type=Path, env="MNIST_CLIENT_CERT",
                      help="PEM client certificate, for a server that requires one (mTLS)")
    parser.add_option("--tls-key", to=tls, type=Path, env="MNIST_CLIENT_KEY",
                      help="PEM private key of --tls-cert")
    parser.add_option("--token-file", to=tls, type=Path,
                      help="file whose first line is the bearer token sent with every call")
    sub = parser.add_subparsers(dest="command", required=True)

    def model(p: Parser, what: str = "the model to ask") -> None:
        p.add_option("--model-name", env=MODEL_NAME_ENV, default="",
                     default_text="'' (the server's default model)", help=what)

    def version(p: Parser) -> None:
        pin = p.add_mutually_exclusive_group()
        p.add_option("--model-version", to=pin, env="MNIST_MODEL_VERSION", type=int, default=0,
                     help="pin a version (0 = served)")
        p.add_option("--label", to=pin, env=LABEL_ENV, default="",
                     default_text="'' (the model's default version)",
                     help="ask the version a version label names (stable, canary, ...) instead "
                     "of pinning one")

    def split(p: Parser) -> None:
        p.add_option("--split", default="t10k", choices=["t10k", "train"], help="IDX set")

    p = sub.add_parser("predict", help="predict one image and print the class probabilities")
    src = p.add_mutually_exclusive_group(required=True)
    p.add_option("--image", to=src, type=Path, default_text="required, or --data-dir",
                 help="a PNG/JPEG picture of a digit (a photo, a scan, a drawing) or a .npy array")
    p.add_option("--data-dir", to=src, type=Path, default_text="required, or --image",
                 help="a directory of IDX files; with --index")
    p.add_option("--index", type=int, default=0, help="image index in the IDX set")
    split(p)
    model(p)
    version(p)
    p.add_option("--preprocess", default="client", choices=list(PREPROCESS),
                 help="who turns a --image picture into the model's pixels, with the same code "
                 "(digitserve.pictures): client (here: 784 bytes travel instead of the picture, any "
                 "server version takes them, a bad file fails before any call) or server (the "
                 "picture's bytes are sent as Image.encoded)")
    p.add_option("--low-confidence", type=float, default_text="the server's --low-confidence",
                 help="warn on stderr when the top probability is below this")
    p.add_option("--fail-below", type=float, default=0.0, default_text="0 (never)",
                 help=f"exit {EXIT_UNSURE} when the top probability is below this (one line on "
                 "stderr), so that a script does not trust a guess")
    p.add_option("--json", action="store_true", default=False, help="print a JSON object")

    e = sub.add_parser("evaluate", help="stream a labelled IDX test set and print the metrics")
    e.add_option("--data-dir", type=Path, required=True, help="directory with t10k-* IDX files")
    split(e)
    e.add_option("--batch-size", type=int, default=EVALUATE_BATCH, env="MNIST_EVALUATE_BATCH_SIZE",
                 help="images per message")  # MNIST_BATCH_SIZE is the trainer's
    e.add_option("--limit", type=int, default=0,
                 help="evaluate only the first N images (0: all)")
    model(e)
    version(e)
    e.add_option("--min-accuracy", type=float, default=0.0,
                 help="exit 1 when the accuracy is below this")
    e.add_option("--plot", type=Path, help="draw the confusion matrix into this PNG")
    e.add_option("--json", action="store_true", default=False, help="print a JSON object")

    i = sub.add_parser("info", help="print what the server says of the model: version, input, "
                       "labels, inference path, loaded and refused versions, version labels and "
                       "the state of its versions")
    model(i)
    version(i)
    i.add_option("--json", action="store_true", default=False,
                 help="print GetModelInfo's response as one JSON object: its fields by their "
                 "proto names, metadata_json parsed as 'metadata'")

    m = sub.add_parser("models", help="print the repository state: each model's state, default "
                       "version, version labels, canary weight, version policy and versions "
                       "(serving: loaded; available; refused and why)")
    model(m, "only this model")
    m.add_option("--json", action="store_true", default=False,
                 help="print ListModels's response as one JSON object: its fields by their proto "
                 "names, enums by name, labels as an object")

    h = sub.add_parser("health", help="exit 0 if the server reports SERVING")
    h.add_option("--service", default="", default_text="'' (the whole server)",
                 help="service name")
    # The top level's --wait, also accepted after `health` (where it always was): one option,
    # one variable; SUPPRESS leaves the top level's value unless it is given here.
    h.add_option("--wait", type=float, default=argparse.SUPPRESS, default_text="0 (ask once)",
                 help=WAIT_HELP)
    h.add_option("--json", action="store_true", default=False, help="print a JSON object")

    lt = sub.add_parser("loadtest", help="drive Predict with load; print throughput, latency, "
                        "errors and accuracy", env_prefix="MNIST_LOADTEST_")
    shape = lt.add_mutually_exclusive_group()
    lt.add_option("--concurrency", to=shape, type=int, default=1,
                  help="closed loop: calls kept in flight")
    lt.add_option("--rate", to=shape, type=float, default=0.0,
                  help="open loop: requests per second, sent on schedule whatever the answers")
    stop = lt.add_mutually_exclusive_group()
    lt.add_option("--duration", to=stop, type=float, default_text="10",
                  help="seconds to run")
    lt.add_option("--requests", to=stop, type=int, default=0,
                  help="number of requests to send (0: run for --duration)")
    lt.add_option("--data-dir", env="MNIST_DATA_DIR", type=Path, required=True,
                  help="directory with t10k-* IDX files")
    lt.add_option("--split", env="MNIST_SPLIT", default="t10k", choices=["t10k", "train"],
                  help="IDX set")
    lt.add_option("--batch", type=int, default=1, help="images per request")
    lt.add_option("--encoding", default="uint8", choices=["uint8", "float32"],
                  help="pixel encoding on the wire")
    model(lt, "the model the requests name (--protocol oip: by default the one ListModels says is "
          "the default; V2 servers other than mnist-serve need one)")
    version(lt)
    lt.add_option("--processes", type=int, default=0, default_text="0 (automatic)",
                  help="load processes, each with its own channels (0: 1 for light loads, up to "
                  "one per two CPUs for heavy ones, leaving the rest to a local server)")
    lt.add_option("--connections", type=int, default_text="8",
                  help="connections per load process: SO_REUSEPORT spreads connections, not "
                  "calls, over a server's workers, so a few per worker keep them evenly loaded")
    lt.add_option("--engine", default="h2", choices=["h2", "grpc"],
                  help="how calls are made: h2, the tester's own HTTP/2 framing of pre-serialized "
                  "requests (under half of grpc.aio's CPU per call, so more is left to a local "
                  "server), or grpc, grpc.aio as the client library uses it; h2 takes host:port "
                  "targets")
    lt.add_option("--protocol", default="digitserve", choices=["digitserve", "oip"],
                  help="digitserve: this API's Predict; oip: the Open Inference Protocol's (KServe "
                  "V2) ModelInfer, raw pixels as input 'images', answers read from output "
                  "'probabilities' — our server's V2 edge, or KServe and others serving a model "
                  "with those names")
    lt.add_option("--max-outstanding", type=int, default=1000,
                  help="open loop: most calls in flight")
    lt.add_option("--no-verify", dest="verify", action="store_false", default=True,
                  env="MNIST_LOADTEST_VERIFY", default_text="on (answers are decoded)",
                  help="do not decode answers (no accuracy; a little less client CPU): only "
                  "the model and version of each are read, for the version mix")
    lt.add_option("--min-accuracy", env="MNIST_MIN_ACCURACY", type=float, default=0.0,
                  help="exit 1 when the accuracy of the answers is below this")
    lt.add_option("--plot", type=Path,
                  help="draw the latency histogram and the throughput over time into this PNG")
    lt.add_option("--json", env="MNIST_JSON", action="store_true", default=False,
                  help="print a JSON object")
    return parser


class CliError(DigitServeError):
    """An error to print as one line, exit 1."""


def _load_split(data_dir: Path, split: str) -> Any:
    from digitserve.idx import IdxError, load_split

    try:
        return load_split(data_dir, split)
    except IdxError as exc:
        raise CliError(str(exc)) from exc


def _probability(name: str, value: float | None) -> None:
    if value is not None and not 0 <= value <= 1:
        raise CliError(f"{name} {value} is not a probability; expected a value in [0, 1]")


def cmd_predict(client: DigitClient, args: argparse.Namespace) -> int:
    _probability("--low-confidence", args.low_confidence)
    _probability("--fail-below", args.fail_below)
    if args.image is not None:
        if is_picture(args.image) and not args.image.is_file():
            raise ImageError(f"{args.image}: no such file")
        image = args.image if is_picture(args.image) else load_image(args.image)
        result = client.predict(image, model_version=args.model_version, model_name=args.model_name,
                                label=args.label, preprocess=args.preprocess,
                                low_confidence=args.low_confidence)
        return _report(client, args, result, str(args.image), None)
    split = _load_split(args.data_dir, args.split)
    if not 0 <= args.index < split.images.shape[0]:
        raise CliError(
            f"--index {args.index} is out of range: {split.images_path} holds "
            f"{split.images.shape[0]} images"
        )
    result = client.predict(split.images[args.index].reshape(-1), model_version=args.model_version,
                            model_name=args.model_name, label=args.label,
                            low_confidence=args.low_confidence)
    return _report(client, args, result, f"{split.images_path}[{args.index}]",
                   int(split.labels[args.index]))


def _report(client: DigitClient, args: argparse.Namespace, result: PredictResult, source: str,
            true_label: int | None) -> int:
    """Prints one prediction; a low-confidence answer gets a warning line on stderr, and one
    below --fail-below an error line and exit EXIT_UNSURE."""
    probs = result.probabilities[0]
    top, low = result.top_probabilities[0], result.low_confidence[0]
    threshold = result.low_confidence_threshold
    whose = "--low-confidence" if args.low_confidence is not None else "the server's --low-confidence"
    if args.json:
        print(json.dumps({
            "source": source, "probabilities": [float(p) for p in probs],
            "class_index": result.class_indices[0], "label": result.labels[0],
            "true_label": true_label, "model_name": result.model_name,
            "model_version": result.model_version, "low_confidence": low,
            "low_confidence_threshold": threshold}))
    else:
        print(f"{source} → model {result.model_name} v{result.model_version}")
        for k, p in enumerate(probs):
            print(f"  class {k:>2} {float(p):9.6f} {'█' * round(float(p) * 40)}")
        print(f"predicted: {result.labels[0]} (p={top:.4f})"
              + ("" if true_label is None else f", true label: {true_label}"))
    answer = f"top probability {top:.4f} (label {result.labels[0]})"
    if top < args.fail_below:
        print(f"{PROG}: error: {answer} is below --fail-below {args.fail_below:g}", file=sys.stderr)
        return EXIT_UNSURE
    if low:
        print(f"{PROG}: warning: low confidence: {answer} is below {threshold:g} ({whose}); the "
              "answer may be a guess", file=sys.stderr)
    return 0


def format_confusion(result: EvaluateResult) -> str:
    """The confusion matrix as a text table: rows = true label, columns = predicted."""
    width = max(5, *(len(str(v)) + 1 for row in result.confusion_matrix for v in row))
    head = "true\\pred".rjust(9) + "".join(label.rjust(width) for label in result.labels)
    lines = [head]
    for label, row in zip(result.labels, result.confusion_matrix, strict=True):
        lines.append(label.rjust(9) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def cmd_evaluate(client: DigitClient, args: argparse.Namespace) -> int:
    split = _load_split(args.data_dir, args.split)
    images, labels = split.images, split.labels
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    if args.batch_size < 1:
        raise CliError(f"--batch-size {args.batch_size} must be at least 1")
    from tqdm import tqdm

    with tqdm(total=images.shape[0], unit="img", desc="evaluate", file=sys.stderr,
              disable=None) as bar:
        result = client.evaluate(
            images, labels, batch_size=args.batch_size, model_version=args.model_version,
            model_name=args.model_name, label=args.label, progress=bar.update,
        )
    if args.plot is not None:
        from digitserve.plots import plot_confusion_matrix

        plot_confusion_matrix(args.plot, result.confusion_matrix, result.labels,
                              title=f"{result.model_name} v{result.model_version}, evaluated by mnist-client")
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"model {result.model_name} v{result.model_version}: {result.count} images, "
              f"accuracy {result.accuracy:.4%}, mean cross-entropy {result.mean_cross_entropy:.4f}")
        print(format_confusion(result))
        print("class precision recall     f1 support")
        for c in result.per_class:
            print(f"{c['label']:>5} {c['precision']:9.4f} {c['recall']:6.4f} {c['f1']:6.4f} "
                  f"{c['support']:7d}")
        if args.plot is not None:
            print(f"confusion matrix plot: {args.plot}")
    return _below_min_accuracy(result.accuracy, args.min_accuracy)


def _below_min_accuracy(accuracy: float | None, minimum: float) -> int:
    """1, after a line saying so, when ``accuracy`` is below ``--min-accuracy``; else 0."""
    if accuracy is None or accuracy >= minimum:
        return 0
    print(f"{PROG}: error: accuracy {accuracy:.4f} is below --min-accuracy {minimum}", file=sys.stderr)
    return 1


def info_json(response: Message) -> dict[str, Any]:
    """A response as JSON values (``messages.message_dict``: fields by their proto names, int64 as
    numbers); ``metadata_json`` (GetModelInfo's metadata.json text) is parsed, as ``metadata``."""
    return {("metadata" if key == "metadata_json" else key):
            ((json.loads(value) if value else None) if key == "metadata_json" else value)
            for key, value in message_dict(response).items()}


def _state(enum: Any, value: int) -> str:
    """An enum value's name without its type's prefix (MODEL_STATE_SERVING -> SERVING); the
    number of one newer than this client."""
    name: str = enum.Name(value) if value in enum.values() else str(value)
    prefix = enum.keys()[0].removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def _labels(labels: Mapping[str, int]) -> str:
    return ", ".join(f"{label} → {labels[label]}" for label in sorted(labels))


def _repository_lines(response: pb.GetModelInfoResponse,
                      models: pb.ListModelsResponse | None) -> list[str]:
    """What ListModels says of the model ``info`` shows: its state, labels, canary weight and the
    state of each version (None: the server does not implement ListModels)."""
    own = ", ".join(response.version_labels) or "none"
    if models is None:
        return [f"version labels:   this version: {own}",
                "model state:      not reported (the server does not implement ListModels)"]
    status = next((m for m in models.models if m.name == response.model_name), None)
    if status is None:
        return [f"version labels:   this version: {own}",
                f"model state:      not reported (ListModels does not list {response.model_name!r})"]
    state = _state(pb.ModelState, status.state)
    default = f"default version {status.default_version}" if status.default_version else \
        "no default version"
    canary = status.labels.get("canary")
    lines = [
        f"model state:      {state}, {default}" + (f": {status.reason}" if status.reason else ""),
        "version labels:   " + (f"{_labels(status.labels)} (this version: {own})"
                                 if status.labels else "none"),
        "canary weight:    " + (f"{_percent(status.canary_weight)} of unpinned calls go to version "
                                f"{canary} (label canary)" if status.canary_weight and canary
                                else "none"),
        "versions:         " + (", ".join(f"{v.version} {_state(pb.VersionState, v.state)}"
                                          for v in status.versions) or "none"),
    ]
    return lines


def format_info(response: pb.GetModelInfoResponse,
                models: pb.ListModelsResponse | None = None) -> str:
    """GetModelInfo's answer as text: each field of the response on a line of its own, what
    ListModels says of the model (``models``; None: the server does not implement it), and from
    its metadata.json what tells versions apart (check set, training time, library versions)."""
    metadata = (Metadata.from_json(json.loads(response.metadata_json), "the server's metadata_json")
                if response.metadata_json else None)
    shape = "×".join(str(d) for d in response.input_shape)
    scale = response.input_scale
    scale_text = "1/255" if abs(scale - 1 / 255) < 1e-12 else f"{scale:g}"
    loaded = ", ".join(str(v) for v in response.loaded_versions) or "none"
    lines = [
        f"model:            {response.model_name} version {response.model_version}",
        f"inference path:   {response.inference_path or 'not reported'}",
        f"preset:           {response.preset or 'not recorded'}",
        f"test accuracy:    {response.test_accuracy:.4%} (at training)",
        f"input:            {shape} pixels ({response.input_size} per image); "
        f"float pixel = byte × {scale_text}",
        f"labels:           {' '.join(response.labels)}",
        f"created at:       {response.created_at or 'not recorded'}",
        f"max images:       {response.max_images_per_request} per Predict request or Evaluate "
        "message",
        f"loaded versions:  {loaded} (newest first; --model-version pins one)",
    ]
    refused = response.refused_versions
    lines.append(f"refused versions: {'none' if not refused else ''}".rstrip())
    lines.extend(f"  {r.version}: {r.reason}" for r in refused)
    lines.extend(_repository_lines(response, models))
    if metadata is not None:
        if metadata.check_set is not None and metadata.check_set.count is not None:
            accuracy = metadata.check_set.accuracy
            lines.append(f"check set:        {metadata.check_set.count} images"
                         + ("" if accuracy is None else f", accuracy {accuracy:.4%}"))
        if metadata.train_seconds is not None:
            lines.append(f"training time:    {metadata.train_seconds:.1f} s")
        if metadata.versions:
            lines.append("trained with:     "
                         + ", ".join(f"{k} {v}" for k, v in sorted(metadata.versions.items())))
    lines.append("metadata.json:    in full with --json")
    return "\n".join(lines)


def _list_models(client: DigitClient, model_name: str) -> pb.ListModelsResponse | None:
    """ListModels, or None from a server that does not implement it (one older than the model
    repository server, or another implementation of the API)."""
    try:
        return client.list_models(model_name)
    except UnimplementedError:
        return None


def cmd_info(client: DigitClient, args: argparse.Namespace) -> int:
    response = client.get_model_info(model_version=args.model_version, model_name=args.model_name,
                                     label=args.label)
    if args.json:
        print(json.dumps(info_json(response), indent=2))
        return 0
    print(format_info(response, _list_models(client, response.model_name)))
    return 0


def format_models(response: pb.ListModelsResponse) -> str:
    """ListModels's answer as a table: a row per model (state, default version, version labels,
    canary weight), under it its version policy and the versions loaded, and a line per version
    (state, the labels naming it, why it was refused); then the default model and the model
    config file."""
    rows = [("MODEL", "STATE", "DEFAULT", "LABELS", "CANARY")]
    for m in response.models:
        rows.append((m.name, _state(pb.ModelState, m.state),
                     str(m.default_version) if m.default_version else "–",
                     _labels(m.labels) or "–", _percent(m.canary_weight) if m.canary_weight else "–"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()

    lines = [line(rows[0])]
    for m, row in zip(response.models, rows[1:], strict=True):
        lines.append(line(row))
        if m.reason:
            lines.append(f"  reason: {m.reason}")
        if m.version_policy:  # (a server before version policies: not said)
            lines.append(f"  version policy: {m.version_policy} (loaded: "
                         + (", ".join(str(v.version) for v in m.versions
                                      if v.state == pb.VERSION_STATE_SERVING) or "none") + ")")
        number = max((len(str(v.version)) for v in m.versions), default=1)
        for v in m.versions:
            state = _state(pb.VersionState, v.state)
            detail = ", ".join(v.labels) if state != "REFUSED" else v.reason
            if state == "REFUSED" and v.labels:
                detail = f"{', '.join(v.labels)}; {detail}"
            lines.append(f"  version {str(v.version).rjust(number)}  {state.ljust(9)}  "
                         f"{detail}".rstrip())
    if not response.models:
        lines.append("(no models: none is published in the repository yet)")
    lines.append("default model: " + (response.default_model or
                                      "none (requests must name one: --model-name)"))
    if response.config_path:
        lines.append(f"model config:  {response.config_path}" + (
            f" (its last change was not applied: {response.config_error})"
            if response.config_error else ""))
    return "\n".join(lines)


def cmd_models(client: DigitClient, args: argparse.Namespace) -> int:
    response = _list_models(client, args.model_name)
    if response is None:
        raise CliError(f"{client.target} does not implement ListModels (a server older than the "
                       "model repository server, or another implementation); `info` shows what "
                       "it serves")
    print(json.dumps(message_dict(response), indent=2) if args.json else format_models(response))
    return 0


def cmd_health(client: DigitClient, args: argparse.Namespace) -> int:
    try:
        if args.wait > 0:
            started = time.monotonic()
            client.wait_for_server(args.wait)
            status = client.wait_until_serving(args.wait - (time.monotonic() - started),
                                               args.service)
        else:
            status = client.health(args.service)
    except NotServedError as exc:
        # The server names the services it knows; one that does not still gets a line.
        raise CliError(exc.details() or f"no such health service {args.service!r}") from exc
    print(json.dumps({"target": client.target, "service": args.service, "status": status})
          if args.json else status)
    return 0 if status == "SERVING" else 1


def _v2_model_name(client: DigitClient, args: argparse.Namespace) -> str:
    """The model V2 requests name: ``--model-name``, else the server's default model (ListModels):
    the protocol has no default model, every request names one."""
    if args.protocol != "oip" or args.model_name:
        return str(args.model_name)
    models = _list_models(client, "")
    if models is None:
        raise CliError(f"--protocol oip names the model in every request: give --model-name "
                       f"({client.target} does not implement ListModels to say its default model)")
    if not models.default_model:
        served = ", ".join(m.name for m in models.models) or "none yet"
        raise CliError(f"--protocol oip names the model in every request and {client.target} has "
                       f"no default model: give --model-name (served: {served})")
    return models.default_model


def cmd_loadtest(client: DigitClient, args: argparse.Namespace) -> int:
    from digitserve import loadtest

    split = _load_split(args.data_dir, args.split)
    requests_cap = 3600.0  # a count-limited closed loop still ends within an hour
    config = loadtest.LoadConfig(
        target=client.target, concurrency=args.concurrency, rate=args.rate,
        duration=args.duration or (requests_cap if args.requests else 10.0),
        requests=args.requests, timeout=args.timeout, connect_timeout=args.timeout,
        processes=args.processes or loadtest.default_processes(args.concurrency, args.rate),
        connections=loadtest.DEFAULT_CONNECTIONS if args.connections is None else args.connections,
        max_outstanding=args.max_outstanding, verify=args.verify, engine=args.engine)
    workload = loadtest.build_workload(split.images, split.labels, batch=args.batch,
                                       encoding=args.encoding, model_version=args.model_version,
                                       protocol=args.protocol,
                                       model_name=_v2_model_name(client, args), label=args.label)
    if args.wait <= 0:  # as every other command: nothing listening is one line at once
        client.check_server()
    result = loadtest.run(config, workload, progress=not args.json)
    if args.plot is not None:
        from digitserve.client.plots import plot_loadtest

        mode = f"rate {args.rate:g}/s" if args.rate else f"concurrency {args.concurrency}"
        plot_loadtest(args.plot, result.latencies_ms, result.completion_times_s,
                      title=f"mnist-client loadtest → {client.target}: {mode}, batch {args.batch}")
    print(json.dumps(result.to_dict()) if args.json else loadtest.format_result(result))
    if args.plot is not None and not args.json:
        print(f"plot: {args.plot}")
    failures = loadtest.error_summary(result)
    if failures is not None:
        print(f"{PROG}: error: {failures}", file=sys.stderr)
        return 1
    return _below_min_accuracy(result.accuracy, args.min_accuracy)


COMMANDS = {"predict": cmd_predict, "evaluate": cmd_evaluate, "info": cmd_info,
            "models": cmd_models, "health": cmd_health, "loadtest": cmd_loadtest}


def _security(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str | None]:
    use_tls = args.tls or any(p is not None for p in (args.tls_ca, args.tls_cert, args.tls_key))
    credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key) if use_tls else None
    token = None if args.token_file is None else read_token(args.token_file)
    if args.command == "loadtest" and (credentials is not None or token is not None):
        raise CliError("loadtest opens its own plaintext channels: it does not take --tls* or "
                       "--token-file yet")
    return credentials, token


def main(argv: Sequence[str] | None = None) -> int:
    """The command's exit code; 141 without a traceback when stdout's reader left early
    (``mnist-client info | head -3``: ``digitserve.pipes``)."""
    return quiet_on_broken_pipe(lambda: run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs its command: each error one line on stderr and its exit code."""
    args = build_parser().parse_args(argv)
    # Extras the command needs: before anything imports what they provide, before any work (not
    # after evaluating 10,000 images).
    needs = [("loadtest", "loadtest")] if args.command == "loadtest" else []
    if getattr(args, "plot", None) is not None:
        needs.append(("plot", "--plot"))
    for extra, what in needs:
        if (unmet := requirement_error(PROG, extra, what)) is not None:
            print(unmet, file=sys.stderr)
            return 2
    try:
        credentials, token = _security(args)
        with DigitClient(args.target, timeout=args.timeout, credentials=credentials,
                         token=token) as client:
            if args.wait > 0 and args.command != "health":  # health waits for SERVING itself
                client.wait_for_server(args.wait)
            return COMMANDS[args.command](client, args)
    except ConnectError as exc:
        line = str(exc)
    except CallError as exc:  # the server refused a call
        line = f"{args.target}: {exc.code().name}: {exc.details()}"
    except DigitServeError as exc:  # CliError, ImageError, ClientSecurityError, LoadTestError
        line = str(exc)
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
