"""`minifd calibrate`: choose each layer's unified max value phi from the model's scores on real text.

The float64 oracle (minifd/oracle.py) runs the text through the model in windows of --max-tokens
tokens and hands over every layer's scaled, causally masked scores. Each attention row r (one head,
one query position) is reduced to its extremes (min_r, max_r). Under a window (low, high) the row is
safe, i.e. needs no recompute, iff every score s has low < s - phi < high, that is iff
    max_r - high < phi < min_r - low,
an open interval of phi per row. The window is the widest that float32 allows (softmax_range.py),
with its top narrowed to what the prefill kernel's fp16 probabilities allow (PREFILL_HIGH below);
phi is then the point covered by the most rows' intervals (a sweep over the sorted interval ends),
taken in the middle of the widest such stretch so that unseen text has the most margin.

Writes DIR/minifd_softmax.json (NAME.minifd_softmax.json beside a NAME.gguf), where the engine looks
for it, unless --out says otherwise, and prints per layer phi, the observed score range and the share
of rows that would recompute.
The oracle works in float64 on the CPU: fine for models up to a few billion parameters.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from minifd.errors import MinifdError
from minifd.kernels.prefill_attention import LARGEST_LOG2_PROBABILITY
from minifd.kernels.softmax_range import (DEFAULT_SOFTMAX_RANGE, HIGHEST_HIGH, LOWEST_LOW, SoftmaxRange,
                                          save_softmax_ranges)


# ----------------------------------------------------------------------------------------------
# Row extremes and the choice of phi
# ----------------------------------------------------------------------------------------------

def row_extremes(scores):
    """scores: [n_heads, seq, seq] scaled scores, -inf where masked -> (row_min, row_max): [n_heads * seq]"""
    finite = np.isfinite(scores)
    row_min = np.where(finite, scores, np.inf).min(axis=-1)
    row_max = np.where(finite, scores, -np.inf).max(axis=-1)
    return row_min.reshape(-1), row_max.reshape(-1)


class ScoreExtremes:
    """Collects (row_min, row_max) per layer; pass `record` as the oracle's on_scores."""

    def __init__(self, n_layers):
        self.mins = [[] for _ in range(n_layers)]
        self.maxs = [[] for _ in range(n_layers)]

    def record(self, layer, scores):
        row_min, row_max = row_extremes(scores)
        self.mins[layer].append(row_min)
        self.maxs[layer].append(row_max)

    def layer(self, index):
        """-> (row_min, row_max): [rows] over everything recorded for that layer."""
        return np.concatenate(self.mins[index]), np.concatenate(self.maxs[index])


def unsafe_rows(row_min, row_max, softmax_range, largest_below_phi=math.inf):
    """-> bool [rows]: the rows that would be recomputed under softmax_range, or whose largest score
    lies more than largest_below_phi under phi."""
    shifted_min, shifted_max = row_min - softmax_range.phi, row_max - softmax_range.phi
    return ~((shifted_min > softmax_range.low) & (shifted_max < softmax_range.high)
             & (shifted_max > -largest_below_phi))


def choose_phi(row_min, row_max, low=LOWEST_LOW, high=HIGHEST_HIGH, largest_below_phi=math.inf):
    """row_min, row_max: [rows] -> phi that leaves the fewest unsafe rows (see unsafe_rows).
    Row r is safe iff phi lies in the open interval (row_max - high, min(row_min - low, row_max + largest_below_phi))."""
    starts, ends = row_max - high, np.minimum(row_min - low, row_max + largest_below_phi)
    possible = starts < ends  # a row spanning more than high - low is unsafe for every phi
    if not possible.any():
        return float(np.median((row_min + row_max) / 2) - (low + high) / 2)
    starts, ends = np.sort(starts[possible]), np.sort(ends[possible])
    points = np.unique(np.concatenate([starts, ends]))
    middles = (points[:-1] + points[1:]) / 2  # one test point inside each stretch between interval ends
    covered = np.searchsorted(starts, middles, side="left") - np.searchsorted(ends, middles, side="right")
    best = covered == covered.max()
    widths = np.where(best, points[1:] - points[:-1], -np.inf)
    return float(middles[np.argmax(widths)])


@dataclass
class LayerCalibration:
    softmax_range: SoftmaxRange
    score_min: float
    score_max: float
    rows: int
    unsafe_share: float  # rows that would recompute under softmax_range
    default_unsafe_share: float  # ... under DEFAULT_SOFTMAX_RANGE

    def statistics(self):
        return {"score_min": self.score_min, "score_max": self.score_max, "rows": self.rows,
                "recompute_share": self.unsafe_share, "default_recompute_share": self.default_unsafe_share}


# The prefill kernel feeds p = exp(s - phi) to the tensor cores in fp16. So there a row is safe only
# while s - phi < 15 ln 2 (p < 2^15, PREFILL_HIGH), and while its mean p is at least fp16's smallest
# normal 2^-14; the largest p of a row of up to 8192 keys passes that when it is at least 1/2, i.e.
# when the row's largest score is at most ln 2 under phi (PREFILL_LARGEST_BELOW_PHI). phi is chosen
# and stored against this window, which decode (whose window is wider) then shares.
PREFILL_HIGH = LARGEST_LOG2_PROBABILITY * math.log(2.0)
PREFILL_LARGEST_BELOW_PHI = math.log(2.0)


