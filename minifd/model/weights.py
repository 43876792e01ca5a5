"""The decoder's weights, arranged for inference: fused projections, on the compute device.

From the checkpoint's per-projection matrices we build, per layer, one QKV matrix (q and k rows in
the paired layout, minifd.kernels.rope, so RoPE can run in the product's epilogue) and one gate+up
matrix (rows interleaved so the SwiGLU gate can run in the product's epilogue), so a decode step
runs two large products instead of five small ones. Tensors are converted
one at a time, moved to the device straight away, and their mapped pages released: peak host memory
stays near one tensor however large the checkpoint.

With `quantize` ("int8" or "int4", minifd.model.quantized) every projection matrix (wqkv after its
row arrangement, wo, w_gate_up, w_down, and the LM head unless it is the embedding) is rounded
group-wise at load; norms and the embedding stay as they are. On the GPU the layers hold the
quantized matrices themselves (CuPy arrays), which the product kernels read as they are
(minifd.kernels.weight_formats). On the CPU they hold each projection's exact float32
dequantization, the same weights the kernels' emulations would compute from the codes at every
call, with the quantized matrices in Weights.quantized.
"""

from dataclasses import dataclass, field

import numpy as np

from minifd.errors import MinifdError
from minifd.kernels.rope import pair_rotary_rows
from minifd.kernels.silu_mul import interleave_gate_up, padded_features
from minifd.model.quantized import FORMATS, QUANTIZERS, placed
from minifd.progress import ProgressBar


@dataclass
class LayerWeights:
    attn_norm: object  # [hidden]
    wqkv: object  # [(n_heads + 2 * n_kv_heads) * head_dim, hidden]: q, k rows paired (minifd.kernels.rope), then v
    wo: object  # [hidden, n_heads * head_dim]
    mlp_norm: object  # [hidden]
    w_gate_up: object  # [2 * features, hidden]: gate and up rows interleaved in tiles (minifd.kernels.silu_mul)
    w_down: object  # [hidden, features]; features = intermediate rounded up to whole tiles, zero columns past it


@dataclass
class Weights:
    embed: object  # [vocab, hidden]
    layers: list
    norm: object  # [hidden]
    lm_head: object  # [vocab, hidden]; the embedding itself when tied
    quantized: dict = field(default_factory=dict)  # CPU: "layers.{i}.{projection}" or "lm_head" -> Int8Groups | Int4Groups
    # (on the GPU the layers hold those themselves)

    def nbytes_streamed_per_step(self):
        """Bytes a decode step reads from weights: everything but the embedding table (one row per token)."""
        total = sum(w.nbytes for layer in self.layers for w in vars(layer).values())
        return total + self.norm.nbytes + self.lm_head.nbytes


def projection_shapes(config):
    """-> {LayerWeights projection: [N, K] as the layer holds it}, the fused and padded layouts included."""
    hidden, features = config.hidden_size, padded_features(config.intermediate_size)
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"wqkv": (q_rows + 2 * kv_rows, hidden), "wo": (hidden, q_rows),
            "w_gate_up": (2 * features, hidden), "w_down": (hidden, features)}


@dataclass
class ProjectionFormat:
    """How one kind of projection is held: its [N, K], in how many layers, in which format."""

    projection: str  # a LayerWeights field, or "lm_head"
    shape: tuple  # [N, K]
    count: int  # layers holding one such matrix (1 for the LM head)
    format: str  # "int8", "int4", or the dtype's name ("float16", "float32")
    bits_per_weight: float
    description: str  # the format's layout in words

    @property
    def nbytes(self):
        return int(self.shape[0] * self.shape[1] * self.count * self.bits_per_weight) // 8


def projection_formats(checkpoint, quantize, dtype):
    """-> [ProjectionFormat] of every product's weight, as load_weights(checkpoint, ..., dtype, quantize=
    quantize) would hold it, from the checkpoint's config alone (no tensor is read)."""
    config = checkpoint.config
    dense = np.dtype(dtype)
    dense_bits, dense_text = 8 * dense.itemsize, "not quantized"
    rounded = FORMATS.get(quantize)
    bits, text = (rounded.bits_per_weight, rounded.layout) if rounded else (dense_bits, dense_text)
    formats = [ProjectionFormat(name, shape, config.n_layers, quantize or dense.name, bits, text)
               for name, shape in projection_shapes(config).items()]
    head_shape = (config.vocab_size, config.hidden_size)
    if lm_head_name(checkpoint, config) == "lm_head.weight":
        formats.append(ProjectionFormat("lm_head", head_shape, 1, quantize or dense.name, bits, text))
    else:
        formats.append(ProjectionFormat("lm_head", head_shape, 1, dense.name, dense_bits,
                                        "the embedding itself (tied), not quantized"))
    return formats


def streamed_bytes_per_step(checkpoint, quantize, dtype):
    """Bytes of weights a decode step reads in these formats: every product's weight and the norms
    (the embedding table gives one row per token and is not counted)."""
    config = checkpoint.config
    norms = (2 * config.n_layers + 1) * config.hidden_size * np.dtype(dtype).itemsize
    return sum(f.nbytes for f in projection_formats(checkpoint, quantize, dtype)) + norms


