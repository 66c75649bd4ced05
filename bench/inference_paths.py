"""Measures the ways to call a saved Keras model (model.predict, calling the model, tf.function,
its concrete function, XLA with padding to fixed batch sizes, LiteRT with XNNPACK) and checks each
against model.predict.

    python -m bench.inference_paths --model-dir models/mnist/1 [--repeat 300] [--data-dir data]

Prints one row per path and batch size: microseconds per call, the ratio to the fastest path at
that batch size, and the largest absolute difference from model.predict's probabilities.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from digitserve.metadata import Metadata

Fn = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]

# Batch sizes that the XLA path pads to, so that it compiles a handful of shapes only.
PADDED_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def pad_to_bucket(images: npt.NDArray[np.float32], buckets: tuple[int, ...]) -> npt.NDArray[np.float32]:
    """Pads a batch with zero images up to the next bucket size (batches above the largest bucket
    are padded to a multiple of it)."""
    n = images.shape[0]
    size = next((b for b in buckets if b >= n), -(-n // buckets[-1]) * buckets[-1])
    if size == n:
        return images
    padded = np.zeros((size, images.shape[1]), dtype=images.dtype)
    padded[:n] = images
    return padded


def paths(keras_model: object, input_size: int) -> dict[str, Fn]:
    import tensorflow as tf

    model = keras_model
    spec = tf.TensorSpec(shape=(None, input_size), dtype=tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])  # type: ignore[operator]
    concrete = fn.get_concrete_function()
    xla = tf.function(lambda x: model(x, training=False), jit_compile=True)  # type: ignore[operator]

    def padded_xla(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        padded = pad_to_bucket(x, PADDED_BATCH_SIZES)
        return np.asarray(xla(padded))[: x.shape[0]]

    from digitserve.inference import LiteRTRunner

    litert = LiteRTRunner.convert(model)
    return {
        "model.predict": lambda x: model.predict(x, verbose=0),  # type: ignore[attr-defined]
        "model(x)": lambda x: np.asarray(model(x, training=False)),  # type: ignore[operator]
        "tf.function": lambda x: np.asarray(fn(x)),
        "concrete function": lambda x: np.asarray(concrete(tf.constant(x))),
        "XLA, padded": padded_xla,
        "LiteRT (XNNPACK, 1 thread)": litert,
        "concrete function, image by image": lambda x: np.concatenate(
            [np.asarray(concrete(tf.constant(x[i : i + 1]))) for i in range(x.shape[0])]),
    }


def time_call(fn: Fn, x: npt.NDArray[np.float32], repeat: int) -> float:
    for _ in range(3):
        fn(x)
    started = time.perf_counter()
    for _ in range(repeat):
        fn(x)
    return (time.perf_counter() - started) / repeat * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a published version dir")
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--batch-sizes", default="1,8,64,256")
    parser.add_argument("--data-dir", type=Path,
                        help="also compare the served paths with model.predict on the real MNIST "
                        "test set (IDX files in DIR)")
    args = parser.parse_args(argv)

    from digitserve.inference import KerasModel

    served = KerasModel.load(args.model_dir)
    keras_model = served.keras_model
    size = served.spec.input_size
    rng = np.random.default_rng(0)
    candidates = paths(keras_model, size)
    candidates[f"served (KerasModel.predict: {served.inference_path})"] = served.predict
    print(f"model {args.model_dir}: {Metadata.from_json(served.metadata).preset} preset; "
          f"{served.agreement.describe()}")
    print("| path | batch | µs per call | × fastest | max abs diff vs model.predict |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        x = (rng.integers(0, 256, size=(batch, size)).astype(np.float32) / np.float32(255))
        reference = candidates["model.predict"](x)
        rows = []
        for name, fn in candidates.items():
            slow = name in ("model.predict", "model(x)") or "image by image" in name
            repeat = max(5, args.repeat // 20) if slow else args.repeat
            micros = time_call(fn, x, repeat)
            diff = float(np.abs(fn(x) - reference).max())
            rows.append((name, micros, diff))
        fastest = min(m for _, m, _ in rows)
        for name, micros, diff in rows:
            print(f"| {name} | {batch} | {micros:,.0f} | {micros / fastest:.1f} | {diff:.1e} |")
    if args.data_dir is not None:
        test_set_agreement(keras_model, candidates, args.data_dir)
    return 0


def test_set_agreement(keras_model: object, candidates: dict[str, Fn], data_dir: Path) -> None:
    """Each path's largest difference from model.predict over the whole test set, in 1000-image
    batches and image by image, and how many top classes differ."""
    from digitserve.idx import load_split, scale_pixels

    split = load_split(data_dir, "t10k")
    x = scale_pixels(split.images.reshape(split.images.shape[0], -1))
    reference = np.asarray(keras_model.predict(x, verbose=0))  # type: ignore[attr-defined]
    print(f"\nOn the {x.shape[0]:,} test images, against model.predict (batches of 32):")
    print("| path | calls of | max abs diff | values above 1e-6 | top class differs |")
    print("|---|---|---|---|---|")
    for name in ("concrete function", "LiteRT (XNNPACK, 1 thread)"):
        fn = candidates[name]
        for size in (1000, 1):
            got = np.concatenate([fn(x[i : i + size]) for i in range(0, x.shape[0], size)])
            diff = np.abs(got - reference)
            flips = int((got.argmax(axis=1) != reference.argmax(axis=1)).sum())
            print(f"| {name} | {size} image{'s' if size > 1 else ''} | {diff.max():.2e} | "
                  f"{int((diff > 1e-6).sum())} | {flips} |")


if __name__ == "__main__":
    raise SystemExit(main())
