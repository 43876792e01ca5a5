"""GGUF checkpoints: a llama.cpp .gguf file as config, tokenizer, chat template and named tensors.

The `gguf` package's GGUFReader parses the file (metadata and memory-mapped tensor data); this
module maps what it reads onto what the rest of minifd expects of a Checkpoint: the Hugging Face
config and tensor names, a `tokenizers` tokenizer built from the file's vocabulary and merges, and
float32 tensors in Hugging Face's layout. llama.cpp's converter reorders the rows of the Q and K
projections for its RoPE; reading a tensor undoes that.

A tensor of type Q8_0, Q5_0, Q4_0, Q4_1 or Q4_K also comes as its blocks repacked into a kernel
format (GGUFCheckpoint.repacked, minifd.model.repack; Q4_K's sub-block scales rounded to fp16), which
load_weights keeps for the projections: on the GPU those stay quantized. Every other type (Q5_1,
Q5_K, Q6_K, F16, BF16, F32) is only read dequantized to float32, and becomes float16 on the GPU.
"""

from functools import cached_property, partial
from pathlib import Path

import numpy as np

from minifd.errors import MinifdError
from minifd.kernels.softmax_range import FILE_NAME as SOFTMAX_RANGES_FILE_NAME
from minifd.model.chat_template import ChatTemplate
from minifd.model.config import LlamaConfig
from minifd.model.dequantize import BLOCK_FORMATS, dequantize
from minifd.model.loader import release_pages
from minifd.model.quantized import rowwise
from minifd.model.repack import repack
from minifd.model.tokenizer import Tokenizer
from minifd.model.weights import expected_shapes

SUPPORTED_ARCHITECTURES = ("llama",)
REQUIRED = object()  # GGUFCheckpoint.metadata's default: the key must be there
# tokenizer.ggml.model: byte-level BPE (SmolLM2, Llama-3), SentencePiece BPE (Llama-2).
SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

GGUF_TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|im_start|> and friends
GGUF_TOKEN_TYPE_USER_DEFINED = 4  # added tokens matched whole in text but not special

# The regex split Llama-3's tokenizer.json applies before byte-level BPE (llama.cpp's "llama-bpe").
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The special tokens chat templates see (minifd.model.tokenizer.SPECIAL_TOKEN_NAMES) -> their id's key.
SPECIAL_TOKEN_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                      "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}

GGUF_LAYER_TENSOR_NAMES = {  # HF model.layers.N.<key>.weight -> GGUF blk.N.<value>.weight
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_GLOBAL_TENSOR_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                            "lm_head.weight": "output.weight"}


def gguf_tensor_name(hf_name):
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight', and the global tensors."""
    if hf_name in GGUF_GLOBAL_TENSOR_NAMES:
        return GGUF_GLOBAL_TENSOR_NAMES[hf_name]
    _, _, layer, projection = hf_name.removesuffix(".weight").split(".", 3)  # model, layers, N, projection
    return f"blk.{layer}.{GGUF_LAYER_TENSOR_NAMES[projection]}.weight"


