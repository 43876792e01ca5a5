"""Chat on a tiny random model: stop rules, the cached prefix, `run --chat` and `minifd chat`."""

import json
import os
import re
import signal
import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minifd
from minifd.cli import interrupt_sets
from minifd.errors import MinifdError
from minifd.model import chat_template
from minifd.model.llama import KVCache
from minifd.sequence import Sequence, StopStrings
from test_cli import minifd_cli
from tiny_model import tiny_model

# The byte tokenizer's <s> and </s> as the template's markers, ChatML's layout.
TEMPLATE = ("{% for message in messages %}{{ bos_token + message['role'] + '\\n' + message['content'] + eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory, _, _ = tiny_model(tmp_path_factory.mktemp("chat") / "m")
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory):
    directory, _, _ = tiny_model(tmp_path_factory.mktemp("bare") / "m")
    return directory


def load(directory, **options):
    return minifd.load(directory, device="cpu", progress=False, **options)


# --- stop strings ----------------------------------------------------------------------------------

@given(text=st.text("ab\n", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=6),
       stops=st.lists(st.text("ab\n", min_size=1, max_size=4), max_size=3))
def test_streamed_text_is_cut_before_the_first_stop_string(text, cuts, stops):
    pieces = [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)])]
    stop_strings, out, stopped = StopStrings(stops), [], False
    for piece in pieces:
        emitted, stopped = stop_strings.push(piece)
        out.append(emitted)
        if stopped:
            break
    if not stopped:
        out.append(stop_strings.flush())
    first = min((at for at in (text.find(stop) for stop in stops) if at >= 0), default=len(text))
    assert "".join(out) == text[:first]
    assert stopped == (first < len(text))


def test_text_that_may_start_a_stop_string_is_held_back_until_settled():
    stop_strings = StopStrings(["</answer>"])
    assert stop_strings.push("Paris</an") == ("Paris", False)
    assert stop_strings.push("t") == ("</ant", False)
    assert stop_strings.push("s</") == ("s", False)
    assert stop_strings.push("answer> more") == ("", True)


def test_generation_ends_before_a_stop_string_spanning_tokens(model_dir):
    engine = load(model_dir)
    free = engine.generate(["hello"], max_new_tokens=24, ignore_eos=True).completions[0]
    stop = free.text[10:13]  # three byte tokens
    pieces = []
    stopped = engine.generate(["hello"], max_new_tokens=24, ignore_eos=True, stop=["never there", stop],
                              on_text=lambda _, text: pieces.append(text)).completions[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == "".join(pieces) == free.text[:free.text.find(stop)]
    assert stopped.token_ids == free.token_ids[:len(stopped.token_ids)]


def test_a_stop_string_that_is_a_special_token_stops_at_its_id(model_dir):
    tokenizer = load(model_dir).tokenizer
    assert tokenizer.special_token_ids(["</s>", "s>", "hello", "<s>"]) == {256, 257}
    hi = tokenizer.encode("hi", add_bos=False)
    sequence = Sequence([256, hi[0]], tokenizer, max_new_tokens=5, stop_strings=["</s>"])
    sequence.accept(hi[1])
    sequence.accept(257)  # decoded text leaves </s> out, so no text could ever match it
    assert (sequence.finish_reason, sequence.token_ids, sequence.text) == ("stop", hi[1:], "i")


def test_every_eos_id_of_generation_config_ends_generation(tmp_path):
    directory, _, _ = tiny_model(tmp_path / "m")
    free = load(directory).generate(["x"], max_new_tokens=12, ignore_eos=True).completions[0]
    eos_ids = [free.token_ids[7], free.token_ids[4]]  # Llama-3 lists several: the first one met ends it
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    engine = load(directory)
    assert set(eos_ids) <= engine.tokenizer.eos_ids
    stopped = engine.generate(["x"], max_new_tokens=12).completions[0]
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[4])]


