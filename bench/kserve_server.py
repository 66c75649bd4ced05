"""The best alternative of issue 3 as a benchmark row: KServe's ModelServer serving a published
model version over the Open Inference Protocol (KServe V2) on gRPC.

Runs in a virtual environment of its own (KServe pins its own grpcio, protobuf and FastAPI; see
``bench/kserve-venv.sh``) where this project is not installed: of it, it imports only the
framework-free core (standard library only) from the checkout's ``core/``, to read the version's
``metadata.json`` through ``digitserve.metadata`` and check the file it serves against its
SHA-256 there:

    out/kserve-venv/bin/python bench/kserve_server.py --model-dir out/bench-repo/mnist/1 --port 50090

The model, named after ``metadata.json``'s ``name``, takes one input ``images`` (FP32 in [0, 1] or
UINT8, shape [N, 784]) and answers ``probabilities`` (FP32, [N, 10]) as raw bytes, the way our
server's V2 edge does, so the same load tester drives both. ``--model-call``: ``tensorflow``, the
concrete function of a ``tf.function`` over ``model.keras`` (how issue 3's table measured the
alternatives, "a tf.function model call"), or ``litert``, the LiteRT flatbuffer our server serves
(XNNPACK, one thread), so that only the serving stacks differ. KServe binds gRPC on all interfaces
("[::]:PORT", its own choice); the benchmark calls it on 127.0.0.1. Its REST server (FastAPI on
uvicorn) listens on ``--http-port`` (a free port by default), where ``bench/rest.py`` calls it:
JSON in, JSON out, or binary data when the request asks for it.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


CORE = Path(__file__).resolve().parent.parent / "core"
"""The project's framework-free core, imported from the checkout (this venv does not install it)."""

Runner = Callable[[np.ndarray], np.ndarray]


def _tensorflow(path: Path, input_size: int) -> Runner:
    """The concrete function of a tf.function over the Keras model, batch dimension free."""
    import tensorflow as tf

    keras_model = tf.keras.models.load_model(path, compile=False)
    signature = tf.TensorSpec([None, *keras_model.input_shape[1:]], tf.float32)
    function = tf.function(lambda x: keras_model(x, training=False)).get_concrete_function(signature)
    row_shape = [int(d) for d in keras_model.input_shape[1:]]

    def run(images: np.ndarray) -> np.ndarray:
        out: np.ndarray = function(tf.constant(images.reshape(-1, *row_shape))).numpy()
        return out

    return run


def _litert(path: Path, input_size: int) -> Runner:
    """The LiteRT interpreter of the flatbuffer (XNNPACK, one thread), resized to each batch."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]["index"]
    rows = [-1]

    def run(images: np.ndarray) -> np.ndarray:
        if images.shape[0] != rows[0]:
            interpreter.resize_tensor_input(index, [images.shape[0], input_size], strict=False)
            interpreter.allocate_tensors()
            rows[0] = images.shape[0]
        interpreter.set_tensor(index, images)
        interpreter.invoke()
        out: np.ndarray = interpreter.get_tensor(output)
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a published model version")
    parser.add_argument("--port", type=int, required=True, help="gRPC port")
    parser.add_argument("--http-port", type=int, default=0,
                        help="REST port (the V2 protocol's REST binding; 0, the default: a free one)")
    parser.add_argument("--model-call", choices=["tensorflow", "litert"], default="tensorflow",
                        help="how the model is called (default: %(default)s)")
    args, _ = parser.parse_known_args(argv)
    sys.path.insert(0, str(CORE))
    from digitserve.metadata import Metadata
    from digitserve.repository import LITERT_FILE, MODEL_FILE, CorruptVersionError

    try:
        metadata = Metadata.read(args.model_dir)
        litert_file = metadata.inference.litert_file if metadata.inference else None
        file_name = MODEL_FILE if args.model_call == "tensorflow" else litert_file or LITERT_FILE
        metadata.verify_files(args.model_dir, only=[file_name])
        input_size = metadata.served_io()[0].size
    except CorruptVersionError as exc:
        print(exc, file=sys.stderr)
        return 1
    path = args.model_dir / file_name
    # KServe parses sys.argv when imported: leave it only the program name.
    sys.argv = sys.argv[:1]
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    name = metadata.name
    run = _tensorflow(path, input_size) if args.model_call == "tensorflow" else _litert(path, input_size)

    class Digits(kserve.Model):  # type: ignore[misc]  # kserve is not installed for mypy
        def __init__(self) -> None:
            super().__init__(name)

        def load(self) -> bool:
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            pixels = payload.inputs[0].as_numpy()
            images = pixels.reshape(-1, input_size)
            images = (images.astype(np.float32) / np.float32(255) if images.dtype == np.uint8
                      else images.astype(np.float32, copy=False))
            probabilities = run(np.ascontiguousarray(images))
            # Raw bytes over gRPC; over REST, JSON unless the request asked for binary data.
            binary = bool(payload.from_grpc or payload.use_binary_outputs)
            output = InferOutput("probabilities", list(probabilities.shape), "FP32")
            output.set_data_from_numpy(probabilities, binary_data=binary)
            return InferResponse(model_name=name, infer_outputs=[output], response_id=payload.id or "",
                                 use_binary_outputs=binary)

    model = Digits()
    model.load()
    logging.getLogger("kserve").info("serving %s from %s through %s", name, path, args.model_call)
    kserve.ModelServer(grpc_port=args.port, http_port=args.http_port or _free_port(), workers=1,
                       enable_latency_logging=False).start([model])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
