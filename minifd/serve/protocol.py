"""The OpenAI protocol of `minifd serve`: request bodies in, response objects and server-sent events out.

Pure functions and small dataclasses, no web framework: the HTTP app hands a request's body and
headers here, gives the engine the CompletionRequest that comes back, and writes out what the
builders here make of the engine's text. A refused request raises ProtocolError, which carries the
HTTP status and becomes OpenAI's error body ({"error": {"message", "type", "param", "code"}}).

What a request may say, for POST /v1/completions (parse_completion_request) and POST
/v1/chat/completions (parse_chat_request):
- prompt: one non-empty string (completions); messages: a non-empty array of {"role": "system" |
  "user" | "assistant", "content": a string} (chat).
- model: the served model's name, or left out (then it is the served model).
- max_tokens (chat: max_completion_tokens too, OpenAI's newer name): the most tokens to generate.
  Left out it is 16 for completions, OpenAI's default, and for chat whatever the context leaves after
  the messages, as OpenAI's chat endpoint does (tokens_to_generate resolves it once the prompt's
  length is known).
- temperature (default 1.0, OpenAI's), top_p (1.0), seed (none: a fresh one), stop (a string or up to
  4 strings), stream, stream_options.include_usage (only with stream, as OpenAI insists).
- top_k, min_p and repetition_penalty, which OpenAI lacks but vLLM accepts under these names with
  the meaning minifd gives them (the engine's generate() takes them as they are).
Their limits are the engine's own (minifd.engine.check_sampling), named as the request names them.
A field minifd does not do (n > 1, logprobs, presence_penalty, tools...) is refused rather than
ignored, so a client never reads text made under settings it did not get; at its neutral value (n = 1,
frequency_penalty = 0, ...) it changes nothing and is accepted, as is null for any field.
"""

import hmac
import json
import math
import re
import time
import uuid
from dataclasses import dataclass

from minifd.engine import check_sampling
from minifd.errors import MinifdError

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # OpenAI's limit
ROLES = ("system", "user", "assistant")
FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
          "stream", "stream_options")
TEXT_FIELDS = FIELDS + ("prompt",)
CHAT_FIELDS = FIELDS + ("messages", "max_completion_tokens")
# OpenAI's fields minifd does not do, at the values where they change nothing.
NEUTRAL_VALUES = {"n": 1, "best_of": 1, "echo": False, "logprobs": False, "presence_penalty": 0,
                  "frequency_penalty": 0}
METADATA_FIELDS = ("user",)  # says who the end user is, which changes nothing here
# OpenAI's error type for each status minifd answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error"}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # minifd's -> OpenAI's
DONE_EVENT = "data: [DONE]\n\n"  # the last event of every stream, as OpenAI ends one


# --- errors -------------------------------------------------------------------------------------