def calibrate_layer(row_min, row_max):
    """row_min, row_max: [rows] -> LayerCalibration with the chosen phi and the prefill-safe window."""
    phi = choose_phi(row_min, row_max, LOWEST_LOW, PREFILL_HIGH, PREFILL_LARGEST_BELOW_PHI)
    softmax_range = SoftmaxRange(phi, LOWEST_LOW, PREFILL_HIGH)
    default_range = SoftmaxRange(DEFAULT_SOFTMAX_RANGE.phi, LOWEST_LOW, PREFILL_HIGH)
    return LayerCalibration(softmax_range, float(row_min.min()), float(row_max.max()), len(row_min),
                            float(unsafe_rows(row_min, row_max, softmax_range, PREFILL_LARGEST_BELOW_PHI).mean()),
                            float(unsafe_rows(row_min, row_max, default_range, PREFILL_LARGEST_BELOW_PHI).mean()))


# ----------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------

def token_windows(token_ids, max_tokens, bos_id):
    """Cut a long token list into windows of at most max_tokens; every window after the first starts
    with bos_id (when the model uses one) as a real prompt would."""
    if bos_id is None or not token_ids or token_ids[0] != bos_id:
        return [token_ids[i:i + max_tokens] for i in range(0, len(token_ids), max_tokens)]
    body = token_ids[1:]
    step = max_tokens - 1
    return [[bos_id] + body[i:i + step] for i in range(0, len(body), step)] or [[bos_id]]


def collect_score_extremes(tensors, config, windows, forward):
    """Run each window of token ids through forward(tensors, config, ids, on_scores=...) ->
    ScoreExtremes over all windows."""
    extremes = ScoreExtremes(config.n_layers)
    for ids in windows:
        forward(tensors, config, ids, on_scores=extremes.record)
    return extremes


def calibrate(checkpoint, text, max_tokens=512):
    """-> [LayerCalibration] for the model of a checkpoint (minifd.model.loader.open_checkpoint) on `text`."""
    from minifd import oracle

    config = checkpoint.config
    tokenizer = checkpoint.tokenizer()
    token_ids = tokenizer.encode(text)
    if len(token_ids) < 2:
        raise MinifdError("calibrate: the text is too short (it needs at least two tokens)")
    windows = token_windows(token_ids, max_tokens, tokenizer.bos_id if tokenizer.add_bos else None)
    extremes = collect_score_extremes(checkpoint, config, windows, oracle.forward)
    return [calibrate_layer(*extremes.layer(i)) for i in range(config.n_layers)]


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------

@click.command("calibrate")
@click.option("--weights", "weights_dir", required=True, type=click.Path(path_type=Path),
              help="Hugging Face Llama directory (config.json, tokenizer.json, *.safetensors) or .gguf file.")
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="Plain-text file to calibrate on (default: a few paragraphs shipped with minifd).")
@click.option("--out", "out_file", type=click.Path(path_type=Path),
              help="Where to write the JSON (default: WEIGHTS/minifd_softmax.json, where the engine reads it).")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(min=2),
              help="Tokens per forward pass; longer text is cut into windows of this size.")
def calibrate_command(weights_dir, text_file, out_file, max_tokens):
    """Pick each layer's unified max value phi from real text (float64 oracle, CPU)."""
    from minifd.model.loader import open_checkpoint

    checkpoint = open_checkpoint(weights_dir)
    if text_file is None:
        from minifd.calibration_text import DEFAULT_TEXT

        text = DEFAULT_TEXT
    else:
        try:
            text = text_file.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise MinifdError(f"--text {text_file}: cannot be read ({error})") from None
    layers = calibrate(checkpoint, text, max_tokens)
    rows = sum(layer.rows for layer in layers)
    share = sum(layer.unsafe_share * layer.rows for layer in layers) / rows
    default_share = sum(layer.default_unsafe_share * layer.rows for layer in layers) / rows
    for i, layer in enumerate(layers):
        click.echo(f"layer {i:3d}: phi {layer.softmax_range.phi:8.2f}  scores [{layer.score_min:8.2f}, "
                   f"{layer.score_max:8.2f}]  rows to recompute {100 * layer.unsafe_share:6.3f}%")
    out_path = out_file or checkpoint.softmax_ranges_path
    try:
        save_softmax_ranges(out_path, [layer.softmax_range for layer in layers],
                            [layer.statistics() for layer in layers],
                            {"rows": rows, "recompute_share": share, "default_recompute_share": default_share,
                             "max_tokens": max_tokens, "text": str(text_file) if text_file else "built-in"})
    except OSError as error:
        raise MinifdError(f"cannot write {out_path} ({error}); choose another place with --out") from None
    click.echo(f"{rows} attention rows: {100 * share:.3f}% would recompute with these phi "
               f"({100 * default_share:.3f}% with phi = 0); wrote {out_path}")
