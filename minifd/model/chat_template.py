"""Chat templates: the Jinja template a checkpoint ships turns a conversation into its prompt text.

Rendered the way Hugging Face transformers' `apply_chat_template` renders it, so the token ids
agree: jinja2's immutable sandbox (templates come with downloaded files and must not reach Python)
with trim_blocks and lstrip_blocks, the loop controls and `{% generation %}` blocks, transformers'
`tojson` filter, `raise_exception` and `strftime_now`, and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) as variables. The text is then tokenized without adding BOS: the
template writes it where the model wants it.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from minifd.errors import MinifdError
from minifd.model.tokenizer import read_json_object

TEMPLATE_FILE = "chat_template.jinja"  # what newer transformers write beside tokenizer_config.json


class ChatTemplate:
    def __init__(self, source, special_tokens, origin):
        """source: the Jinja text; special_tokens: {"bos_token": "<s>", ...}, as the template sees them;
        origin: where the source came from, for error messages."""
        self.source, self.special_tokens, self.origin = source, dict(special_tokens), origin
        self._template = None  # compiled on first use: a checkpoint's template needs jinja2 only for chat

    @classmethod
    def from_dir(cls, weights_dir, special_tokens):
        """The checkpoint's own template: chat_template.jinja, which transformers prefers, else
        tokenizer_config.json's chat_template (a string, or a list of named templates of which
        "default" is the chat one) -> ChatTemplate, or None when the checkpoint has none."""
        weights_dir = Path(weights_dir)
        if (weights_dir / TEMPLATE_FILE).is_file():
            return cls.from_file(weights_dir / TEMPLATE_FILE, special_tokens)
        config_path = weights_dir / "tokenizer_config.json"
        source = read_json_object(config_path).get("chat_template")
        if isinstance(source, list):
            named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            return None
        return cls(source, special_tokens, f"{config_path} (chat_template)")

    @classmethod
    def from_file(cls, path, special_tokens):
        path = Path(path)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise MinifdError(f"chat template {path}: cannot be read ({error})") from None
        return cls(source, special_tokens, str(path))

    def render(self, messages, add_generation_prompt=True):
        """messages: [{"role": ..., "content": ...}, ...] -> the prompt text. add_generation_prompt: end
        with the header that opens the assistant's reply."""
        if not messages or not all(isinstance(message, dict) for message in messages):
            raise MinifdError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts",
                              parameter="messages")
        template = self.compiled()
        import jinja2  # there once the template compiled
        # As transformers does: keys whose value is None are left out (templates test for presence),
        # and the template gets copies, never the caller's objects.
        conversation = [{key: value for key, value in message.items() if value is not None} for message in messages]
        try:
            return template.render(messages=conversation, add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens)
        except jinja2.exceptions.SecurityError as error:
            raise MinifdError(f"chat template {self.origin}: refused, it reaches outside the sandbox ({error})") from None
        except jinja2.exceptions.TemplateError as error:  # raise_exception, or an undefined name used
            raise MinifdError(f"chat template {self.origin}: {error}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:  # the template's own bug
            raise MinifdError(f"chat template {self.origin}: fails on this conversation "
                              f"({type(error).__name__}: {error})") from None

    def compiled(self):
        """-> the jinja2 Template, compiled once."""
        if self._template is not None:
            return self._template
        try:
            environment = sandboxed_environment()
        except ImportError:
            raise MinifdError("chat templates need jinja2: pip install 'minifd[chat]'") from None
        import jinja2

        try:
            self._template = environment.from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise MinifdError(f"chat template {self.origin}: not a valid Jinja template "
                              f"(line {error.lineno}: {error.message})") from None
        return self._template


@lru_cache(maxsize=1)
def sandboxed_environment():
    """The Jinja environment transformers renders chat templates in (its utils/chat_template_utils.py),
    but for blocked attributes, which end the rendering."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class RefusingSandbox(ImmutableSandboxedEnvironment):
        """The sandbox renders a blocked attribute (`''.__class__`) as an empty string; a template that
        asks for one is not a chat template, so it is refused outright."""

        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    class GenerationBlocks(Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's text for training masks; rendering
        writes what it encloses."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: Jinja's own escapes HTML characters and takes no separators
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    environment = RefusingSandbox(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlocks, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment
