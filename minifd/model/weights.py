"""The decoder's weights, arranged for inference: fused projections, on the compute device.

From the checkpoint's per-projection matrices we build, per layer, one QKV matrix (q and k rows in
the paired layout, minifd.kernels.rope, so RoPE can run in the product's epilogue) and one gate+up
matrix (rows interleaved so the SwiGLU gate can run in the product's epilogue), so a decode step
runs two large products instead of five small ones. Tensors are converted
one at a time, moved to the device straight away, and their mapped pages released: peak host memory
stays near one tensor however large the checkpoint.

A projection matrix (wqkv after its row arrangement, wo, w_gate_up, w_down, and the LM head unless
it is the embedding) is held in a quantized format (minifd.model.quantized) when
- its tensors are all stored in blocks of one kernel format: a GGUF file's Q8_0, Q5_0 (int8), Q4_0,
  Q4_1 and Q4_K (int4) tensors, repacked without changing a weight (but for Q4_K's, moved by the
  fp16 rounding of their sub-block scales and mins; minifd.model.repack) and kept as they are, the
  row arrangements moving codes, scales and mins together (minifd.model.quantized.rowwise);
- or else `quantize` ("int8" or "int4") names a format: the float32 weights are rounded group-wise
  at load.
Any other projection (a safetensors one without `quantize`; a GGUF one in Q5_1, Q5_K, Q6_K or
float types, or mixing types of different formats, as Q4_K_M files do) is a plain `dtype` array,
dequantized from the GGUF blocks. Norms and the embedding stay plain. On the GPU the layers hold
the quantized matrices themselves (CuPy arrays), which the product kernels read as they are
(minifd.kernels.weight_formats). On the CPU they hold float32 weights, with the quantized matrices
in Weights.quantized: a rounded projection's exact dequantization, the same weights the kernels'
emulations would compute from the codes at every call; a kept one's GGUF dequantization
(minifd.model.dequantize), which the repacked matrix equals (Q4_K's to within its fp16 scales).
"""

from dataclasses import dataclass, field
from functools import partial

import numpy as np

from minifd.errors import MinifdError
from minifd.kernels.rope import pair_rotary_rows
from minifd.kernels.silu_mul import interleave_gate_up, padded_features
from minifd.model.dequantize import BLOCK_FORMATS
from minifd.model.quantized import FORMATS, QUANTIZERS, placed, rowwise, stack_rows
from minifd.model.repack import REPACKED_FORMATS, SCALES_ROUNDED_TO_FP16
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


# LayerWeights projection -> the tensors (HF model.layers.N.<name>.weight) it is made of, in order.
PROJECTION_TENSORS = {"wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      "wo": ("self_attn.o_proj",), "w_gate_up": ("mlp.gate_proj", "mlp.up_proj"),
                      "w_down": ("mlp.down_proj",)}


def projection_tensor_names(layer, projection):
    """-> the HF names of the tensors layer `layer`'s `projection` is made of."""
    return [f"model.layers.{layer}.{name}.weight" for name in PROJECTION_TENSORS[projection]]


def projection_shapes(config):
    """-> {LayerWeights projection: [N, K] as the layer holds it}, the fused and padded layouts included."""
    hidden, features = config.hidden_size, padded_features(config.intermediate_size)
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"wqkv": (q_rows + 2 * kv_rows, hidden), "wo": (hidden, q_rows),
            "w_gate_up": (2 * features, hidden), "w_down": (hidden, features)}


def stored_kernel_format(checkpoint, names):
    """-> "int8" or "int4" when every one of these tensors is stored in blocks of that kernel format
    (minifd.model.repack.REPACKED_FORMATS: a GGUF's Q8_0, Q5_0, Q4_0, Q4_1, Q4_K), which load_weights
    keeps; None when any is stored otherwise, or they are of different formats."""
    formats = {REPACKED_FORMATS.get(checkpoint.type_name(name)) for name in names}
    return formats.pop() if len(formats) == 1 else None


@dataclass
class ProjectionFormat:
    """How one kind of projection is held: its [N, K], in how many layers, in which format."""

    projection: str  # a LayerWeights field, or "lm_head"
    shape: tuple  # [N, K]
    count: int  # layers holding one such matrix in this format (1 for the LM head)
    format: str  # "int8", "int4", or the dtype's name ("float16", "float32")
    bits_per_weight: float
    description: str  # the format's layout in words, and where it comes from

    @property
    def nbytes(self):
        return int(self.shape[0] * self.shape[1] * self.count * self.bits_per_weight) // 8


def held_format(checkpoint, names, quantize, dtype):
    """-> (format, bits per weight, description): how load_weights holds the projection made of these
    tensors: in the kernel format they are stored in, else in `quantize`'s, else as a `dtype` array."""
    kept = stored_kernel_format(checkpoint, names)
    stored = sorted({checkpoint.type_name(name) for name in names})
    types = ", ".join(stored)
    if kept is not None:
        rounding = "".join(f", {t}'s sub-block scales and mins rounded to fp16" for t in stored
                           if t in SCALES_ROUNDED_TO_FP16)
        return kept, FORMATS[kept].bits_per_weight, f"{FORMATS[kept].layout}; the file's {types} blocks, repacked{rounding}"
    if quantize is not None:
        return quantize, FORMATS[quantize].bits_per_weight, f"{FORMATS[quantize].layout}; rounded at load from {types}"
    dense = np.dtype(dtype)
    block_quantized = any(t in BLOCK_FORMATS and BLOCK_FORMATS[t].block_size > 1 for t in stored)  # not F16, F32
    origin = f": dequantized from {types}, whose arithmetic no kernel format keeps" if block_quantized else ""
    return dense.name, 8 * dense.itemsize, "not quantized" + origin


def projection_formats(checkpoint, quantize, dtype):
    """-> [ProjectionFormat] of every product's weight, as load_weights(checkpoint, ..., dtype, quantize=
    quantize) would hold it, from the checkpoint's config and tensor types alone (no tensor is read):
    one per projection and format, counting the layers that hold it so (a GGUF file may store a
    projection in other types in some layers)."""
    config = checkpoint.config
    shapes = projection_shapes(config)
    layers = {}  # (projection, format, bits per weight, description) -> layers holding it so
    for layer in range(config.n_layers):
        for projection in PROJECTION_TENSORS:
            held = (projection, *held_format(checkpoint, projection_tensor_names(layer, projection), quantize, dtype))
            layers[held] = layers.get(held, 0) + 1
    formats = [ProjectionFormat(projection, shapes[projection], count, *held)
               for (projection, *held), count in layers.items()]
    head_shape = (config.vocab_size, config.hidden_size)
    if lm_head_name(checkpoint, config) == "lm_head.weight":
        formats.append(ProjectionFormat("lm_head", head_shape, 1, *held_format(checkpoint, ["lm_head.weight"],
                                                                               quantize, dtype)))
    else:
        dense = np.dtype(dtype)
        formats.append(ProjectionFormat("lm_head", head_shape, 1, dense.name, 8 * dense.itemsize,
                                        "the embedding itself (tied), not quantized"))
    return formats


def streamed_bytes_per_step(checkpoint, quantize, dtype):
    """Bytes of weights a decode step reads in these formats: every product's weight and the norms
    (the embedding table gives one row per token and is not counted)."""
    return sum(f.nbytes for f in projection_formats(checkpoint, quantize, dtype)) + _norm_bytes(checkpoint.config, dtype)


def held_bytes(checkpoint, quantize, dtype):
    """Bytes load_weights holds on the device: what a decode step streams, and the embedding table
    where the LM head is a tensor of its own (a tied head is the table, already counted)."""
    config = checkpoint.config
    untied_embedding = lm_head_name(checkpoint, config) == "lm_head.weight"
    embedding = config.vocab_size * config.hidden_size * np.dtype(dtype).itemsize if untied_embedding else 0
    return streamed_bytes_per_step(checkpoint, quantize, dtype) + embedding


def plain_bytes_per_step(checkpoint, dtype):
    """Bytes of weights a decode step would read were every weight a plain `dtype` array: what the
    quantized formats are measured against."""
    config = checkpoint.config
    layer = sum(n * k for n, k in projection_shapes(config).values())
    matrices = config.n_layers * layer + config.vocab_size * config.hidden_size  # the LM head, tied or not
    return matrices * np.dtype(dtype).itemsize + _norm_bytes(config, dtype)


