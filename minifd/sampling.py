"""Next-token choice: greedy, or temperature with optional top-k and top-p (nucleus) filtering."""

import secrets
from dataclasses import dataclass

import numpy as np

from minifd.backend import module_of


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no limit


def sample(logits, params, uniforms):
    """logits: [batch, vocab] float32, uniforms: [batch] in [0, 1) -> token ids: [batch] int64.

    Sampling draws by inverse CDF from the given uniforms, so a seeded host generator decides the
    text on CPU and GPU alike.
    """
    xp = module_of(logits)
    if params.temperature == 0:
        return logits.argmax(axis=-1)
    vocab = logits.shape[-1]
    order = xp.argsort(-logits, axis=-1)  # [batch, vocab], most likely first
    ranked = xp.take_along_axis(logits, order, axis=-1) / params.temperature
    probs = xp.exp(ranked - ranked[:, :1])
    probs /= probs.sum(axis=-1, keepdims=True)
    keep = xp.ones(probs.shape, dtype=bool)
    if 0 < params.top_k < vocab:
        keep[:, params.top_k:] = False
    if params.top_p < 1.0:
        mass_before = xp.cumsum(probs, axis=-1) - probs  # [batch, vocab]
        keep &= mass_before < params.top_p  # the smallest prefix whose mass reaches top_p
    probs = xp.where(keep, probs, 0.0)
    cdf = xp.cumsum(probs, axis=-1)  # [batch, vocab]
    threshold = xp.asarray(uniforms, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    picks = xp.minimum((cdf <= threshold).sum(axis=-1), vocab - 1)  # [batch]
    return xp.take_along_axis(order, picks[:, None], axis=-1)[:, 0]


def draw_seed(seed):
    """seed as given, or a fresh one when it is None or negative ("pick one"): a run always has a seed
    that repeats it."""
    if seed is None or seed < 0:
        return secrets.randbelow(2**31)
    return seed


def uniform_source(seed):
    """A seeded generator of the per-step uniforms."""
    return np.random.default_rng(seed)