def expected_shapes(config):
    """-> {HF tensor name: shape} for every tensor the decoder needs."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inner, hidden),
            p + "mlp.up_proj.weight": (inner, hidden),
            p + "mlp.down_proj.weight": (hidden, inner),
        })
    return shapes


def lm_head_name(checkpoint, config):
    """The LM head is `lm_head.weight` unless the embeddings are tied (or the files simply omit it)."""
    if not config.tie_word_embeddings and "lm_head.weight" in checkpoint:
        return "lm_head.weight"
    return "model.embed_tokens.weight"


def check_checkpoint(checkpoint, config):
    """Every needed tensor is present with the shape the config implies."""
    shapes = expected_shapes(config)
    if lm_head_name(checkpoint, config) == "lm_head.weight":
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for name, shape in shapes.items():
        if name not in checkpoint:
            raise MinifdError(f"{checkpoint.dir}: no safetensors file has the tensor {name!r}")
        found = checkpoint.shape(name)
        if tuple(found) != shape:
            raise MinifdError(
                f"{checkpoint.location(name)}: tensor {name!r} has shape {list(found)}, config.json implies {list(shape)}"
            )


def load_weights(checkpoint, config, xp, dtype, progress=None, quantize=None):
    """checkpoint: a minifd.model.loader Checkpoint or InMemoryCheckpoint -> Weights as `dtype` arrays of module `xp`.
    quantize: None, "int8" or "int4": the projections' format (the module docstring says how)."""
    check_checkpoint(checkpoint, config)
    quantized = {}
    names = list(expected_shapes(config))
    head = lm_head_name(checkpoint, config)
    if head != "model.embed_tokens.weight":
        names.append(head)
    bar = ProgressBar("Loading weights", sum(checkpoint.nbytes(n) for n in names), 2**20, "MiB", enabled=progress)

    def fetch(*tensor_names, arrange=None, projection=None):
        """-> the named tensors converted to dtype, stacked along rows (or put together by
        arrange(parts)), on the device; a projection (its Weights.quantized key) is quantized first
        (on the GPU: the quantized matrix, on the CPU: its float32 dequantization)."""
        rounded = quantize is not None and projection is not None
        parts = []
        for name in tensor_names:
            parts.append(_to_dtype(checkpoint, name, np.float32 if rounded else dtype))
            bar.advance(checkpoint.nbytes(name))
        if arrange is not None:
            host = arrange(*parts)
        else:
            host = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if rounded:
            matrix = QUANTIZERS[quantize](host)
            if xp is np:
                quantized[projection] = matrix
                host = matrix.dequantize().astype(dtype, copy=False)
        # The GPU keeps the codes (the kernels read them), the CPU their dequantization.
        on_device = placed(matrix, xp) if rounded and xp is not np else xp.asarray(host)
        if xp is not np or host.flags.owndata:  # the file's pages are no longer read: let them go
            for name in tensor_names:
                checkpoint.release(name)
        return on_device

    embed = fetch("model.embed_tokens.weight")
    layers = []
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            attn_norm=fetch(p + "input_layernorm.weight"),
            wqkv=fetch(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight",
                       arrange=lambda q, k, v: np.concatenate([pair_rotary_rows(q, config.head_dim),
                                                               pair_rotary_rows(k, config.head_dim), v]),
                       projection=f"layers.{i}.wqkv"),
            wo=fetch(p + "self_attn.o_proj.weight", projection=f"layers.{i}.wo"),
            mlp_norm=fetch(p + "post_attention_layernorm.weight"),
            w_gate_up=fetch(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", arrange=interleave_gate_up,
                            projection=f"layers.{i}.w_gate_up"),
            w_down=fetch(p + "mlp.down_proj.weight", arrange=pad_down_columns, projection=f"layers.{i}.w_down"),
        ))
    norm = fetch("model.norm.weight")
    lm_head = embed if head == "model.embed_tokens.weight" else fetch(head, projection="lm_head")
    bar.close()
    return Weights(embed, layers, norm, lm_head, quantized)


def pad_down_columns(down):
    """down: [hidden, intermediate] -> [hidden, padded_features(intermediate)], zero columns past it
    (they meet the zero outputs of the gate/up layout's padding rows)."""
    hidden, intermediate = down.shape
    features = padded_features(intermediate)
    if features == intermediate:
        return down
    padded = np.zeros((hidden, features), dtype=down.dtype)
    padded[:, :intermediate] = down
    return padded


def _to_dtype(checkpoint, name, dtype):
    """One tensor as a host array of `dtype`; a no-copy view when the file already stores it so."""
    tensor = checkpoint[name]
    if tensor.dtype == dtype:
        return tensor
    if dtype == np.float16:
        converted = tensor.astype(np.float16)
        if np.count_nonzero(np.isinf(converted)) > np.count_nonzero(np.isinf(tensor)):
            raise MinifdError(
                f"{checkpoint.location(name)}: tensor {name!r} has values beyond float16's range (65504); "
                "run on the CPU (float32) instead"
            )
        return converted
    return tensor.astype(dtype)