class ProtocolError(Exception):
    """A request the server refuses: its HTTP status, one sentence saying why, the request field at
    fault (param, or None), OpenAI's error type (by default the status's) and code (or None)."""

    def __init__(self, status, message, param=None, type=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES[status]

    @property
    def headers(self):
        """The HTTP headers the status calls for: how to authenticate (401), when to retry (429)."""
        return {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}.get(self.status, {})


def error_body(error):
    """A ProtocolError -> OpenAI's JSON error object."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def invalid(message, param=None, code=None):
    return ProtocolError(400, message, param, code=code)


def queue_full(limit):
    """The error for a request that finds `limit` requests waiting already."""
    return ProtocolError(429, f"the server has {limit} requests waiting, its limit; retry in a moment",
                         code="rate_limit_exceeded")


def server_error(error):
    """The error for a request the server took but could not finish (NaN logits, a failed device
    step): 500, saying what happened."""
    return ProtocolError(500, f"the request failed: {error}")


def check_authorization(authorization, api_key):
    """Refuse (401) unless the Authorization header (None when absent) is `Bearer <api_key>`.

    The key is compared with hmac.compare_digest, whose time does not depend on where the two first
    differ, so timing the answers cannot reveal the key a character at a time (its length alone may
    show)."""
    if authorization is None:
        raise ProtocolError(401, "no API key given; send the header Authorization: Bearer KEY", code="invalid_api_key")
    scheme, _, given = authorization.partition(" ")
    # compare_digest takes str only when it is ASCII, so compare the UTF-8 bytes.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ProtocolError(401, "incorrect API key", code="invalid_api_key")


def check_model(requested, served):
    """Refuse (404) a request for a model other than the one served."""
    if requested != served:
        raise ProtocolError(404, f"the model {requested!r} does not exist; this server serves {served!r}",
                            param="model", code="model_not_found")


# --- requests -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request of either endpoint, in the terms of Engine.generate and Engine.chat."""
    kind: str  # "text" (/v1/completions) or "chat" (/v1/chat/completions)
    model: str
    prompt: str = ""  # kind "text"
    messages: tuple = ()  # kind "chat": Message, ...
    max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS  # None: as many as the context leaves
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh one
    stop: tuple = ()
    stream: bool = False
    include_usage: bool = False  # a stream ends with a chunk of token counts

    def message_dicts(self):
        """The messages as Engine.chat and Engine.apply_chat_template take them."""
        return [{"role": message.role, "content": message.content} for message in self.messages]


def parse_completion_request(body, served_model):
    """The bytes of a POST /v1/completions body -> CompletionRequest of kind "text"; ProtocolError
    (400, 404) when it asks for what the server cannot do."""
    fields = parse_json_object(body)
    check_fields(fields, TEXT_FIELDS)
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        raise invalid(f"prompt must be a string, not {json_type(prompt)} (lists of prompts and token ids are "
                      "not supported)", "prompt")
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    max_tokens = optional(fields, "max_tokens", "an integer", DEFAULT_COMPLETION_MAX_TOKENS)
    return CompletionRequest("text", prompt=prompt, **common_settings(fields, served_model, max_tokens, "max_tokens"))


def parse_chat_request(body, served_model):
    """The bytes of a POST /v1/chat/completions body -> CompletionRequest of kind "chat"; ProtocolError
    (400, 404) when it asks for what the server cannot do."""
    fields = parse_json_object(body)
    check_fields(fields, CHAT_FIELDS)
    messages = parse_messages(fields.get("messages"))
    max_tokens_field = "max_completion_tokens" if fields.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = optional(fields, max_tokens_field, "an integer", None)
    if fields.get("max_tokens") not in (None, max_tokens):
        raise invalid("max_tokens and max_completion_tokens differ; give one of them", "max_tokens")
    return CompletionRequest("chat", messages=messages,
                             **common_settings(fields, served_model, max_tokens, max_tokens_field))


def parse_json_object(body):
    """bytes or str -> the JSON object they hold. NaN, Infinity and numbers past a float's range, which
    Python's json reads as floats that JSON lacks, are refused: an infinite or NaN temperature would
    pass every `<` check."""
    try:
        fields = json.loads(body, parse_constant=refuse_constant, parse_float=finite_float)
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid(f"the request body is not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise invalid(f"the request body must be a JSON object, not {json_type(fields)}")
    return fields


def refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is past the range of a float")
    return value


def check_fields(fields, known):
    """Refuse the fields this endpoint does not do, unless they are null or at a neutral value."""
    for name, value in fields.items():
        if value is None or name in known or name in METADATA_FIELDS:
            continue
        if name not in NEUTRAL_VALUES:
            raise invalid(f"{name} is not supported by this server", name)
        neutral = NEUTRAL_VALUES[name]
        if value != neutral or isinstance(value, bool) != isinstance(neutral, bool):
            raise invalid(f"{name}={json.dumps(value)} is not supported by this server; leave {name} out or "
                          f"set it to {json.dumps(neutral)}", name)


def common_settings(fields, served_model, max_tokens, max_tokens_field):
    """The settings both endpoints share, checked -> CompletionRequest's keyword arguments."""
    model = optional(fields, "model", "a string", served_model)
    check_model(model, served_model)
    settings = dict(model=model, max_tokens=max_tokens,
                    temperature=optional(fields, "temperature", "a number", 1.0),
                    top_p=optional(fields, "top_p", "a number", 1.0),
                    top_k=optional(fields, "top_k", "an integer", 0),
                    min_p=optional(fields, "min_p", "a number", 0.0),
                    repetition_penalty=optional(fields, "repetition_penalty", "a number", 1.0),
                    seed=optional(fields, "seed", "an integer", None),
                    stop=parse_stop(fields.get("stop")))
    check_engine_limits(settings, max_tokens_field)
    settings["stream"] = optional(fields, "stream", "a boolean", False)
    settings["include_usage"] = parse_stream_options(fields.get("stream_options"), settings["stream"])
    return settings


def check_engine_limits(settings, max_tokens_field):
    """Hold the settings to the limits Engine.generate holds them to, its message naming the request's
    field (max_tokens where the engine says max_new_tokens)."""
    max_tokens = settings["max_tokens"]
    try:
        check_sampling(0 if max_tokens is None else max_tokens, settings["temperature"], settings["top_k"],
                       settings["top_p"], settings["min_p"], settings["repetition_penalty"])
    except MinifdError as error:
        field = max_tokens_field if error.parameter == "max_new_tokens" else error.parameter
        raise invalid(re.sub(rf"\b{error.parameter}\b", field, str(error)), field) from None


def parse_messages(value):
    """The messages field -> tuple of Message."""
    if not isinstance(value, list) or not value:
        raise invalid('messages must be a non-empty array of {"role", "content"} objects', "messages")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object, not {json_type(message)}", "messages")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise invalid(f"{where}.{unknown[0]} is not supported by this server", "messages")
        if message.get("role") not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}, not {json.dumps(message.get('role'))}",
                          "messages")
        if not isinstance(message.get("content"), str):
            raise invalid(f"{where}.content must be a string, not {json_type(message.get('content'))} "
                          "(arrays of content parts are not supported)", "messages")
        messages.append(Message(message["role"], message["content"]))
    return tuple(messages)