def unpermute_rope_rows(weight, num_heads):
    """Undo llama.cpp's Q/K row permutation, so the weight suits HF's rotate-half RoPE.

    weight: [num_heads * head_dim, in_features] -> [num_heads * head_dim, in_features]

    HF rotates the pair (i, i + head_dim/2) of each head; llama.cpp rotates adjacent rows (2i, 2i+1).
    convert_hf_to_gguf therefore moves HF row (head h, half s, i) to GGUF row h*head_dim + 2i + s,
    i.e. it views the rows as [head, half, i] and swaps the last two axes. Viewing the GGUF rows as
    [head, i, half] and swapping back restores HF order.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    by_pair = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [head, i, half, ...]
    return by_pair.swapaxes(1, 2).reshape(weight.shape)  # [head, half, i, ...] flattened


class GGUFCheckpoint:
    """A Llama-architecture .gguf file through the Checkpoint interface: HF tensor names, float32 tensors
    dequantized as the GGUF format defines them, in HF's row order; Q8_0, Q5_0, Q4_0, Q4_1 and Q4_K
    ones also repacked into a kernel format (repacked)."""

    def __init__(self, path):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise MinifdError("reading .gguf files needs the gguf package: pip install 'minifd[gguf]'") from None
        self.path = self.dir = Path(path)  # `dir`: where the Checkpoint interface says tensors come from
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as error:
            raise MinifdError(f"{self.path}: not a GGUF file, or a truncated one ({self.path.stat().st_size} bytes; "
                              f"the reader says: {error})") from None
        self.fields = self.reader.fields
        architecture = self.metadata("general.architecture")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise MinifdError(f"{self.path}: architecture {architecture!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.names = self._check_tensors()  # HF name -> GGUF name, for every tensor the decoder uses

    def metadata(self, key, default=REQUIRED):
        """-> the value of a metadata key; `default` when the file lacks it (an error without one)."""
        field = self.fields.get(key)
        if field is None:
            if default is REQUIRED:
                raise MinifdError(f"{self.path}: the GGUF metadata has no {key!r}")
            return default
        return field.contents()

    @cached_property
    def config(self):
        return LlamaConfig.from_dict(self.hf_config(), source=f"{self.path} (metadata)")

    def hf_config(self):
        """llama.* metadata -> the config.json dict (LlamaForCausalLM) it stands for."""
        hidden_size = int(self.metadata("llama.embedding_length"))
        num_heads = int(self.metadata("llama.attention.head_count"))
        head_dim = int(self.metadata("llama.attention.key_length", hidden_size // num_heads))
        rotary_dim = int(self.metadata("llama.rope.dimension_count", head_dim))
        if rotary_dim != head_dim:
            raise MinifdError(f"{self.path}: RoPE on {rotary_dim} of {head_dim} head dimensions is not a Llama layout")
        raw = {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden_size,
            "intermediate_size": self.metadata("llama.feed_forward_length"),
            "num_hidden_layers": self.metadata("llama.block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": self.metadata("llama.attention.head_count_kv", num_heads),
            "head_dim": head_dim,
            "rms_norm_eps": float32_text(self.metadata("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": float32_text(self.metadata("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": self.metadata("llama.context_length"),
            "vocab_size": self.metadata("llama.vocab_size", None) or len(self.metadata("tokenizer.ggml.tokens")),
            "tie_word_embeddings": "output.weight" not in self.tensors,
        }
        if self.metadata("llama.rope.scaling.type", "none") == "linear":
            raw["rope_scaling"] = {"rope_type": "linear", "factor": self.metadata("llama.rope.scaling.factor")}
        if "rope_freqs.weight" in self.tensors:  # Llama-3.1 and later: llama3 scaling as a factor per pair
            raw["rope_scaling"] = {"rope_type": "per_dimension", "factors": self.rope_factors(head_dim).tolist()}
        token_ids = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
                     "pad_token_id": "tokenizer.ggml.padding_token_id"}
        raw.update({name: self.metadata(key) for name, key in token_ids.items() if key in self.fields})
        return raw

    def rope_factors(self, head_dim):
        """-> rope_freqs.weight: [head_dim // 2] float32, the factor that divides each pair's frequency."""
        tensor = self.tensors["rope_freqs.weight"]
        if tensor.tensor_type.name not in BLOCK_FORMATS or numpy_shape(tensor) != (head_dim // 2,):
            raise MinifdError(f"{self.path}: rope_freqs.weight is {tensor.tensor_type.name} of shape "
                              f"{list(numpy_shape(tensor))}, expected {head_dim // 2} factors")
        return dequantize(self.stored_bytes(tensor), tensor.tensor_type.name, (head_dim // 2,))

    def tokenizer(self):
        """-> Tokenizer over the file's vocabulary, merges and token types, with its BOS and EOS."""
        config = self.config
        tokens = self.metadata("tokenizer.ggml.tokens")
        model = self.metadata("tokenizer.ggml.model")
        if model not in SUPPORTED_TOKENIZER_MODELS:
            raise MinifdError(f"{self.path}: tokenizer.ggml.model {model!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)})")
        token_types = self.metadata("tokenizer.ggml.token_type")
        if model == "llama":
            add_space_prefix = bool(self.metadata("tokenizer.ggml.add_space_prefix", True))
            build = partial(sentencepiece_bpe, tokens, self.metadata("tokenizer.ggml.scores"), token_types,
                            add_space_prefix)
        else:
            pre_tokenization = pre_tokenizer(self.metadata("tokenizer.ggml.pre", "default"), self.path)
            merges = self.metadata("tokenizer.ggml.merges", [])  # a vocabulary of single bytes needs none
            build = partial(byte_level_bpe, tokens, merges, token_types, pre_tokenization)
        try:
            tokenizer = build()
        except Exception as error:  # tokenizers raises its own, untyped errors for a bad vocabulary
            raise MinifdError(f"{self.path}: the vocabulary and merges do not make a tokenizer ({error})") from None
        eos_ids = set(config.eos_token_ids)
        end_of_turn = self.metadata("tokenizer.ggml.eot_token_id", None)  # llama.cpp stops at it too
        if end_of_turn is not None:
            eos_ids.add(int(end_of_turn))
        special_token_ids = {name: int(self.metadata(key)) for name, key in SPECIAL_TOKEN_KEYS.items()
                             if key in self.fields}
        special_tokens = {name: tokens[token_id] for name, token_id in special_token_ids.items()
                          if 0 <= token_id < len(tokens)}
        # Without the flag llama.cpp adds BOS for a SentencePiece vocabulary, and not for byte-level BPE.
        add_bos = bool(self.metadata("tokenizer.ggml.add_bos_token", model == "llama"))
        return Tokenizer(tokenizer, config.bos_token_id, add_bos, eos_ids, special_tokens)

    def chat_template(self, special_tokens):
        """-> the file's tokenizer.chat_template as a ChatTemplate, or None when it has none."""
        source = self.metadata("tokenizer.chat_template", None)
        if not isinstance(source, str):
            return None
        return ChatTemplate(source, special_tokens, f"{self.path} (tokenizer.chat_template)")

    @property
    def softmax_ranges_path(self):
        """Where `minifd calibrate` writes this model's phi values and the engine reads them: beside the file."""
        return self.path.with_suffix("." + SOFTMAX_RANGES_FILE_NAME)

    def _check_tensors(self):
        """Every tensor the decoder needs is present, of a type minifd reads, of the shape the metadata
        implies, and inside the file -> {HF name: GGUF name}."""
        shapes = expected_shapes(self.config)
        if "output.weight" in self.tensors:
            shapes["lm_head.weight"] = (self.config.vocab_size, self.config.hidden_size)
        size = self.path.stat().st_size
        names = {}
        for hf_name, shape in shapes.items():
            name = gguf_tensor_name(hf_name)
            tensor = self.tensors.get(name)
            if tensor is None:
                raise MinifdError(f"{self.path}: has no tensor {name!r} (a Llama GGUF holds token_embd, "
                                  "output_norm and blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm, ffn_norm)")
            if tensor.tensor_type.name not in BLOCK_FORMATS:
                raise MinifdError(f"{self.path}: tensor {name!r} has type {tensor.tensor_type.name}, which minifd "
                                  f"does not read (supported: {', '.join(BLOCK_FORMATS)})")
            found = numpy_shape(tensor)
            if found != shape:
                raise MinifdError(f"{self.path}: tensor {name!r} has shape {list(found)}, "
                                  f"the file's metadata implies {list(shape)}")
            if tensor.data_offset + tensor.n_bytes > size:
                raise MinifdError(f"{self.path}: tensor {name!r} lies past the end of the file (truncated download?)")
            names[hf_name] = name
        return names

    def __contains__(self, name):
        return name in self.names

    def __getitem__(self, name):
        """-> the tensor as float32 in HF layout (Q and K rows back in HF's order)."""
        return self._in_hf_row_order(name, dequantize(self.raw(name), self.type_name(name), self.shape(name)))

    def repacked(self, name):
        """-> a Q8_0, Q5_0, Q4_0, Q4_1 or Q4_K tensor's blocks as the Int8Groups or Int4Groups that holds
        the same weights (Q4_K's to within its scales' fp16 rounding; minifd.model.repack), in HF layout
        like __getitem__'s."""
        matrix = repack(self.raw(name), self.type_name(name), self.shape(name), self.location(name))
        return self._in_hf_row_order(name, matrix)

    def _in_hf_row_order(self, name, weight):
        """weight: the tensor's [N, K] values or quantized matrix, in the file's row order -> in HF's."""
        if name.endswith("self_attn.q_proj.weight"):
            return rowwise(partial(unpermute_rope_rows, num_heads=self.config.n_heads), weight)
        if name.endswith("self_attn.k_proj.weight"):
            return rowwise(partial(unpermute_rope_rows, num_heads=self.config.n_kv_heads), weight)
        return weight

    def raw(self, name):
        """-> the tensor's bytes as stored: a read-only uint8 view into the mapped file."""
        if name not in self.names:
            raise MinifdError(f"{self.path}: no tensor {name!r}")
        return self.stored_bytes(self.tensors[self.names[name]])

    def stored_bytes(self, tensor):
        """A ReaderTensor's data as uint8, whatever its type (the reader views F32 and F16 as floats)."""
        return self.reader.data[tensor.data_offset : tensor.data_offset + tensor.n_bytes]

    def nbytes(self, name):
        return self.tensors[self.names[name]].n_bytes

    def shape(self, name):
        return numpy_shape(self.tensors[self.names[name]])

    def type_name(self, name):
        """The tensor's GGUF type (Q4_K, F16, ...): what minifd.model.repack.REPACKED_FORMATS reads."""
        return self.tensors[self.names[name]].tensor_type.name

    def release(self, name):
        """Unmap a tensor's pages once it has been dequantized (the file stays in the page cache)."""
        tensor = self.tensors[self.names[name]]
        release_pages(self.reader.data, tensor.data_offset, tensor.data_offset + tensor.n_bytes)

    def location(self, name):
        """Where a tensor lives, for error messages."""
        return f"{self.path} ({self.names[name]})" if name in self.names else str(self.path)


def numpy_shape(tensor):
    """A GGUF tensor's shape in NumPy order: GGUF lists the fastest-varying axis first."""
    return tuple(int(n) for n in reversed(tensor.shape))


def byte_level_bpe(tokens, merges, token_types, pre_tokenization):
    """GGUF tokenizer metadata -> tokenizers.Tokenizer, the byte-level BPE the vocabulary came from.

    tokens: byte-level spelled strings, index = id; merges: "left right" strings, best first;
    token_types: llama.cpp token types per id; pre_tokenization: the pre-tokenizer (see pre_tokenizer).
    """
    from tokenizers import decoders, models, processors
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merge_pairs = [tuple(merge.split(" ")) for merge in merges]
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenization
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return with_added_tokens(tokenizer, tokens, token_types)


def sentencepiece_bpe(tokens, scores, token_types, add_space_prefix):
    """A GGUF 'llama' vocabulary -> tokenizers.Tokenizer, built as transformers builds Llama-2's.

    tokens: SentencePiece pieces (spaces spelled "▁"; <0xNN> tokens for the bytes of characters no
    piece covers), index = id; scores: each piece's score, the higher the earlier it is merged.
    SentencePiece stores no merges: they are every split of a piece into two pieces of the
    vocabulary, ranked by the merged piece's score. add_space_prefix: the text gets a leading "▁".
    """
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    ids = {token: token_id for token_id, token in enumerate(tokens)}
    candidates = []  # (score of the merged piece, left, right), a piece's own splits by the ids of their parts
    for token, score in zip(tokens, scores):
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                  if token[:cut] in ids and token[cut:] in ids]
        candidates += [(score, left, right) for left, right in sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]]))]
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=True)  # stable: ties keep that order
    merges = [(left, right) for _, left, right in candidates]
    tokenizer = HFTokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    return with_added_tokens(tokenizer, tokens, token_types)


def with_added_tokens(tokenizer, tokens, token_types):
    """Control tokens become special added tokens and user-defined ones plain added tokens, both matched
    whole in raw text, in id order so the ids stay those of the vocabulary."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, token_types) if kind == GGUF_TOKEN_TYPE_CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, token_types) if kind == GGUF_TOKEN_TYPE_USER_DEFINED])
    return tokenizer


def pre_tokenizer(name, path):
    """tokenizer.ggml.pre -> the tokenizers pre-tokenizer of the tokenizer.json llama.cpp converted.

    'smollm' splits every digit off on its own before GPT-2's regex split; 'llama-bpe' (Llama-3) splits
    with its own regex (numbers in runs of up to three digits); 'gpt2' and 'default' are GPT-2's split.
    None adds a prefix space; ByteLevel maps bytes to the printable alphabet the vocabulary uses.
    """
    from tokenizers import Regex, pre_tokenizers

    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    known = {
        "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split]),
        "llama-bpe": lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]),
        "gpt2": lambda: gpt2_split,
        "default": lambda: gpt2_split,
    }
    if name not in known:
        raise MinifdError(f"{path}: tokenizer.ggml.pre {name!r} is not supported (supported: {', '.join(known)})")
    return known[name]()


def float32_text(value):
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))

