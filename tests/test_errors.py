"""Mistakes a user can make end in one clear line on stderr, exit status 2, nothing on stdout."""

import json
import shutil
import struct

import numpy as np
import pytest

import minifd
import minifd.engine
from minifd.cli import main
from minifd.errors import MinifdError
from minifd.model.loader import Checkpoint
from minifd.model.weights import expected_shapes, held_bytes
from tiny_model import tiny_config_dict, tiny_model


def run_cli(capsys, *args):
    """-> (exit status, stdout, stderr) of `minifd ARGS` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_line_error(capsys, args, *fragments):
    status, out, err = run_cli(capsys, *args)
    assert status == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture()
def model_dir(tmp_path):
    return tiny_model(tmp_path / "m")[0]


def run_args(directory, *extra):
    return ["run", "--weights", str(directory), "--device", "cpu", *extra, "hello"]


# --- the weights directory -------------------------------------------------------------------

def test_weights_missing(capsys, tmp_path):
    assert_one_line_error(capsys, run_args(tmp_path / "nope"), "no such directory", "nope")


def test_weights_not_a_directory(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(capsys, run_args(tmp_path / "file"), "not a directory")


@pytest.mark.parametrize("name, fragment", [("config.json", "config.json: not found"),
                                            ("tokenizer.json", "tokenizer.json: not found"),
                                            ("model.safetensors", "no *.safetensors files")])
def test_required_file_missing(capsys, model_dir, name, fragment):
    (model_dir / name).unlink()
    assert_one_line_error(capsys, run_args(model_dir), fragment)


# --- config.json -----------------------------------------------------------------------------

def write_config(directory, **changes):
    raw = tiny_config_dict()
    raw.update(changes)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))


def test_config_not_json(capsys, model_dir):
    (model_dir / "config.json").write_text("{not json")
    assert_one_line_error(capsys, run_args(model_dir), "config.json: not valid JSON")


def test_config_missing_key(capsys, model_dir):
    write_config(model_dir, hidden_size=None)
    assert_one_line_error(capsys, run_args(model_dir), "missing required key(s) hidden_size")


def test_config_other_architecture(capsys, model_dir):
    write_config(model_dir, architectures=["GPT2LMHeadModel"])
    assert_one_line_error(capsys, run_args(model_dir), "GPT2LMHeadModel is not supported", "LlamaForCausalLM")


def test_config_heads_do_not_divide_hidden(capsys, model_dir):
    write_config(model_dir, num_attention_heads=5, num_key_value_heads=5)
    assert_one_line_error(capsys, run_args(model_dir), "num_attention_heads (5) does not divide hidden_size (64)")


# --- safetensors -----------------------------------------------------------------------------

def rewrite_header(path, edit):
    """Apply edit(header dict) to a safetensors file's JSON header, keeping the data as it is."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def test_truncated_file(capsys, model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert_one_line_error(capsys, run_args(model_dir), "model.safetensors", "past the end of the file")


def test_file_shorter_than_its_header_length(capsys, model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x05")
    assert_one_line_error(capsys, run_args(model_dir), "truncated safetensors file")


def test_header_length_past_the_end(capsys, model_dir):
    path = model_dir / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    assert_one_line_error(capsys, run_args(model_dir), "header length", "runs past the end")


def test_header_not_json(capsys, model_dir):
    path = model_dir / "model.safetensors"
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8] + b"!" * length + raw[8 + length:])
    assert_one_line_error(capsys, run_args(model_dir), "header is not valid JSON")


def test_overlapping_tensors(capsys, model_dir):
    def overlap(header):
        a, b = "model.norm.weight", "model.layers.0.input_layernorm.weight"
        header[b]["data_offsets"] = header[a]["data_offsets"]

    rewrite_header(model_dir / "model.safetensors", overlap)
    assert_one_line_error(capsys, run_args(model_dir), "overlap")


def test_offsets_outside_the_data(capsys, model_dir):
    def outside(header):
        entry = header["model.norm.weight"]
        entry["data_offsets"] = [entry["data_offsets"][0] + 10**9, entry["data_offsets"][1] + 10**9]

    rewrite_header(model_dir / "model.safetensors", outside)
    assert_one_line_error(capsys, run_args(model_dir), "'model.norm.weight'", "past the end")


