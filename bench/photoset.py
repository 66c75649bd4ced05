"""The photo set: MNIST test digits drawn as photos of dark ink on paper, and the accuracy a served
model reaches on them through the encoded-image path.

    python -m bench.photoset generate --data-dir data --out /tmp/photoset [--count 1000] [--seed 0]
    python -m bench.photoset measure --dir /tmp/photoset --target 127.0.0.1:50051 \\
        [--preprocess server|client] [--json]
    python -m bench.photoset cost --dir /tmp/photoset [--repeat 3]

``generate`` draws each of the first ``--count`` official test images (t10k) as dark ink (grey
20–50) onto a light canvas of 200–640 px a side (width and height drawn separately, so aspect
ratios vary) lit by a linear gradient from 140 to 230 grey in a random direction, the digit at a
random scale (30–90 % of the short side) and offset, with Gaussian noise of σ = 8; even indices
are saved as PNG, odd ones as JPEG of quality 70 (both RGB, as a camera's). Seeded: the same
arguments write the same bytes. ``labels.csv`` lists file and true label.

``measure`` asks a running server for each picture, ``--preprocess server`` (the default) sending
the file's bytes as ``Image.encoded`` (the server decodes and preprocesses them), ``client``
preprocessing them here with ``digitserve.client.images.load_image`` and sending 784 pixels (run
with an older checkout's source roots first on PYTHONPATH, this measures its preprocessing). It
prints the accuracy over all pictures and over the PNG and the JPEG halves.

``cost`` times ``digitserve.pictures.from_bytes`` (decode and preprocess: what the server's picture
threads do per picture) on each picture in this process, one thread, best of ``--repeat``, and on a
12-megapixel phone-sized photo (4032×3024, the set's first picture scaled up) as JPEG and PNG:
milliseconds of CPU per picture, median and 90th percentile by format.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

LABELS_FILE = "labels.csv"
BATCH = 32  # pictures per Predict call in measure


def draw(digit: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """One MNIST digit (28×28, white on black) as a grey photo of dark ink on lit paper."""
    from PIL import Image

    width, height = (int(v) for v in rng.integers(200, 641, size=2))
    side = max(28, round(min(width, height) * rng.uniform(0.3, 0.9)))
    glyph = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR),
                       dtype=np.float64) / 255.0
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    ink = np.zeros((height, width))
    ink[top : top + side, left : left + side] = glyph
    angle = rng.uniform(0, 2 * np.pi)  # the direction the light grows in
    yy, xx = np.mgrid[0:height, 0:width]
    along = np.cos(angle) * xx + np.sin(angle) * yy
    along = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    paper = 140.0 + 90.0 * along
    dark = rng.uniform(20, 50)
    picture = paper * (1 - ink) + dark * ink + rng.normal(0.0, 8.0, size=ink.shape)
    drawn: npt.NDArray[np.uint8] = np.clip(np.rint(picture), 0, 255).astype(np.uint8)
    return drawn


def encode(picture: npt.NDArray[np.uint8], jpeg: bool) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    image = Image.fromarray(picture).convert("RGB")
    if jpeg:
        image.save(out, format="JPEG", quality=70)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def generate(data_dir: Path, out: Path, count: int, seed: int) -> list[tuple[str, int]]:
    from digitserve.idx import load_split

    split = load_split(data_dir, "t10k")
    if not 1 <= count <= len(split):
        raise SystemExit(f"photoset: --count {count} is not in 1..{len(split)}")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int]] = []
    for i in range(count):
        jpeg = i % 2 == 1
        name = f"{i:05d}.{'jpg' if jpeg else 'png'}"
        (out / name).write_bytes(encode(draw(split.images[i], rng), jpeg))
        rows.append((name, int(split.labels[i])))
    with (out / LABELS_FILE).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(rows)
    return rows


def read_labels(directory: Path) -> list[tuple[Path, int]]:
    path = directory / LABELS_FILE
    if not path.is_file():
        raise SystemExit(f"photoset: {path}: no such file; run `python -m bench.photoset generate` "
                         "first")
    with path.open(newline="") as f:
        return [(directory / row["file"], int(row["label"])) for row in csv.DictReader(f)]


def measure(directory: Path, target: str, preprocess: str, timeout: float) -> dict[str, Any]:
    from digitserve.client.client import DigitClient

    items = read_labels(directory)
    predicted: list[int] = []
    started = time.perf_counter()
    with DigitClient(target, timeout=timeout) as client:
        for start in range(0, len(items), BATCH):
            paths = [path for path, _ in items[start : start + BATCH]]
            if preprocess == "server":
                result = client.predict([p.read_bytes() for p in paths], preprocess="server")
            else:  # as every version of the client can: its own preprocessing, then pixels
                from digitserve.client.images import load_image

                result = client.predict(np.stack([load_image(p) for p in paths]))
            predicted.extend(int(result.labels[k]) for k in range(len(paths)))
    seconds = time.perf_counter() - started
    truth = np.array([label for _, label in items])
    right = np.array(predicted) == truth
    jpeg = np.array([path.suffix == ".jpg" for path, _ in items])
    return {
        "dir": str(directory), "target": target, "preprocess": preprocess, "count": len(items),
        "accuracy": float(right.mean()),
        "png": {"count": int((~jpeg).sum()), "accuracy": float(right[~jpeg].mean())},
        "jpeg": {"count": int(jpeg.sum()), "accuracy": float(right[jpeg].mean())},
        "seconds": round(seconds, 2),
    }


def _cpu_ms(data: bytes, repeat: int) -> float:
    from digitserve import pictures

    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        pictures.from_bytes(data)
        best = min(best, time.process_time() - started)
    return best * 1e3


def cost(directory: Path, repeat: int) -> dict[str, Any]:
    from PIL import Image

    items = read_labels(directory)
    by_format: dict[str, list[float]] = {"png": [], "jpeg": []}
    for path, _ in items:
        by_format["jpeg" if path.suffix == ".jpg" else "png"].append(_cpu_ms(path.read_bytes(), repeat))
    with Image.open(items[0][0]) as first:
        phone = first.convert("RGB").resize((4032, 3024), Image.Resampling.BILINEAR)
    big = {}
    for fmt, options in (("jpeg", {"quality": 85}), ("png", {})):
        out = io.BytesIO()
        phone.save(out, format=fmt.upper(), **options)
        big[fmt] = {"bytes": len(out.getvalue()), "ms": round(_cpu_ms(out.getvalue(), repeat), 2)}
    return {
        "dir": str(directory), "repeat": repeat,
        **{fmt: {"count": len(v), "median_ms": round(float(np.median(v)), 2),
                 "p90_ms": round(float(np.percentile(v, 90)), 2), "max_ms": round(max(v), 2)}
           for fmt, v in by_format.items()},
        "4032x3024": big,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.photoset", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write the photo set")
    g.add_argument("--data-dir", type=Path, required=True, help="directory with the t10k IDX files")
    g.add_argument("--out", type=Path, required=True, help="directory to write the pictures into")
    g.add_argument("--count", type=int, default=1000, help="first N test images (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    m = sub.add_parser("measure", help="accuracy of a served model on the photo set")
    m.add_argument("--dir", type=Path, required=True, help="the photo set (generate's --out)")
    m.add_argument("--target", default="127.0.0.1:50051", help="the server (default 127.0.0.1:50051)")
    m.add_argument("--preprocess", choices=["server", "client"], default="server",
                   help="server: send the encoded pictures (default); client: preprocess here and "
                   "send pixels")
    m.add_argument("--timeout", type=float, default=60.0, help="deadline per call in seconds")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    c = sub.add_parser("cost", help="CPU milliseconds to decode and preprocess one picture")
    c.add_argument("--dir", type=Path, required=True, help="the photo set (generate's --out)")
    c.add_argument("--repeat", type=int, default=3, help="best of N per picture (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        rows = generate(args.data_dir, args.out, args.count, args.seed)
        print(f"{len(rows)} pictures in {args.out} ({LABELS_FILE}: file, label)")
        return 0
    if args.command == "cost":
        print(json.dumps(cost(args.dir, args.repeat)))
        return 0
    result = measure(args.dir, args.target, args.preprocess, args.timeout)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['count']} pictures, preprocessed by the {args.preprocess}: accuracy "
              f"{result['accuracy']:.2%} (PNG {result['png']['accuracy']:.2%}, JPEG "
              f"{result['jpeg']['accuracy']:.2%}) in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