def _norm_bytes(config, dtype):
    """The RMSNorm weights: two per layer and the final one, `dtype` arrays of hidden_size."""
    return (2 * config.n_layers + 1) * config.hidden_size * np.dtype(dtype).itemsize


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
    """checkpoint: a minifd.model.loader Checkpoint or InMemoryCheckpoint, or a GGUFCheckpoint -> Weights
    as `dtype` arrays of module `xp`, the projections in the formats the module docstring says.
    quantize: None, "int8" or "int4": the format of the projections not stored in one already."""
    check_checkpoint(checkpoint, config)
    quantized = {}
    names = list(expected_shapes(config))
    head = lm_head_name(checkpoint, config)
    if head != "model.embed_tokens.weight":
        names.append(head)
    bar = ProgressBar("Loading weights", sum(checkpoint.nbytes(n) for n in names), 2**20, "MiB", enabled=progress)

    def fetch(*tensor_names, arrange=None, projection=None):
        """-> the named tensors put together by arrange(*parts) (a single one as it is), on the device.
        A projection (its Weights.quantized key) stored in a kernel format keeps its repacked blocks
        (arrange moving their rows); one that is not is rounded to `quantize`'s format, if any, from
        float32. On the GPU that is the quantized matrix, on the CPU float32 weights (the file's own
        dequantization, or the rounded matrix's) with the matrix in Weights.quantized."""
        put_together = arrange or (lambda part: part)
        kept = stored_kernel_format(checkpoint, tensor_names) if projection is not None else None
        rounded = projection is not None and kept is None and quantize is not None
        matrix = put_together(*map(checkpoint.repacked, tensor_names)) if kept is not None else None
        host = None
        if kept is None or xp is np:  # the weights `quantize` rounds, or those the CPU holds
            host = put_together(*(_to_dtype(checkpoint, name, np.float32 if rounded else dtype)
                                  for name in tensor_names))
        bar.advance(sum(map(checkpoint.nbytes, tensor_names)))
        if rounded:
            matrix = QUANTIZERS[quantize](host)
            if xp is np:
                host = matrix.dequantize().astype(dtype, copy=False)
        if matrix is not None and xp is np:
            quantized[projection] = matrix
        # The GPU keeps the codes (the kernels read them), the CPU float32 weights.
        on_device = placed(matrix, xp) if matrix is not None and xp is not np else xp.asarray(host)
        if xp is not np or host.flags.owndata:  # the file's pages are no longer read: let them go
            for name in tensor_names:
                checkpoint.release(name)
        return on_device

    pair_rows = partial(rowwise, partial(pair_rotary_rows, head_dim=config.head_dim))
    embed = fetch("model.embed_tokens.weight")
    layers = []
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        tensors = partial(projection_tensor_names, i)
        layers.append(LayerWeights(
            attn_norm=fetch(p + "input_layernorm.weight"),
            wqkv=fetch(*tensors("wqkv"), arrange=lambda q, k, v: stack_rows(pair_rows(q), pair_rows(k), v),
                       projection=f"layers.{i}.wqkv"),
            wo=fetch(*tensors("wo"), projection=f"layers.{i}.wo"),
            mlp_norm=fetch(p + "post_attention_layernorm.weight"),
            w_gate_up=fetch(*tensors("w_gate_up"), arrange=partial(rowwise, interleave_gate_up),
                            projection=f"layers.{i}.w_gate_up"),
            w_down=fetch(*tensors("w_down"), arrange=pad_down_columns, projection=f"layers.{i}.w_down"),
        ))
    norm = fetch("model.norm.weight")
    lm_head = embed if head == "model.embed_tokens.weight" else fetch(head, projection="lm_head")
    bar.close()
    return Weights(embed, layers, norm, lm_head, quantized)


def pad_down_columns(down):
    """down: [hidden, intermediate] -> [hidden, padded_features(intermediate)], zero columns past it
    (they meet the zero outputs of the gate/up layout's padding rows). A quantized down comes back as
    it is: its K is whole groups of 32, a multiple of the gate/up tiles already."""
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
