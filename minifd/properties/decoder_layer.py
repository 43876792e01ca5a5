"""The decoder-layer property: a tiny random model of one or two layers (minifd.model.llama over
every kernel of this backend) against the float64 oracle (minifd.oracle.forward), through a
prefill of ragged prompts into one KV cache and then decode steps of the whole batch, comparing the
logits of every prefill and of every sequence at every step with the oracle's full recomputation.

Tolerance, normwise on each logits vector: ||z - z64|| <= bound ||z64|| with

    bound = GAIN * CANCELLATION * sum over the stages of (u_store + 2 (L + 1) u32)

where a stage is one kernel whose output is stored in the model's dtype (u_store = 2^-11 on GPU,
float16; 2^-24 on the CPU, float32) after a float32 reduction of length L: per layer RMSNorm
(L = hidden / 2, see fused.py), the QKV product (hidden), RoPE (2), attention (head_dim + the
cache length), the O product (n_heads head_dim), RMSNorm (hidden / 2), gate/up (hidden), SiLU (1)
and down (intermediate); then the final RMSNorm and the LM head (hidden). Each term is that stage's
own relative bound (linear.py, attention_reference.py, fused.py). GAIN = 4 carries them to the
logits: the random weights are scaled to unit gain (1 / sqrt(fan_in)), and each RMSNorm can at most
double the relative error of its input's direction. The weights are rounded to the model's dtype
first, so the oracle computes with exactly the weights the model holds.
CANCELLATION is what the residual adds do to those relative errors. The rounding errors of x and o
are independent, so h = x + o carries errors of relative size e in both into an error of norm
e sqrt(||x||^2 + ||o||^2), relative size e sqrt(||x||^2 + ||o||^2) / ||h||: no larger than e while x
and o are at most orthogonal, larger where they nearly cancel (tiny hidden sizes make that likely).
The oracle reports both terms of every add; the factor is the product over the adds of that ratio
at the row whose logits are compared (the last), each floored at 1, so it is 1 wherever that row's
stream never cancels.
"""

import numpy as np
from hypothesis import strategies as st

from minifd import oracle
from minifd.backend import to_numpy
from minifd.model.config import LlamaConfig
from minifd.model.llama import KVCache, Llama
from minifd.model.loader import InMemoryCheckpoint
from minifd.model.weights import load_weights
from minifd.properties.random_model import random_tensors, tiny_config_dict
from minifd.properties.registry import SEEDS, Property, storage_dtype
from minifd.properties.tolerance import U32, closest_to_bound, norm_within_bound, unit_roundoff

GAIN = 4.0


@st.composite
def decoder_cases(draw, backend):
    """-> model sizes (head_dim 64 or 128 on GPU, where the attention kernels need it), prompt lengths,
    decode steps and the seed of weights and tokens."""
    n_kv_heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([64, 128])) if backend == "gpu" else 2 * draw(st.integers(2, 24))
    return dict(vocab_size=draw(st.integers(8, 200)), hidden_size=draw(st.integers(4, 48)),
                intermediate_size=draw(st.integers(4, 96)), n_layers=draw(st.integers(1, 2)),
                n_heads=n_kv_heads * draw(st.integers(1, 3)), n_kv_heads=n_kv_heads, head_dim=head_dim,
                tie=draw(st.booleans()), lengths=draw(st.lists(st.integers(1, 24), min_size=1, max_size=4)),
                steps=draw(st.integers(0, 8)), seed=draw(SEEDS))


def logits_bound(config, max_keys, dtype):
    """The module docstring's normwise bound for a model `config` attending to at most max_keys keys."""
    c, u_store = config, unit_roundoff(dtype)

    def stage(reduction_length):
        return u_store + 2 * (reduction_length + 1) * U32

    per_layer = (2 * stage(c.hidden_size / 2) + 2 * stage(c.hidden_size) + stage(2) + stage(c.head_dim + max_keys)
                 + stage(c.n_heads * c.head_dim) + stage(1) + stage(c.intermediate_size))
    return GAIN * (c.n_layers * per_layer + stage(c.hidden_size / 2) + stage(c.hidden_size))


def last_logits_and_cancellation(tensors, config, tokens):
    """The float64 oracle's logits of the last position, [vocab], and the module docstring's
    CANCELLATION for that row, from the oracle's residual adds."""
    ratios = []

    def on_residual(stream, update):  # [seq, hidden] each; only the last row is compared
        total = np.linalg.norm(stream[-1] + update[-1])
        independent = np.hypot(np.linalg.norm(stream[-1]), np.linalg.norm(update[-1]))
        ratios.append(max(1.0, independent / max(total, np.finfo(np.float64).tiny)))

    logits = oracle.forward(tensors, config, tokens, on_residual=on_residual)[-1]
    return logits, float(np.prod(ratios))


def check_decoder(case, xp):
    """Prefill every prompt into its cache slot, then decode `steps` tokens for the whole batch."""
    sizes = {key: case[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                                        "n_kv_heads", "head_dim", "tie")}
    config = LlamaConfig.from_dict(tiny_config_dict(**sizes))
    dtype = storage_dtype(xp)
    tensors = {name: tensor.astype(dtype).astype(np.float32)
               for name, tensor in random_tensors(config, seed=case["seed"], tie=case["tie"]).items()}
    max_seq = max(case["lengths"]) + case["steps"]
    model = Llama(config, load_weights(InMemoryCheckpoint(tensors), config, xp, dtype, progress=False), xp,
                  max_seq=max_seq)
    bound = logits_bound(config, max_seq, dtype)  # times each compared row's CANCELLATION
    rng = np.random.default_rng(case["seed"])
    sequences = [[int(t) for t in rng.integers(0, config.vocab_size, n)] for n in case["lengths"]]
    cache = KVCache.allocate(config, len(sequences), max_seq, xp, dtype)
    outcomes = []
    for slot, tokens in enumerate(sequences):
        logits = to_numpy(model.prefill(cache, slot, tokens))  # [vocab]
        expected, cancellation = last_logits_and_cancellation(tensors, config, tokens)
        outcomes.append(norm_within_bound(f"prefill logits of sequence {slot}", logits, expected,
                                          bound * cancellation))
    for step in range(case["steps"]):
        new_tokens = rng.integers(0, config.vocab_size, len(sequences))
        positions = np.array([len(s) for s in sequences], np.int32)
        logits = to_numpy(model.decode(cache, new_tokens, positions))  # [batch, vocab]
        for b, token in enumerate(new_tokens):
            sequences[b].append(int(token))
            expected, cancellation = last_logits_and_cancellation(tensors, config, sequences[b])
            outcomes.append(norm_within_bound(f"decode step {step} logits of sequence {b}", logits[b], expected,
                                              bound * cancellation))
    return closest_to_bound(*outcomes)


PROPERTIES = (
    Property("decoder_layer", "a random one- or two-layer model (prefill, then decode) vs the float64 oracle",
             decoder_cases, check_decoder),
)