def parse_stop(value):
    """The stop field (null, a string, or an array of up to MAX_STOP_STRINGS strings) -> tuple of str."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise invalid(f"stop must be a string or an array of strings, not {json_type(value)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop takes at most {MAX_STOP_STRINGS} strings, not {len(stops)}", "stop")
    if not all(stops):
        raise invalid("stop strings must not be empty", "stop")
    return tuple(stops)


def parse_stream_options(value, stream):
    """The stream_options field -> whether the stream ends with a usage chunk."""
    if value is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(value, dict):
        raise invalid(f"stream_options must be an object, not {json_type(value)}", "stream_options")
    unknown = sorted(set(value) - {"include_usage"})
    if unknown:
        raise invalid(f"stream_options.{unknown[0]} is not supported by this server", "stream_options")
    return optional(value, "include_usage", "a boolean", False, "stream_options.include_usage")


def optional(fields, name, expected, default, param=None):
    """fields[name] when it is there and not null, else default; refused unless of the expected JSON
    type ("a string", "an integer", "a number", which an integer is too and comes back as a float, or
    "a boolean"). param: how a message names the field (default: name)."""
    value = fields.get(name)
    if value is None:
        return default
    param = param or name
    if expected == "a number" and json_type(value) in ("an integer", "a number"):
        try:
            return float(value)
        except OverflowError:  # a JSON integer may have any number of digits
            raise invalid(f"{param} is too large", param) from None
    if json_type(value) != expected:
        raise invalid(f"{param} must be {expected}, not {json_type(value)}", param)
    return value


def json_type(value):
    """The JSON type of a parsed value, as a message names it."""
    if isinstance(value, bool):  # before int: bool is a subclass of int in Python, not in JSON
        return "a boolean"
    names = {type(None): "null", str: "a string", int: "an integer", float: "a number", list: "an array",
             dict: "an object"}
    return names[type(value)]


def tokens_to_generate(request, prompt_tokens, context):
    """The max_new_tokens to give the engine for a request whose prompt (or rendered messages) takes
    prompt_tokens tokens, on a server whose sequences hold at most `context` positions; refused (400)
    when prompt and completion do not fit."""
    field, takes = ("prompt", "takes") if request.kind == "text" else ("messages", "take")
    if request.max_tokens is None:
        if prompt_tokens >= context:
            raise invalid(f"the {field} {takes} {prompt_tokens} tokens, which leaves no room for a reply in this "
                          f"server's context of {context} tokens", field, "context_length_exceeded")
        return context - prompt_tokens
    total = prompt_tokens + request.max_tokens
    if total > context:
        raise invalid(f"the {field} {takes} {prompt_tokens} tokens and the completion up to {request.max_tokens} "
                      f"more, {total} in all, over this server's context of {context} tokens", field,
                      "context_length_exceeded")
    return request.max_tokens


# --- responses ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """What every object of one response shares: its id, when it was made, the model, the endpoint's
    kind ("text" or "chat") and whether a stream ends with a usage chunk."""
    id: str
    created: int  # Unix seconds
    model: str
    kind: str
    include_usage: bool = False

    @classmethod
    def for_request(cls, request):
        prefix = "chatcmpl-" if request.kind == "chat" else "cmpl-"
        return cls(prefix + uuid.uuid4().hex, int(time.time()), request.model, request.kind, request.include_usage)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def openai_finish_reason(reason):
    """minifd's finish reason (Completion.finish_reason) -> OpenAI's: an EOS token and a stop string
    both "stop". A cancelled request has none: it is cancelled when its client has gone, and nothing
    is sent then."""
    if reason not in FINISH_REASONS:
        raise ValueError(f"no OpenAI finish reason for {reason!r}; a cancelled request gets no response")
    return FINISH_REASONS[reason]


def response_body(reply, text, finish_reason, usage):
    """The whole answer to a request that did not stream: a text_completion or chat.completion object.
    finish_reason: minifd's; usage: Usage."""
    content = {"message": {"role": "assistant", "content": text}} if reply.kind == "chat" else {"text": text}
    return {**header(reply, "chat.completion" if reply.kind == "chat" else "text_completion"),
            "choices": [choice(content, openai_finish_reason(finish_reason))], "usage": usage.as_dict()}