def test_offsets_that_do_not_fit_the_shape(capsys, model_dir):
    rewrite_header(model_dir / "model.safetensors", lambda h: h["model.norm.weight"].update(shape=[65]))
    assert_one_line_error(capsys, run_args(model_dir), "do not fit its shape")


def test_shape_disagrees_with_config(capsys, model_dir):
    write_config(model_dir, intermediate_size=100)
    assert_one_line_error(capsys, run_args(model_dir), "mlp.gate_proj.weight", "[96, 64]", "[100, 64]")


def test_unusable_dtype(capsys, model_dir):
    rewrite_header(model_dir / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="I32"))
    assert_one_line_error(capsys, run_args(model_dir), "'model.norm.weight' has dtype I32")


def test_needed_tensor_absent(capsys, model_dir):
    rewrite_header(model_dir / "model.safetensors", lambda h: h.pop("model.layers.1.mlp.up_proj.weight"))
    assert_one_line_error(capsys, run_args(model_dir), "no safetensors file has the tensor 'model.layers.1.mlp.up_proj.weight'")


def test_index_names_a_missing_shard(capsys, tmp_path):
    directory = tiny_model(tmp_path / "m", shards=2)[0]
    (directory / "model-00002-of-00002.safetensors").unlink()
    assert_one_line_error(capsys, run_args(directory), "model.safetensors.index.json", "model-00002-of-00002.safetensors")


# --- flags and prompts -----------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragment", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, not -1"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.01"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--max-new-tokens", "251"], "prompt 1 has 6 tokens; with --max-new-tokens 251 that is 257, over the context of 256"),
    (["--device", "tpu"], "--device"),
    (["--max-context", "0"], "--max-context must be >= 1, not 0"),
])
def test_bad_flags(capsys, model_dir, flags, fragment):
    assert_one_line_error(capsys, run_args(model_dir, *flags), fragment)


def test_empty_prompt(capsys, model_dir):
    assert_one_line_error(capsys, ["run", "--weights", str(model_dir), "--device", "cpu", "fine", ""],
                          "prompt 2 is empty")


@pytest.mark.parametrize("call, message", [
    (lambda engine: engine.generate(["hi"], max_new_tokens=-1), "max_new_tokens must be >= 0, not -1"),
    (lambda engine: engine.generate(["hi"], temperature=-1), "temperature must be >= 0, not -1"),
    (lambda engine: engine.generate(["hi"], top_k=-1), "top_k must be >= 0, not -1"),
    (lambda engine: engine.generate(["hi"], top_p=0), "top_p must be in (0, 1], not 0"),
    (lambda engine: engine.generate(["hello"], max_new_tokens=251), "with max_new_tokens 251 that is 257"),
    (lambda engine: minifd.load(engine.weights_dir, device="cpu", max_context=0), "max_context must be >= 1, not 0"),
    (lambda engine: minifd.load(engine.weights_dir, device="tpu"), "device must be auto, cpu or cuda, not 'tpu'"),
    (lambda engine: minifd.load(engine.weights_dir / "nope"), "weights_dir {dir}/nope: no such directory"),
])
def test_the_python_api_names_its_parameters_not_the_flags(model_dir, call, message):
    engine = minifd.load(model_dir, device="cpu", progress=False)
    with pytest.raises(MinifdError) as error:
        call(engine)
    assert message.format(dir=model_dir) in str(error.value) and "--" not in str(error.value)


def test_info_with_missing_weights_prints_nothing_before_its_error(capsys, tmp_path):
    assert_one_line_error(capsys, ["info", "--weights", str(tmp_path / "nope")], "--weights", "no such directory")


def test_debug_flag_shows_the_traceback(model_dir):
    with pytest.raises(MinifdError):
        main(["--debug", *run_args(model_dir, "--top-k", "-1")])


# --- GPU requests on a machine without one ----------------------------------------------------

def test_cuda_without_a_usable_gpu(capsys, model_dir):
    if minifd.backend.cupy_or_none() is not None:
        pytest.skip("this machine has a usable GPU")
    assert_one_line_error(capsys, ["run", "--weights", str(model_dir), "--device", "cuda", "hi"], "--device cuda")


# --- NaN never reaches sampling ----------------------------------------------------------------

def test_nan_logits_stop_with_the_step_named(capsys, tmp_path):
    directory, config, tensors = tiny_model(tmp_path / "m")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    from tiny_model import write_checkpoint

    write_checkpoint(directory, tiny_config_dict(), tensors)
    assert_one_line_error(capsys, run_args(directory), "NaN or Inf logits at the prefill")


