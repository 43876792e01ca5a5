"""Next-token choice: greedy, or temperature with optional top-k, top-p (nucleus) and min-p filtering;
either after an optional repetition penalty. Each step means what it means in Hugging Face transformers
(RepetitionPenaltyLogitsProcessor, then the Temperature, TopK, TopP and MinP warpers)."""

import secrets
from dataclasses import dataclass, fields

import numpy as np

from minifd.backend import module_of


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no limit
    min_p: float = 0.0  # 0 = no limit; else keep the tokens at least min_p times as likely as the likeliest
    repetition_penalty: float = 1.0  # 1 = none; else the logits of tokens the sequence holds are discouraged


SETTING_DTYPES = {f.name: np.int64 if f.name == "top_k" else np.float32 for f in fields(SamplingParams)}


@dataclass(frozen=True)
class RowSettings:
    """The settings of a batch of rows, setting by setting: one value every row shares (a Python scalar),
    or a [batch, 1] array of each row's, which broadcasts against [batch, vocab]."""

    temperature: object
    top_k: object
    top_p: object
    min_p: object
    repetition_penalty: object

    @classmethod
    def of(cls, params, xp):
        """params: one SamplingParams per row -> RowSettings, scalars for the settings all rows share."""
        return cls(**{name: _per_row([getattr(p, name) for p in params], xp, dtype)
                      for name, dtype in SETTING_DTYPES.items()})


def sample(logits, params, uniforms, seen=None):
    """logits: [batch, vocab] float32, params: one SamplingParams for every row, a sequence of batch of
    them (one per row: requests of different settings decoding together) or RowSettings, uniforms:
    [batch] in [0, 1) -> token ids: [batch] int64. seen: [batch, vocab] bool, the tokens each sequence
    holds so far (prompt and generated), which the repetition penalty needs (and only it).

    Sampling draws by inverse CDF from the given uniforms, so a seeded host generator decides the
    text on CPU and GPU alike. A row's token is the same whether its params come alone or beside
    other rows' (the same float32 operations on its values), and a setting every row shares runs as
    one scalar, skipping the steps it turns off. With RowSettings of device arrays nothing is copied
    from the host, so a captured CUDA graph can run it (minifd.decode_step).
    """
    xp = module_of(logits)
    if not isinstance(params, RowSettings):
        params = RowSettings.of([params] * logits.shape[0] if isinstance(params, SamplingParams) else list(params), xp)
    temperature, top_k, top_p, min_p, penalty = (params.temperature, params.top_k, params.top_p, params.min_p,
                                                 params.repetition_penalty)
    if not _everywhere(penalty, 1.0):
        logits = penalize_repetition(logits, seen, penalty)
    if _everywhere(temperature, 0.0):
        return logits.argmax(axis=-1)
    vocab = logits.shape[-1]
    order = xp.argsort(-logits, axis=-1)  # [batch, vocab], most likely first
    divisor = xp.where(temperature == 0, np.float32(1), temperature) if _varies(temperature) else temperature
    ranked = xp.take_along_axis(logits, order, axis=-1) / divisor
    probs = xp.exp(ranked - ranked[:, :1])
    probs /= probs.sum(axis=-1, keepdims=True)
    keep = xp.ones(probs.shape, dtype=bool)
    if _varies(top_k):  # 0 = no limit
        keep &= (top_k == 0) | (xp.arange(vocab)[None, :] < top_k)
    elif 0 < top_k < vocab:
        keep[:, top_k:] = False
    if _varies(top_p) or top_p < 1.0:
        mass_before = xp.cumsum(probs, axis=-1) - probs  # [batch, vocab]
        keep &= (mass_before < top_p) | (top_p >= 1.0)  # the smallest prefix whose mass reaches top_p
    if _varies(min_p) or min_p > 0:
        keep &= probs >= min_p * probs[:, :1]  # probs[:, 0] is the likeliest token's
    probs = xp.where(keep, probs, 0.0)
    cdf = xp.cumsum(probs, axis=-1)  # [batch, vocab]
    threshold = xp.asarray(uniforms, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    picks = xp.minimum((cdf <= threshold).sum(axis=-1), vocab - 1)  # [batch]
    drawn = xp.take_along_axis(order, picks[:, None], axis=-1)[:, 0]
    return xp.where(temperature[:, 0] == 0, logits.argmax(axis=-1), drawn) if _varies(temperature) else drawn


def _per_row(values, xp, dtype):
    """One setting's values, one per row -> the value itself when every row has it, else a [batch, 1]
    `dtype` array that broadcasts against [batch, vocab]."""
    if all(value == values[0] for value in values):
        return values[0]
    return xp.asarray(np.asarray(values, dtype=dtype)[:, None])


def _varies(setting):
    return not np.isscalar(setting) and getattr(setting, "ndim", 0) > 0


def _everywhere(setting, value):
    return not _varies(setting) and setting == value


def penalize_repetition(logits, seen, penalty):
    """HF's repetition penalty: a seen token's logit is divided by penalty when positive and multiplied
    by it when negative, so a penalty above 1 makes it less likely either way. -> new logits"""
    xp = module_of(logits)
    return xp.where(seen, xp.where(logits < 0, logits * penalty, logits / penalty), logits)


def tokens_seen(token_ids, vocab):
    """token_ids: one list of ids per sequence -> [batch, vocab] bool host array, True where a sequence
    holds the token."""
    seen = np.zeros((len(token_ids), vocab), dtype=bool)
    for row, ids in enumerate(token_ids):
        seen[row, np.asarray(ids, dtype=np.int64)] = True
    return seen


def mark_seen(seen, tokens):
    """seen: [batch, vocab] bool, updated in place with tokens: [batch] (one new token per sequence;
    a negative one marks nothing). Elementwise, so a captured decode step can run it."""
    xp = module_of(seen)
    seen |= xp.arange(seen.shape[1])[None, :] == tokens[:, None]


def draw_seed(seed):
    """seed as given, or a fresh one when it is None or negative ("pick one"): a run always has a seed
    that repeats it."""
    if seed is None or seed < 0:
        return secrets.randbelow(2**31)
    return seed


def uniform_source(seed):
    """A seeded generator of the per-step uniforms."""
    return np.random.default_rng(seed)