def stream_start(reply):
    """The event that opens a stream: for chat, a chunk whose delta names the assistant's role; a
    text completion starts with its first piece, so with nothing."""
    if reply.kind != "chat":
        return ""
    return chunk_event(reply, [choice({"delta": {"role": "assistant", "content": ""}}, None)])


def stream_piece(reply, text):
    """The event carrying one new piece of the completion's text."""
    content = {"delta": {"content": text}} if reply.kind == "chat" else {"text": text}
    return chunk_event(reply, [choice(content, None)])


def stream_end(reply, finish_reason, usage):
    """The events that close a stream: a chunk with OpenAI's finish reason and no text, the token
    counts (a chunk with no choices) when the request asked for them, and [DONE]."""
    content = {"delta": {}} if reply.kind == "chat" else {"text": ""}
    events = chunk_event(reply, [choice(content, openai_finish_reason(finish_reason))])
    if reply.include_usage:
        events += chunk_event(reply, [], usage)
    return events + DONE_EVENT


def stream_error(error):
    """The events that end a stream that failed after it began: OpenAI's error object as a chunk of
    its own, and [DONE]."""
    return sse_event(error_body(error)) + DONE_EVENT


def choice(content, finish_reason):
    """The one choice of a response or chunk around its content: {"text": ...}, {"message": ...} or
    {"delta": ...}; finish_reason: OpenAI's, or None while the text goes on."""
    return {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}


def chunk_event(reply, choices, usage=None):
    """One chunk as a server-sent event. With include_usage every chunk has a usage field, null but in
    the last, as OpenAI sends it."""
    chunk = {**header(reply, "chat.completion.chunk" if reply.kind == "chat" else "text_completion"),
             "choices": choices}
    if reply.include_usage:
        chunk["usage"] = None if usage is None else usage.as_dict()
    return sse_event(chunk)


def header(reply, kind):
    return {"id": reply.id, "object": kind, "created": reply.created, "model": reply.model}


def sse_event(payload):
    """A JSON payload as one server-sent event. json.dumps escapes the newlines inside strings, so the
    payload stays on the one data line an event may not break."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def model_list(served_model, created):
    """The answer to GET /v1/models: the one model served, up since `created` (Unix seconds)."""
    return {"object": "list", "data": [{"id": served_model, "object": "model", "created": created,
                                        "owned_by": "minifd"}]}
