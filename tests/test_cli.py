"""`minifd run` as a user runs it: stdout holds only the continuation, stderr the summary."""

import subprocess
import sys

import numpy as np
import pytest

import minifd
from minifd import oracle
from tiny_model import tiny_model


def minifd_cli(*args, check=True):
    """`minifd run ARGS` on the CPU, whatever GPU the machine has: results are compared with the CPU engine."""
    result = subprocess.run([sys.executable, "-m", "minifd", *args, "--device", "cpu"], capture_output=True, text=True, timeout=120)
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
])
def test_bad_flags_end_in_one_line_and_exit_2(model_dir, flags, message):
    result = minifd_cli("run", "--weights", str(model_dir), *flags, "hello", check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
