"""The unified max value phi and its safe window, per layer, and the JSON file that stores them.

Attention kernels accumulate exp(s - phi) for the scaled scores s = q.k / sqrt(head_dim) of a row
instead of exp(s - max(s)). A row is safe, and its unified-max result exact to float32 rounding,
when every s - phi lies strictly inside (low, high); otherwise the kernels recompute that row with
the running-max method. Inside the window the denominator cannot underflow: each of its terms is at
least exp(low).

Why the window may not exceed (-60, 60) (float32 accumulators, float16 values):
- high: the numerator sums n terms exp(s - phi) * v with |v| <= 65504 (float16 max). For n up to
  2^20 keys, 2^20 * e^60 * 65504 ~ 8e36 stays below float32's 3.4e38 (e^63.7 would not).
- low: the smallest nonzero float16 magnitude is about e^-16.6, so with exp(s - phi) > e^-60 every
  product p * v stays above float32's smallest normal e^-87.3: no denormal rounding in the sums.
Calibration (minifd/calibrate.py) keeps this window and picks phi to centre real scores in it.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from minifd.errors import MinifdError
from minifd.files import write_text_atomically

LOWEST_LOW = -60.0
HIGHEST_HIGH = 60.0
FILE_NAME = "minifd_softmax.json"
FORMAT = "minifd-softmax-ranges/1"


@dataclass(frozen=True)
class SoftmaxRange:
    """phi: the unified max value; a row is safe iff every scaled score s has low < s - phi < high."""

    phi: float = 0.0
    low: float = LOWEST_LOW
    high: float = HIGHEST_HIGH

    def __post_init__(self):
        values = (self.phi, self.low, self.high)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise MinifdError(f"softmax range {values}: phi, low and high must be finite numbers")
        if not LOWEST_LOW <= self.low < 0.0 < self.high <= HIGHEST_HIGH:
            raise MinifdError(f"softmax range low={self.low}, high={self.high}: need "
                              f"{LOWEST_LOW} <= low < 0 < high <= {HIGHEST_HIGH} (float32 safety)")

    def in_log2_units(self):
        """-> (phi, low, high) multiplied by log2(e): the kernels work with exp2."""
        return tuple(value * math.log2(math.e) for value in (self.phi, self.low, self.high))


# Without calibration: phi = 0 and the widest window, i.e. every row whose scores lie in (-60, 60).
DEFAULT_SOFTMAX_RANGE = SoftmaxRange()


def softmax_ranges_path(path_or_weights_dir):
    """A JSON file path, or a weights directory (-> DIR/minifd_softmax.json)."""
    path = Path(path_or_weights_dir)
    return path / FILE_NAME if path.is_dir() else path


def load_softmax_ranges(path_or_weights_dir, n_layers):
    """-> one SoftmaxRange per layer from the calibration JSON; DEFAULT_SOFTMAX_RANGE for every layer
    when the file does not exist. A malformed file raises MinifdError."""
    path = softmax_ranges_path(path_or_weights_dir)
    if not path.is_file():
        return [DEFAULT_SOFTMAX_RANGE] * n_layers
    try:
        document = json.loads(path.read_text())
        if document.get("format") != FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, expected {FORMAT!r}")
        layers = document["layers"]
        ranges = [SoftmaxRange(float(layer["phi"]), float(layer["low"]), float(layer["high"])) for layer in layers]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise MinifdError(f"{path}: not a valid softmax range file ({error}); rerun `minifd calibrate`") from None
    if len(ranges) != n_layers:
        raise MinifdError(f"{path}: has {len(ranges)} layers but the model has {n_layers}; rerun `minifd calibrate`")
    return ranges


def save_softmax_ranges(path, ranges, layer_statistics=(), summary=None):
    """Write ranges (one SoftmaxRange per layer) with optional per-layer statistics dicts (merged into
    each layer's entry) and a summary dict."""
    statistics = list(layer_statistics) or [{}] * len(ranges)
    document = {"format": FORMAT,
                "layers": [{**asdict(r), **extra} for r, extra in zip(ranges, statistics)]}
    if summary:
        document["summary"] = summary
    write_text_atomically(path, json.dumps(document, indent=1) + "\n")
