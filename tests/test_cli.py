"""`minifd run` as a user runs it: stdout holds only the continuation, stderr the summary."""

import re
import subprocess
import sys

import numpy as np
import pytest

import minifd
import minifd.engine
from minifd import oracle
from minifd.cli import main
from tiny_model import byte_tokenizer, tiny_config_dict, tiny_model, write_checkpoint


def minifd_cli(*args, check=True, stdin=""):
    """`minifd run ARGS` on the CPU, whatever GPU the machine has: results are compared with the CPU engine.
    stdin: the text piped into it."""
    result = subprocess.run([sys.executable, "-m", "minifd", *args, "--device", "cpu"], capture_output=True, text=True,
                            encoding="utf-8", input=stdin, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory, _, _ = tiny_model(tmp_path_factory.mktemp("cli") / "m")
    return directory


def test_run_prints_the_greedy_continuation_and_a_summary(model_dir):
    result = minifd_cli("run", "--weights", str(model_dir), "--max-new-tokens", "12", "--ignore-eos", "--device", "cpu",
                        "hello")
    engine = minifd.load(model_dir, device="cpu", progress=False)
    expected = engine.generate(["hello"], max_new_tokens=12, ignore_eos=True).completions[0]
    assert result.stdout == expected.text + "\n"
    for field in ("prompt tokens: 6", "generated tokens: 12", "time to first token", "tokens/s", "GB/s"):
        assert field in result.stderr


def test_greedy_tokens_match_the_oracle(model_dir):
    engine = minifd.load(model_dir, device="cpu", progress=False)
    completion = engine.generate(["abc"], max_new_tokens=8, ignore_eos=True).completions[0]
    checkpoint = minifd.model.loader.Checkpoint(model_dir)
    ids = list(completion.prompt_token_ids)
    for token in completion.token_ids:
        assert token == int(np.argmax(oracle.forward(checkpoint, engine.config, ids)[-1]))
        ids.append(token)


def test_greedy_tokens_with_a_repetition_penalty_match_the_oracle(model_dir):
    # The penalty reads every token the sequence holds, the prompt's and those the decode step chose.
    engine = minifd.load(model_dir, device="cpu", progress=False)
    completion = engine.generate(["abcabc", "xy"], max_new_tokens=10, ignore_eos=True,
                                 repetition_penalty=3.0).completions[0]
    checkpoint = minifd.model.loader.Checkpoint(model_dir)
    ids = list(completion.prompt_token_ids)
    for token in completion.token_ids:
        logits = oracle.forward(checkpoint, engine.config, ids)[-1]
        held = np.unique(ids)
        logits[held] = np.where(logits[held] < 0, logits[held] * 3.0, logits[held] / 3.0)
        assert token == int(np.argmax(logits))
        ids.append(token)
    plain = engine.generate(["abcabc"], max_new_tokens=10, ignore_eos=True).completions[0]
    assert plain.token_ids != completion.token_ids


def test_several_prompts_give_one_line_each_in_order(model_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("second prompt\n\nthird, longer prompt here\n")
    result = minifd_cli("run", "--weights", str(model_dir), "--max-new-tokens", "5", "--ignore-eos",
                        "--prompts-file", str(prompts_file), "first")
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[-1] == ""
    engine = minifd.load(model_dir, device="cpu", progress=False)
    for line, prompt in zip(lines, ["first", "second prompt", "third, longer prompt here"]):
        text = engine.generate([prompt], max_new_tokens=5, ignore_eos=True).completions[0].text
        assert line == text.replace("\\", "\\\\").replace("\n", "\\n")


def test_same_seed_same_text_and_sampling_flags(model_dir):
    args = ("run", "--weights", str(model_dir), "--max-new-tokens", "16", "--ignore-eos", "--temperature", "1.0",
            "--top-k", "50", "--top-p", "0.9", "hi")
    first = minifd_cli(*args, "--seed", "7").stdout
    assert first == minifd_cli(*args, "--seed", "7").stdout
    others = {minifd_cli(*args, "--seed", str(seed)).stdout for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_generation_stops_at_eos(model_dir):
    engine = minifd.load(model_dir, device="cpu", progress=False)
    free = engine.generate(["x"], max_new_tokens=6, ignore_eos=True).completions[0]
    engine.tokenizer.eos_ids = frozenset({free.token_ids[2]})
    stopped = engine.generate(["x"], max_new_tokens=6).completions[0]
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2])]


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--max-new-tokens", "300"], "over the context of 256 tokens"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
])
def test_bad_flags_end_in_one_line_and_exit_2(model_dir, flags, message):
    result = minifd_cli("run", "--weights", str(model_dir), *flags, "hello", check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


# --- seeds -------------------------------------------------------------------------------------

def test_a_negative_seed_draws_one_that_the_summary_shows(model_dir):
    args = ("run", "--weights", str(model_dir), "--max-new-tokens", "16", "--ignore-eos", "--temperature", "1.0", "hi")
    drawn = minifd_cli(*args, "--seed", "-1")
    seed = re.search(r"seed: (\d+)", drawn.stderr).group(1)
    assert minifd_cli(*args, "--seed", seed).stdout == drawn.stdout
    assert "seed: 7" in minifd_cli(*args, "--seed", "7").stderr
    assert "seed" not in minifd_cli("run", "--weights", str(model_dir), "--max-new-tokens", "4", "hi").stderr


# --- where prompts come from -------------------------------------------------------------------

def test_a_prompt_piped_into_stdin(model_dir):
    args = ("run", "--weights", str(model_dir), "--max-new-tokens", "8", "--ignore-eos")
    piped = minifd_cli(*args, stdin="hello there\n")  # as `echo "hello there" | minifd run` pipes it
    assert piped.stdout == minifd_cli(*args, "hello there").stdout
    assert "prompt tokens: 12" in piped.stderr  # BOS and 11 bytes: echo's newline is not the prompt's


def test_prompts_file_dash_reads_one_prompt_per_line_from_stdin(model_dir):
    args = ("run", "--weights", str(model_dir), "--max-new-tokens", "5", "--ignore-eos")
    piped = minifd_cli(*args, "--prompts-file", "-", stdin="first\n\nsecond prompt\n")
    assert piped.stdout == minifd_cli(*args, "first", "second prompt").stdout
    assert len(piped.stdout.splitlines()) == 2


def test_no_prompt_and_nothing_piped_is_a_user_error(model_dir):
    result = minifd_cli("run", "--weights", str(model_dir), check=False, stdin="")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("minifd: error: no prompt given") and len(result.stderr.splitlines()) == 1


# --- text cut inside a character ---------------------------------------------------------------

def pizza_model(directory):
    """A tiny model that continues "hi" with 🍕 over and over, one byte token at a time: its layers add
    nothing to the residual stream, so the LM head maps each byte's (one-hot) embedding to the next byte."""
    _, config, tensors = tiny_model(directory)
    _, last_prompt_byte, *pizza = byte_tokenizer().encode("hi🍕", add_special_tokens=False).ids
    for i in range(config.n_layers):
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"][:] = 0
        tensors[f"model.layers.{i}.mlp.down_proj.weight"][:] = 0
    embed, lm_head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    for dim, (token, next_token) in enumerate(zip([last_prompt_byte, *pizza], [*pizza, pizza[0]])):
        embed[token] = np.eye(config.hidden_size)[dim]
        lm_head[next_token, dim] += 20.0
    return write_checkpoint(directory, tiny_config_dict(), tensors)


def test_a_continuation_cut_inside_a_character_ends_before_it(tmp_path):
    directory = pizza_model(tmp_path / "pizza")
    result = minifd_cli("run", "--weights", str(directory), "--max-new-tokens", str(22 * 4 + 2), "--ignore-eos", "hi")
    assert result.stdout == "🍕" * 22 + "\n"  # the 23rd pizza's first 2 of 4 bytes are held back
    completion = minifd.load(directory, device="cpu", progress=False).generate(["hi"], max_new_tokens=6).completions[0]
    assert completion.text == "🍕" and len(completion.token_ids) == 6


# --- settings that do not do what they say -----------------------------------------------------

def test_top_k_top_p_and_min_p_at_temperature_0_say_they_have_no_effect(model_dir):
    args = ("run", "--weights", str(model_dir), "--max-new-tokens", "6", "--ignore-eos", "hi")
    plain = minifd_cli(*args)
    for flags in (["--top-k", "5"], ["--top-p", "0.5"], ["--min-p", "0.2"], ["--top-k", "5", "--top-p", "0.5"]):
        noted = minifd_cli(*args, *flags)
        assert noted.stdout == plain.stdout
        notes = [line for line in noted.stderr.splitlines() if line.startswith("minifd: note:")]
        assert len(notes) == 1 and "--temperature 0" in notes[0] and "no effect" in notes[0]
    assert "note" not in plain.stderr


def test_max_context_above_the_window_says_it_is_capped(model_dir):
    result = minifd_cli("run", "--weights", str(model_dir), "--max-new-tokens", "4", "--max-context", "5000", "hi")
    notes = [line for line in result.stderr.splitlines() if line.startswith("minifd: note:")]
    assert notes == ["minifd: note: --max-context 5000 is above the model's window of 256 positions: using 256"]
    assert "note" not in minifd_cli("run", "--weights", str(model_dir), "--max-new-tokens", "4", "--max-context",
                                    "256", "hi").stderr


# --- long prompts: chunked prefill and its progress bar ------------------------------------------

def test_a_prompt_prefilled_in_chunks_continues_as_the_oracle_does(model_dir):
    engine = minifd.load(model_dir, device="cpu", progress=False, prefill_chunk=7)
    prompt = "a prompt longer than several chunks of seven tokens"
    completion = engine.generate([prompt, "hi"], max_new_tokens=6, ignore_eos=True).completions[0]
    checkpoint = minifd.model.loader.Checkpoint(model_dir)
    ids = list(completion.prompt_token_ids)
    for token in completion.token_ids:
        assert token == int(np.argmax(oracle.forward(checkpoint, engine.config, ids)[-1]))
        ids.append(token)
    whole = minifd.load(model_dir, device="cpu", progress=False, prefill_chunk=1000)
    assert whole.generate([prompt], max_new_tokens=6, ignore_eos=True).completions[0].token_ids == completion.token_ids


def test_prefill_shows_a_progress_bar_only_once_it_takes_a_while(model_dir, capsys, monkeypatch):
    engine = minifd.load(model_dir, device="cpu", progress=True, prefill_chunk=8)
    capsys.readouterr()  # the loading's bar
    prompt = "x" * 40  # BOS and 40 bytes: 6 chunks
    engine.generate([prompt], max_new_tokens=2)
    assert capsys.readouterr().err == ""  # done within PREFILL_PROGRESS_DELAY
    monkeypatch.setattr(minifd.engine, "PREFILL_PROGRESS_DELAY", 0.0)
    engine.generate([prompt], max_new_tokens=2)
    err = capsys.readouterr().err
    assert err.startswith("\rPrefill [") and err.endswith("] 41/41 tokens\n")


# --- minifd info ---------------------------------------------------------------------------------

def test_info_states_what_each_implementation_covers_and_the_phi_in_use(model_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path))  # no dispatch table: the defaults
    main(["info", "--weights", str(model_dir)])
    out = capsys.readouterr().out
    assert "GEMV for M = 1, flat GEMM for none, library for M >= 2" in out
    calibration, = [line for line in out.splitlines() if line.startswith("calibration:")]
    assert calibration.startswith("calibration: none (") and "all 2 layers use phi = 0.00" in calibration
