"""Chat templates give the token ids Hugging Face transformers' apply_chat_template gives."""

import json
import os

import pytest

from minifd.errors import MinifdError
from minifd.fixture import fixture_dir, fixture_ready
from minifd.model.chat_template import ChatTemplate
from minifd.model.config import LlamaConfig
from minifd.model.tokenizer import Tokenizer
from minifd.properties.random_model import tiny_config_dict
from tiny_model import byte_tokenizer

transformers = pytest.importorskip("transformers")

# Llama-2-chat's template as Meta shipped it: BOS before every [INST], the system prompt folded into
# the first user message, roles checked with raise_exception.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Llama-3.1-Instruct's layout, written across lines as Meta's is, so trim_blocks, lstrip_blocks and the
# `-` markers decide the whitespace; a default system prompt with today's date when none is given.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a helpful assistant." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Block tags on lines of their own (trim_blocks and lstrip_blocks remove their newlines and
# indentation), a {% generation %} block, loop controls, and transformers' tojson (no HTML escaping,
# non-ASCII kept).
JSON_TEMPLATE = """{% for message in messages %}
  {% if message['role'] == 'system' %}
    {% continue %}
  {% endif %}
<|im_start|>{{ message['role'] }}
  {% if message['role'] == 'assistant' %}
    {% generation %}{{ message['content'] }}{% endgeneration %}
  {% else %}
{{ message | tojson }}
  {% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

LLAMA2_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
LLAMA3_ADDED = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
CONVERSATIONS = {
    "one question": [{"role": "user", "content": "What is the capital of France?"}],
    "with a system prompt": [SYSTEM, {"role": "user", "content": "  Why is the sky blue?  "}],
    "several turns": [SYSTEM, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": " Hello. "},
                      {"role": "user", "content": "Tell me a <b>joke</b> & more\nover two lines."}],
    "non-ASCII text": [{"role": "user", "content": "Ünïcödé: 日本語のテキスト, emoji 🍕🇫🇷, «quotes»"},
                       {"role": "assistant", "content": "Ça va très bien — merci!"},
                       {"role": "user", "content": "Und jetzt auf Deutsch: Grüße?"}],
}


@pytest.fixture(params=["bytes", "smollm2"])
def tokenizer_json(request, tmp_path_factory):
    """A tokenizer.json to render with: the tests' byte-level one, and the SmolLM2 fixture's real BPE."""
    if request.param == "bytes":
        return byte_tokenizer_file(tmp_path_factory.mktemp("bytes"))
    if not fixture_ready():
        if os.environ.get("MINIFD_REQUIRE_FIXTURE"):
            raise RuntimeError(f"SmolLM2 fixture missing at {fixture_dir()}: run python scripts/prepare_smollm2.py")
        pytest.skip("SmolLM2 fixture not prepared (python scripts/prepare_smollm2.py)")
    return fixture_dir() / "tokenizer.json"


def checkpoint_tokenizer(directory, tokenizer_json, template, specials, added=()):
    """A directory with tokenizer.json (plus `added` special tokens) and a tokenizer_config.json holding
    the template -> (minifd's Tokenizer, its ChatTemplate, transformers' tokenizer of the same files)."""
    from tokenizers import Tokenizer as HFTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer.from_file(str(tokenizer_json))
    tokenizer.add_special_tokens([*specials.values(), *added])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(directory, LlamaConfig.from_dict(tiny_config_dict()))
    return ours, ChatTemplate.from_dir(directory, ours.special_tokens), transformers.AutoTokenizer.from_pretrained(directory)


def hf_chat_ids(hf_tokenizer, messages):
    return list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
@pytest.mark.parametrize("template, specials, added", [
    (LLAMA2_TEMPLATE, LLAMA2_SPECIALS, ()),
    (LLAMA3_TEMPLATE, LLAMA3_SPECIALS, LLAMA3_ADDED),
    (JSON_TEMPLATE, CHATML_SPECIALS, ()),
], ids=["llama2", "llama3", "json"])
def test_token_ids_equal_transformers(tmp_path, tokenizer_json, template, specials, added, conversation):
    ours, chat_template, hf = checkpoint_tokenizer(tmp_path / "t", tokenizer_json, template, specials, added)
    messages = CONVERSATIONS[conversation]
    if template is LLAMA2_TEMPLATE and conversation == "non-ASCII text":
        messages = [SYSTEM, *messages]
    ids = ours.encode(chat_template.render(messages), add_bos=False)
    assert ids == hf_chat_ids(hf, messages)
    assert ours.tokenizer.token_to_id(specials["bos_token"]) in ids  # written as text, read as the token


def test_a_template_file_beside_the_config_comes_first(tmp_path):
    ours, _, _ = checkpoint_tokenizer(tmp_path / "t", byte_tokenizer_file(tmp_path), LLAMA2_TEMPLATE, LLAMA2_SPECIALS)
    (tmp_path / "t" / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    chat_template = ChatTemplate.from_dir(tmp_path / "t", ours.special_tokens)
    messages = CONVERSATIONS["one question"]
    assert chat_template.source == LLAMA3_TEMPLATE
    assert ours.encode(chat_template.render(messages), add_bos=False) == hf_chat_ids(hf, messages)


def test_named_templates_use_the_default_one(tmp_path):
    directory = tmp_path / "t"
    directory.mkdir()
    named = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": LLAMA2_TEMPLATE}]
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert ChatTemplate.from_dir(directory, LLAMA2_SPECIALS).source == LLAMA2_TEMPLATE


def test_no_template_is_none(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(LLAMA2_SPECIALS))
    assert ChatTemplate.from_dir(tmp_path, LLAMA2_SPECIALS) is None


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{% set _ = messages.append(1) %}",  # the immutable sandbox: no mutating the conversation either
])
def test_a_template_reaching_python_fails_in_one_line(source):
    with pytest.raises(MinifdError, match="chat template <test>: refused, it reaches outside the sandbox") as error:
        ChatTemplate(source, {}, "<test>").render(CONVERSATIONS["one question"])
    assert "\n" not in str(error.value)


def test_raise_exception_and_bad_syntax_end_in_one_line():
    with pytest.raises(MinifdError, match="Conversation roles must alternate"):
        ChatTemplate(LLAMA2_TEMPLATE, LLAMA2_SPECIALS, "<test>").render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(MinifdError, match=r"not a valid Jinja template \(line 1: "):
        ChatTemplate("{% for %}", {}, "<test>").render(CONVERSATIONS["one question"])
    with pytest.raises(MinifdError, match="messages must be a non-empty list"):
        ChatTemplate(LLAMA2_TEMPLATE, LLAMA2_SPECIALS, "<test>").render([])


def byte_tokenizer_file(directory):
    path = directory / "bytes.json"
    byte_tokenizer().save(str(path))
    return path
