"""Model hyper-parameters, read from a Hugging Face config.json."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minifd.errors import MinifdError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# per_dimension: a factor per dimension pair, {"factors": [head_dim // 2]}, what a GGUF's rope_freqs.weight holds.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "per_dimension")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None, or HF's dict with "rope_type" and that type's parameters
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple

    @classmethod
    def from_dict(cls, raw, source="config.json"):
        """raw: the parsed config.json, in either of the two layouts seen in the wild."""
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
            raise MinifdError(
                f"{source}: architecture {', '.join(map(str, architectures))} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [key for key in required if key not in raw]
        if missing:
            raise MinifdError(f"{source}: missing required key(s) {', '.join(missing)}")
        try:
            hidden = int(raw["hidden_size"])
            n_heads = int(raw["num_attention_heads"])
            n_kv_heads = int(raw.get("num_key_value_heads") or n_heads)
            if hidden <= 0 or n_heads <= 0 or n_kv_heads <= 0:
                raise MinifdError(f"{source}: hidden_size and head counts must be positive")
            if raw.get("head_dim") is None and hidden % n_heads:
                raise MinifdError(
                    f"{source}: num_attention_heads ({n_heads}) does not divide hidden_size ({hidden})"
                )
            if n_heads % n_kv_heads:
                raise MinifdError(
                    f"{source}: num_key_value_heads ({n_kv_heads}) does not divide num_attention_heads ({n_heads})"
                )
            rope_theta, rope_scaling = _rope_settings(raw, source)
            eos = raw.get("eos_token_id")
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                n_layers=int(raw["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=n_kv_heads,
                head_dim=int(raw.get("head_dim") or hidden // n_heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_as_tuple(eos),
            )
        except (TypeError, ValueError) as error:
            raise MinifdError(f"{source}: a value has the wrong type ({error})") from None

    @classmethod
    def from_dir(cls, weights_dir):
        path = Path(weights_dir) / "config.json"
        if not path.is_file():
            raise MinifdError(f"{path}: not found (a Hugging Face model directory has a config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MinifdError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(raw, dict):
            raise MinifdError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))


def _as_tuple(value):
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _rope_settings(raw, source):
    """-> (theta, scaling dict or None) from `rope_theta` + `rope_scaling` or the newer `rope_parameters`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise MinifdError(
                f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
    return float(theta), scaling


def rope_inverse_frequencies(config):
    """-> inv_freq: [head_dim // 2] float64, the rotation speed of each dimension pair."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inv_freq = 1.0 / config.rope_theta**exponents
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "per_dimension":  # each pair's wavelength stretched by its own factor
        return inv_freq / np.asarray(scaling["factors"], dtype=np.float64)
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slow down by `factor`, short ones stay, the band between is blended.
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    wavelength = 2 * math.pi / inv_freq
    blend = (old_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    long_waves = wavelength > old_context / low_freq_factor
    short_waves = wavelength < old_context / high_freq_factor
    return np.where(long_waves, inv_freq / factor, np.where(short_waves, inv_freq, blended))
