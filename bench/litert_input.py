"""What handing pixels to LiteRT costs (``LiteRTRunner.__call__``): ``set_tensor`` with a
read-only array (pixels read straight from a request's bytes), with a writable one, and a copy
into the input tensor's own view, for 1 and 64 images, best of 5 runs each:

    python -m bench.litert_input --model out/bench-repo/mnist/1/model.tflite
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def _ways(interpreter: Any, index: int, read_only: np.ndarray) -> list[tuple[str, Callable[[], None]]]:
    writable = read_only.copy()

    def into_view() -> None:
        interpreter.tensor(index)()[...] = read_only

    return [("set_tensor, read-only array", lambda: interpreter.set_tensor(index, read_only)),
            ("set_tensor, writable array", lambda: interpreter.set_tensor(index, writable)),
            ("copy into the input's view", into_view)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.litert_input", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path,
                        default=REPO_ROOT / "out" / "bench-repo" / "mnist" / "1" / "model.tflite")
    args = parser.parse_args(argv)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=args.model.read_bytes(), num_threads=1)
    detail = interpreter.get_input_details()[0]
    index, row = int(detail["index"]), [int(d) for d in detail["shape_signature"][1:]]
    rng = np.random.default_rng(0)
    for rows in (1, 64):
        interpreter.resize_tensor_input(index, [rows, *row], strict=False)
        interpreter.allocate_tensors()
        read_only = np.frombuffer(rng.random((rows, *row), dtype=np.float32).tobytes(),
                                  dtype=np.float32).reshape(rows, *row)
        for name, call in _ways(interpreter, index, read_only):
            number = 20_000 if rows == 1 else 2_000
            best = min(timeit.repeat(call, number=number, repeat=5)) / number
            print(f"{rows:>2} image(s)  {name:<28} {best * 1e6:8.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
