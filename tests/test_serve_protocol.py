"""The OpenAI protocol layer of `minifd serve` (minifd/serve/protocol.py, metrics.py), without a server:
what each request body becomes or why it is refused, the error bodies, the response objects and the
events of a stream, the API key check and the /metrics text."""

import hmac
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from minifd.serve import protocol
from minifd.serve.metrics import Metrics
from minifd.serve.protocol import (CompletionRequest, Message, ProtocolError, Reply, Usage, check_authorization,
                                   error_body, model_list, parse_chat_request, parse_completion_request,
                                   queue_full, response_body, stream_end, stream_piece, stream_start,
                                   tokens_to_generate)

SERVED = "smollm2"
HELLO = [{"role": "user", "content": "Hello"}]


def completion(**fields):
    return parse_completion_request(json.dumps({"prompt": "The capital of France is", **fields}).encode(), SERVED)


def chat(**fields):
    return parse_chat_request(json.dumps({"messages": HELLO, **fields}).encode(), SERVED)


def refusal(parse, body):
    """The ProtocolError parse(body) raises, body a dict (sent as JSON) or raw bytes."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ProtocolError) as error:
        parse(raw, SERVED)
    return error.value


# --- completions requests -------------------------------------------------------------------------

def test_completion_defaults_are_openais():
    request = completion()
    assert request == CompletionRequest("text", model=SERVED, prompt="The capital of France is", max_tokens=16,
                                        temperature=1.0, top_p=1.0, seed=None, stop=(), stream=False,
                                        include_usage=False)


def test_completion_takes_every_setting():
    request = completion(model=SERVED, max_tokens=5, temperature=0, top_p=0.5, top_k=40, min_p=0.1,
                         repetition_penalty=1.2, seed=7, stop=["\n", "."], stream=True,
                         stream_options={"include_usage": True}, n=1, user="someone")
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k, request.min_p) == (5, 0.0, 0.5, 40, 0.1)
    assert (request.repetition_penalty, request.seed, request.stop) == (1.2, 7, ("\n", "."))
    assert request.stream and request.include_usage
    assert isinstance(request.temperature, float)  # a JSON integer where a number is asked becomes a float


def test_a_stop_string_alone_and_nulls_as_absent():
    assert completion(stop="\n").stop == ("\n",)
    request = completion(stop=None, max_tokens=None, temperature=None, seed=None, n=None, logprobs=None)
    assert (request.stop, request.max_tokens, request.temperature, request.seed) == ((), 16, 1.0, None)


@pytest.mark.parametrize("parse", [completion, chat])
def test_fields_at_their_neutral_value_are_accepted(parse):
    neutral = parse(n=1, best_of=1, echo=False, logprobs=False, presence_penalty=0.0, frequency_penalty=0)
    assert neutral == parse()


def test_a_str_body_is_read_as_bytes_are():
    assert parse_completion_request('{"prompt": "x"}', SERVED).prompt == "x"


@pytest.mark.parametrize("body, param, fragment", [
    ({}, "prompt", "prompt must be a string, not null"),
    ({"prompt": ["a", "b"]}, "prompt", "prompt must be a string, not an array"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids are not supported"),
    ({"prompt": ""}, "prompt", "prompt must not be empty"),
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens", "max_tokens must be an integer, not a string"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", "max_tokens must be an integer, not a number"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "max_tokens must be an integer, not a boolean"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "temperature must be a number, not a string"),
    ({"prompt": "x", "temperature": False}, "temperature", "temperature must be a number, not a boolean"),
    ({"prompt": "x", "seed": 1.5}, "seed", "seed must be an integer, not a number"),
    ({"prompt": "x", "stream": "yes"}, "stream", "stream must be a boolean, not a string"),
    ({"prompt": "x", "model": 3}, "model", "model must be a string, not an integer"),
    ({"prompt": "x", "stop": 3}, "stop", "stop must be a string or an array of strings, not an integer"),
    ({"prompt": "x", "stop": ["a", 1]}, "stop", "stop must be a string or an array of strings"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop takes at most 4 strings, not 5"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop", "stop strings must not be empty"),
    ({"prompt": "x", "n": 2}, "n", "n=2 is not supported by this server; leave n out or set it to 1"),
    ({"prompt": "x", "n": True}, "n", "n=true is not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "best_of=3 is not supported"),
    ({"prompt": "x", "echo": True}, "echo", "echo=true is not supported"),
    ({"prompt": "x", "logprobs": 2}, "logprobs", "logprobs=2 is not supported"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "presence_penalty=0.5 is not supported"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "suffix is not supported by this server"),
    ({"prompt": "x", "messages": HELLO}, "messages", "messages is not supported by this server"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     "stream_options is only allowed when stream is true"),
    ({"prompt": "x", "stream": True, "stream_options": True}, "stream_options",
     "stream_options must be an object, not a boolean"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "stream_options.include_usage must be a boolean, not an integer"),
    ({"prompt": "x", "stream": True, "stream_options": {"chunk_size": 4}}, "stream_options",
     "stream_options.chunk_size is not supported"),
])
def test_completion_refusals(body, param, fragment):
    error = refusal(parse_completion_request, body)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)
    assert fragment in error.message, error.message


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens must be >= 0, not -1"),
    ({"prompt": "x", "temperature": -0.5}, "temperature", "temperature must be >= 0, not -0.5"),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p must be in (0, 1], not 0.0"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "top_p must be in (0, 1], not 1.5"),
    ({"prompt": "x", "top_k": -1}, "top_k", "top_k must be >= 0, not -1"),
    ({"prompt": "x", "min_p": 2}, "min_p", "min_p must be in [0, 1], not 2.0"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0, not 0.0"),
])
def test_the_engines_limits_named_as_the_request_names_them(body, param, message):
    error = refusal(parse_completion_request, body)
    assert (error.status, error.param, error.message) == (400, param, message)


@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "the request body is not valid JSON"),
    (b"\xff\xfe\x00", "the request body is not valid JSON"),
    (b'["prompt"]', "the request body must be a JSON object, not an array"),
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "x", "top_p": Infinity}', "Infinity is not a JSON number"),
    (b'{"prompt": "x", "temperature": 1e400}', "1e400 is past the range of a float"),
    (b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", "temperature is too large"),
])
def test_malformed_bodies(raw, fragment):
    error = refusal(parse_completion_request, raw)
    assert error.status == 400 and fragment in error.message, error.message


def test_an_unknown_model_is_404():
    error = refusal(parse_completion_request, {"prompt": "x", "model": "gpt-4"})
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert error.message == "the model 'gpt-4' does not exist; this server serves 'smollm2'"


# --- chat requests --------------------------------------------------------------------------------

def test_chat_defaults_leave_max_tokens_to_the_context():
    request = chat()
    assert request.kind == "chat" and request.messages == (Message("user", "Hello"),)
    assert (request.max_tokens, request.temperature, request.top_p, request.stream) == (None, 1.0, 1.0, False)


def test_chat_messages_for_the_engine():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "Again?"}]
    assert chat(messages=messages).message_dicts() == messages


@pytest.mark.parametrize("fields, tokens", [({"max_tokens": 7}, 7), ({"max_completion_tokens": 9}, 9),
                                            ({"max_tokens": 5, "max_completion_tokens": 5}, 5)])
def test_chat_max_tokens_by_either_name(fields, tokens):
    assert chat(**fields).max_tokens == tokens


@pytest.mark.parametrize("body, param, fragment", [
    ({}, "messages", 'messages must be a non-empty array of {"role", "content"} objects'),
    ({"messages": []}, "messages", "messages must be a non-empty array"),
    ({"messages": "Hello"}, "messages", "messages must be a non-empty array"),
    ({"messages": ["Hello"]}, "messages", "messages[0] must be an object, not a string"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages",
     'messages[0].role must be one of system, user, assistant, not "tool"'),
    ({"messages": [{"content": "x"}]}, "messages", "messages[0].role must be one of system, user, assistant, not null"),
    ({"messages": HELLO + [{"role": "user"}]}, "messages", "messages[1].content must be a string, not null"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "messages",
     "arrays of content parts are not supported"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages",
     "messages[0].name is not supported by this server"),
    ({"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens",
     "max_tokens and max_completion_tokens differ; give one of them"),
    ({"messages": HELLO, "max_completion_tokens": -2}, "max_completion_tokens",
     "max_completion_tokens must be >= 0, not -2"),
    ({"messages": HELLO, "max_completion_tokens": "9"}, "max_completion_tokens",
     "max_completion_tokens must be an integer, not a string"),
    ({"messages": HELLO, "prompt": "x"}, "prompt", "prompt is not supported by this server"),
    ({"messages": HELLO, "n": 3}, "n", "n=3 is not supported"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools", "tools is not supported by this server"),
    ({"messages": HELLO, "temperature": -1}, "temperature", "temperature must be >= 0, not -1.0"),
])
def test_chat_refusals(body, param, fragment):
    error = refusal(parse_chat_request, body)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)
    assert fragment in error.message, error.message


def test_chat_model_check():
    assert chat(model=SERVED).model == SERVED
    assert refusal(parse_chat_request, {"messages": HELLO, "model": "other"}).status == 404


# --- the context ----------------------------------------------------------------------------------

def test_tokens_to_generate_within_the_context():
    assert tokens_to_generate(completion(max_tokens=10), prompt_tokens=90, context=100) == 10
    assert tokens_to_generate(chat(), prompt_tokens=30, context=100) == 70  # chat's default: the rest
    assert tokens_to_generate(chat(max_tokens=5), prompt_tokens=30, context=100) == 5


def test_a_completion_past_the_context_is_400():
    with pytest.raises(ProtocolError) as error:
        tokens_to_generate(completion(max_tokens=11), prompt_tokens=90, context=100)
    assert (error.value.status, error.value.param, error.value.code) == (400, "prompt", "context_length_exceeded")
    assert error.value.message == ("the prompt takes 90 tokens and the completion up to 11 more, 101 in all, "
                                   "over this server's context of 100 tokens")


def test_messages_that_fill_the_context_leave_no_room():
    with pytest.raises(ProtocolError) as error:
        tokens_to_generate(chat(), prompt_tokens=100, context=100)
    assert (error.value.status, error.value.param, error.value.code) == (400, "messages", "context_length_exceeded")
    assert error.value.message == ("the messages take 100 tokens, which leaves no room for a reply in this "
                                   "server's context of 100 tokens")


# --- errors ---------------------------------------------------------------------------------------

def test_error_body_shape():
    error = ProtocolError(400, "top_p must be in (0, 1], not 1.5", param="top_p")
    assert error_body(error) == {"error": {"message": "top_p must be in (0, 1], not 1.5",
                                           "type": "invalid_request_error", "param": "top_p", "code": None}}
    assert error.headers == {}


def test_queue_full_is_429_with_retry_after():
    error = queue_full(32)
    assert (error.status, error.type, error.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert error.message == "the server has 32 requests waiting, its limit; retry in a moment"
    assert error.headers == {"Retry-After": "1"}


@pytest.mark.parametrize("header", ["Bearer sk-secret", "bearer sk-secret", "Bearer  sk-secret "])
def test_the_right_key_passes(header):
    check_authorization(header, "sk-secret")


@pytest.mark.parametrize("header, message", [
    (None, "no API key given; send the header Authorization: Bearer KEY"),
    ("Bearer sk-wrong", "incorrect API key"),
    ("Bearer sk-secret2", "incorrect API key"),
    ("Bearer ", "incorrect API key"),
    ("Basic sk-secret", "incorrect API key"),
    ("sk-secret", "incorrect API key"),
    ("Bearer clé", "incorrect API key"),  # not ASCII: compared as UTF-8 bytes, not refused by compare_digest
])
def test_a_missing_or_wrong_key_is_401(header, message):
    with pytest.raises(ProtocolError) as error:
        check_authorization(header, "sk-secret")
    assert (error.value.status, error.value.code, error.value.message) == (401, "invalid_api_key", message)
    assert error.value.headers == {"WWW-Authenticate": "Bearer"}


def test_a_non_ascii_key_passes():
    check_authorization("Bearer clé", "clé")


def test_the_key_is_compared_in_constant_time(monkeypatch):
    compared = []
    compare_digest = hmac.compare_digest

    def recording_compare_digest(a, b):
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(protocol.hmac, "compare_digest", recording_compare_digest)
    check_authorization("Bearer sk-secret", "sk-secret")
    with pytest.raises(ProtocolError):
        check_authorization("Bearer sk-other", "sk-secret")
    assert compared == [(b"sk-secret", b"sk-secret"), (b"sk-other", b"sk-secret")]


# --- responses ------------------------------------------------------------------------------------

def reply_to(request, id="id-1"):
    return Reply(id, 1700000000, request.model, request.kind, request.include_usage)


def test_reply_ids_and_time():
    text, conversation = Reply.for_request(completion()), Reply.for_request(chat())
    assert text.id.startswith("cmpl-") and conversation.id.startswith("chatcmpl-")
    assert len(text.id) > len("cmpl-") + 16 and text.id != Reply.for_request(completion()).id
    assert abs(text.created - time.time()) < 5 and isinstance(text.created, int)
    assert text.model == SERVED


def test_text_completion_body():
    body = response_body(reply_to(completion()), " Paris.", "eos", Usage(6, 3))
    assert body == {"id": "id-1", "object": "text_completion", "created": 1700000000, "model": SERVED,
                    "choices": [{"index": 0, "text": " Paris.", "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}}


def test_chat_completion_body():
    body = response_body(reply_to(chat()), "Hi there", "length", Usage(12, 2))
    assert body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}


@pytest.mark.parametrize("minifd_reason, openai_reason", [("eos", "stop"), ("stop", "stop"), ("length", "length")])
def test_finish_reasons(minifd_reason, openai_reason):
    body = response_body(reply_to(completion()), "x", minifd_reason, Usage(1, 1))
    assert body["choices"][0]["finish_reason"] == openai_reason


def test_a_cancelled_request_has_no_response():
    with pytest.raises(ValueError, match="cancelled"):
        response_body(reply_to(completion()), "x", "cancelled", Usage(1, 1))


def events_of(stream_text):
    """Server-sent events -> their payloads: dicts, and the string "[DONE]"."""
    assert stream_text.endswith("\n\n")
    events = stream_text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [event[len("data: "):] if event == "data: [DONE]" else json.loads(event[len("data: "):])
            for event in events]


def streamed(request, pieces, finish_reason="eos", usage=Usage(4, 2)):
    reply = reply_to(request)
    return events_of(stream_start(reply) + "".join(stream_piece(reply, p) for p in pieces)
                     + stream_end(reply, finish_reason, usage))


def test_streamed_chat_without_usage():
    events = streamed(chat(stream=True), ["Hel", "lo\nthere"])
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "id-1" and c["created"] == 1700000000
               and c["model"] == SERVED and "usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": "Hel"},
                                                          {"content": "lo\nthere"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert all(c["choices"][0]["index"] == 0 for c in chunks)


def test_streamed_chat_with_usage():
    events = streamed(chat(stream=True, stream_options={"include_usage": True}), ["Hi"], "length", Usage(10, 1))
    assert events[-1] == "[DONE]"
    *text_chunks, usage_chunk = events[:-1]
    assert [c["choices"][0].get("finish_reason") for c in text_chunks] == [None, None, "length"]
    assert all(c["usage"] is None for c in text_chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}


def test_streamed_completion():
    events = streamed(completion(stream=True), [" Par", "is"], "stop")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks] == [" Par", "is", ""]  # no role chunk first
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]


def test_streamed_completion_with_usage():
    events = streamed(completion(stream=True, stream_options={"include_usage": True}), ["x"], "eos", Usage(3, 1))
    assert [e if e == "[DONE]" else e["choices"] and e["choices"][0]["finish_reason"] for e in events] == \
        [None, "stop", [], "[DONE]"]
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_an_error_mid_stream_is_one_event():
    event = protocol.sse_event(error_body(ProtocolError(500, "out of memory\nfor the KV cache")))
    assert events_of(event) == [{"error": {"message": "out of memory\nfor the KV cache", "type": "server_error",
                                           "param": None, "code": None}}]


def test_model_list():
    assert model_list(SERVED, 1700000000) == {"object": "list", "data": [
        {"id": SERVED, "object": "model", "created": 1700000000, "owned_by": "minifd"}]}


# --- metrics --------------------------------------------------------------------------------------

def samples_of(metrics):
    """The /metrics text parsed back by prometheus_client's parser -> {(name, labels): value}."""
    text = metrics.render().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_text():
    metrics = Metrics()
    metrics.count_request("/v1/completions", 200)
    metrics.count_request("/v1/completions", 200)
    metrics.count_request("/v1/chat/completions", 429)
    metrics.count_usage(Usage(12, 5))
    metrics.count_usage(Usage(3, 4))
    metrics.set_scheduler_state(queue_depth=2, batch_size=6, decode_tokens_per_second=123.5)
    samples = samples_of(metrics)
    assert samples[("minifd_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 2
    assert samples[("minifd_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "429")))] == 1
    assert samples[("minifd_prompt_tokens_total", ())] == 15
    assert samples[("minifd_completion_tokens_total", ())] == 9
    assert samples[("minifd_queue_depth", ())] == 2
    assert samples[("minifd_running_batch_size", ())] == 6
    assert samples[("minifd_decode_tokens_per_second", ())] == 123.5
    assert metrics.content_type.startswith("text/plain")


def test_metrics_declare_their_types():
    text = Metrics().render().decode()
    for name, kind in [("minifd_requests_total", "counter"), ("minifd_prompt_tokens_total", "counter"),
                       ("minifd_completion_tokens_total", "counter"), ("minifd_queue_depth", "gauge"),
                       ("minifd_running_batch_size", "gauge"), ("minifd_decode_tokens_per_second", "gauge")]:
        assert f"# TYPE {name} {kind}\n" in text
        assert f"# HELP {name} " in text


def test_two_servers_keep_separate_counts():
    first, second = Metrics(), Metrics()
    first.count_usage(Usage(5, 5))
    assert samples_of(second)[("minifd_prompt_tokens_total", ())] == 0