def test_cancel_ends_generation_after_the_current_token(model_dir):
    engine = load(model_dir)
    free = engine.generate(["hello"], max_new_tokens=20, ignore_eos=True).completions[0]
    cancel = threading.Event()
    cancel.set()  # before the first token: the prefill's token is the last
    completion = engine.generate(["hello"], max_new_tokens=20, ignore_eos=True, cancel=cancel).completions[0]
    assert completion.finish_reason == "cancelled" and completion.token_ids == free.token_ids[:1]


def test_ctrl_c_sets_the_event_instead_of_raising():
    cancel = threading.Event()
    with interrupt_sets(cancel):
        os.kill(os.getpid(), signal.SIGINT)
    assert cancel.is_set()


# --- the chat's KV cache -------------------------------------------------------------------------

def test_a_continued_conversation_prefills_only_past_the_cached_prefix(model_dir, monkeypatch):
    engine = load(model_dir, prefill_chunk=4)
    prefilled = []
    prefill_chunks = engine.model.prefill_chunks
    monkeypatch.setattr(engine.model, "prefill_chunks", lambda cache, chunks: prefilled.extend(c.start for c in chunks)
                        or prefill_chunks(cache, chunks))
    first = [{"role": "user", "content": "hi"}]
    reply = engine.chat(first, max_new_tokens=6, ignore_eos=True)
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
    prefilled.clear()
    continued = engine.chat(second, max_new_tokens=6, ignore_eos=True)
    # The first turn's prompt and the reply's tokens, up to where re-rendering them differs, are reused.
    assert prefilled[0] >= len(engine.apply_chat_template(first))
    assert continued == load(model_dir).chat(second, max_new_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_the_chat_cache_holds_the_keys_and_values_of_the_tokens_it_claims(tmp_path, ignore_eos):
    directory, _, _ = tiny_model(tmp_path / "m")
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    messages = [{"role": "user", "content": "hi"}]
    engine = load(directory)
    if not ignore_eos:  # the reply ends at an EOS: make that its fifth token
        free = load(directory).generate([engine.apply_chat_template(messages)], max_new_tokens=8, ignore_eos=True)
        engine.tokenizer.eos_ids = frozenset({free.completions[0].token_ids[4]})
    engine.chat(messages, max_new_tokens=8, ignore_eos=ignore_eos)
    held = engine._chat_ids
    fresh = KVCache.allocate(engine.config, 1, len(held), np, np.float32)
    engine.model.prefill(fresh, 0, held)
    for cached, expected in zip(engine._chat_cache.k + engine._chat_cache.v, fresh.k + fresh.v):
        np.testing.assert_allclose(cached[0, :, :len(held)], expected[0], rtol=1e-4, atol=1e-5)


def test_the_chat_cache_grows_with_the_conversation(model_dir):
    engine = load(model_dir)
    messages = [{"role": "user", "content": "hi"}]
    engine.chat(messages, max_new_tokens=4, ignore_eos=True)
    small = engine._chat_cache.max_seq
    messages += [{"role": "assistant", "content": "x" * small}, {"role": "user", "content": "more"}]
    reply = engine.chat(messages, max_new_tokens=4, ignore_eos=True)
    assert engine._chat_cache.max_seq > small
    assert reply == load(model_dir).chat(messages, max_new_tokens=4, ignore_eos=True)


# --- the command line ------------------------------------------------------------------------------

def test_run_chat_generates_from_the_rendered_conversation(model_dir):
    result = minifd_cli("run", "--chat", "--system", "Be brief.", "--weights", str(model_dir), "--max-new-tokens", "8",
                        "--ignore-eos", "hello")
    engine = load(model_dir)
    ids = engine.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    assert ids[:1] == [engine.tokenizer.bos_id] and ids.count(engine.tokenizer.bos_id) == 3  # the template's, no more
    assert result.stdout == engine.generate([ids], max_new_tokens=8, ignore_eos=True).completions[0].text + "\n"


def test_a_piped_chat_replies_as_rendering_each_turn_from_scratch(model_dir):
    args = ("chat", "--weights", str(model_dir), "--max-new-tokens", "6", "--ignore-eos")
    result = minifd_cli(*args, stdin="hello there\n\nwhat next?\n")
    history, expected = [], ""
    for message in ("hello there", "what next?"):
        history.append({"role": "user", "content": message})
        engine = load(model_dir)
        reply = engine.generate([engine.apply_chat_template(history)], max_new_tokens=6, ignore_eos=True).completions[0].text
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert result.stdout == expected
    assert result.stderr == ""


def test_a_sampled_chat_says_its_seed_and_that_seed_repeats_it(model_dir):
    args = ("chat", "--weights", str(model_dir), "--max-new-tokens", "6", "--ignore-eos", "--temperature", "0.9")
    first = minifd_cli(*args, stdin="hello there\nwhat next?\n")
    seed = re.fullmatch(r"\[minifd\] sampling seed (\d+) \(--seed \1 repeats the session\)\n", first.stderr).group(1)
    again = minifd_cli(*args, "--seed", seed, stdin="hello there\nwhat next?\n")
    assert again.stdout == first.stdout and again.stderr == first.stderr


def test_chat_commands_reset_and_set_the_system_prompt(model_dir):
    args = ("chat", "--weights", str(model_dir), "--max-new-tokens", "5", "--ignore-eos")
    replies = minifd_cli(*args, stdin="hello\n/reset\nhello\n/system Be brief.\nagain\n/quit\nnever read\n").stdout
    first, after_reset, with_system, end = replies.split("\n")
    engine = load(model_dir)
    assert first == after_reset == engine.chat([{"role": "user", "content": "hello"}], max_new_tokens=5, ignore_eos=True)
    assert with_system == engine.chat([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                       {"role": "user", "content": "again"}], max_new_tokens=5, ignore_eos=True)
    assert end == ""


@pytest.mark.parametrize("command", [("run", "--chat", "hello"), ("chat",)])
def test_chat_without_a_template_names_the_flag_in_one_line(bare_model_dir, command):
    result = minifd_cli(*command, "--weights", str(bare_model_dir), check=False, stdin="hello\n")
    assert result.returncode == 2 and result.stdout == ""
    assert "--chat-template" in result.stderr and len(result.stderr.splitlines()) == 1
    with pytest.raises(MinifdError, match="chat_template=FILE"):
        load(bare_model_dir).apply_chat_template([{"role": "user", "content": "hello"}])


def test_a_template_reaching_python_ends_in_one_line(bare_model_dir, tmp_path):
    hostile = tmp_path / "hostile.jinja"
    hostile.write_text("{{ ''.__class__.__mro__ }}")
    result = minifd_cli("run", "--chat", "--chat-template", str(hostile), "--weights", str(bare_model_dir), "hello",
                        check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"minifd: error: chat template {hostile}: refused, it reaches outside the sandbox")
    assert len(result.stderr.splitlines()) == 1


def test_chat_without_jinja2_says_what_to_install(model_dir, monkeypatch):
    chat_template.sandboxed_environment.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` now fails as if it were not installed
    try:
        with pytest.raises(MinifdError, match=r"^chat templates need jinja2: pip install 'minifd\[chat\]'$"):
            load(model_dir).apply_chat_template([{"role": "user", "content": "hello"}])
    finally:
        chat_template.sandboxed_environment.cache_clear()


def test_system_without_chat_says_it_has_no_effect(model_dir):
    result = minifd_cli("run", "--system", "Be brief.", "--weights", str(model_dir), "--max-new-tokens", "3", "hi")
    notes = [line for line in result.stderr.splitlines() if line.startswith("minifd: note:")]
    assert len(notes) == 1 and "--system" in notes[0] and "no effect" in notes[0]