def test_nan_that_appears_mid_decode_names_its_step(model_dir):
    engine = minifd.load(model_dir, device="cpu", progress=False)
    decode = engine.model.decode

    def poisoned_decode(cache, tokens, positions, launch):
        logits = decode(cache, tokens, positions, launch)
        if positions[0] >= 8:
            logits[0, 0] = np.inf
        return logits

    engine.model.decode = poisoned_decode
    with pytest.raises(MinifdError, match="NaN or Inf logits at decode step 3 for prompt"):
        engine.generate(["hello"], max_new_tokens=10, ignore_eos=True)


# --- memory stays flat -----------------------------------------------------------------------

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not shutil.os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_a_thousand_generate_calls_leave_host_memory_flat(model_dir):
    engine = minifd.load(model_dir, device="cpu", progress=False)
    for _ in range(100):
        engine.generate(["warm up"], max_new_tokens=2, ignore_eos=True)
    before = resident_bytes()
    for i in range(1000):
        engine.generate([f"call {i}"], max_new_tokens=2, ignore_eos=True)
    growth = resident_bytes() - before
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 1000 calls"


def test_checkpoint_reads_do_not_keep_growing_maps(model_dir):
    checkpoint = Checkpoint(model_dir)
    for _ in range(50):
        checkpoint["model.norm.weight"]
    assert len(checkpoint._maps) == 1


# --- out of memory (simulated: the same code path handles the GPU's OutOfMemoryError) ----------

def test_out_of_memory_for_the_weights_says_how_much(capsys, model_dir, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(minifd.engine, "load_weights", exhausted)
    assert_one_line_error(capsys, run_args(model_dir), "out of memory loading the weights", "GiB", "held in")


def test_the_weights_memory_estimate_counts_the_formats_they_are_held_in(model_dir):
    checkpoint = Checkpoint(model_dir)
    dense = held_bytes(checkpoint, None, np.float32)
    config = checkpoint.config  # untied: the LM head is a tensor beside the embedding table
    assert dense == (sum(np.prod(shape) for shape in expected_shapes(config).values()) + config.vocab_size * config.hidden_size) * 4
    assert held_bytes(checkpoint, "int8", np.float32) < dense


def test_out_of_memory_for_the_kv_cache_says_what_to_lower(capsys, model_dir, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(minifd.engine.KVCache, "allocate", exhausted)
    assert_one_line_error(capsys, run_args(model_dir), "out of memory for the KV cache", "lower --max-new-tokens")


def test_a_kernel_that_fails_to_compile_shows_the_compiler_message(tmp_path):
    if minifd.backend.cupy_or_none() is None:
        pytest.skip("needs CuPy and a GPU to run the run-time compiler")
    from minifd.kernels.compile import load_module

    (tmp_path / "broken.cu").write_text('#include "portable.cuh"\nextern "C" __global__ void k() { undeclared_name = 1; }\n')
    with pytest.raises(MinifdError, match="kernel broken.cu failed to compile.*undeclared_name"):
        load_module("broken.cu", kernels_dir=str(tmp_path))


# --- tables are replaced atomically -----------------------------------------------------------

def test_a_crash_mid_write_leaves_the_old_table(tmp_path, monkeypatch):
    from minifd import files
    from minifd.kernels.softmax_range import SoftmaxRange, load_softmax_ranges, save_softmax_ranges

    path = tmp_path / "minifd_softmax.json"
    save_softmax_ranges(path, [SoftmaxRange(phi=1.5)] * 2)

    def crash(*args):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_softmax_ranges(path, [SoftmaxRange(phi=-3.0)] * 2)
    assert [r.phi for r in load_softmax_ranges(path, 2)] == [1.5, 1.5]
    assert [p.name for p in tmp_path.iterdir()] == ["minifd_softmax.json"]


def test_the_dispatch_table_is_written_through_the_same_atomic_path(tmp_path, monkeypatch):
    from minifd import files
    from minifd.kernels import dispatch

    path = tmp_path / "table.json"
    dispatch.write_table(path, {"cpu": {"8,8": {"m1": 2, "m2": 4, "max_m": 16}}})
    monkeypatch.setattr(files.os, "replace", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        dispatch.write_table(path, {"cpu": {}})
    assert dispatch.read_table(path)["cpu"]["8,8"]["m2"] == 4
