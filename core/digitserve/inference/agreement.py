"""How an inference path is chosen: the paths there are, and how one compares with
``model.predict`` on the probe images (``Agreement``) before it may serve."""

from __future__ import annotations

from dataclasses import dataclass

from digitserve.repository import CorruptVersionError

INFERENCE_CHOICES = ("auto", "litert", "tensorflow")
AGREEMENT_FLOOR = 1e-5
"""The fast path must agree with ``model.predict`` to this, or to TensorFlow's own batch-1 spread.
Two float32 kernels of the same network round differently by about 1e-6 (LiteRT against
``model.predict``: 1.01e-6 and 1.82e-6 for the seed and default presets on this machine, 1.46e-6
for a one-epoch default model trained in the train image, where TensorFlow's own batch-1 spread
was 1.04e-6): a floor of 1e-6 refused such a flatbuffer about as often as it kept it, and a
server without TensorFlow could then serve nothing. 1e-5 keeps a margin above that rounding and
stays a hundred times below what a path computing something else is off by (1e-3 in the tests)."""
PROBE_IMAGES = 500
"""At most this many probe images are compared (the trainer's check set holds 500)."""


class InferencePathError(CorruptVersionError):
    """Raised when ``--inference litert`` is demanded and the LiteRT path cannot serve a version."""


@dataclass(frozen=True)
class Agreement:
    """How the chosen path's probabilities compare with ``model.predict``'s on the probe images."""

    path: str
    images: int
    litert_diff: float | None  # largest |p - model.predict| of LiteRT, in one batch and image by image
    # Largest |p - model.predict| of TensorFlow's own function image by image: how much the reference
    # moves with the batch size (a batch-1 matrix-vector kernel rounds differently).
    tensorflow_spread: float
    reason: str = ""

    @property
    def tolerance(self) -> float:
        return max(AGREEMENT_FLOOR, self.tensorflow_spread)

    def describe(self) -> str:
        lite = "n/a" if self.litert_diff is None else f"{self.litert_diff:.2e}"
        text = (f"inference path {self.path}: on {self.images} probe images max |p - model.predict| "
                f"LiteRT {lite}, TensorFlow batch-1 {self.tensorflow_spread:.2e} (tolerance "
                f"{self.tolerance:.2e})")
        return f"{text}; {self.reason}" if self.reason else text
