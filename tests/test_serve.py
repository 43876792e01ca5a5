"""`minifd serve`'s app on the CPU, driven through a real HTTP server on 127.0.0.1 by the official
openai client: models, completions and chat completions (streamed and not), concurrent requests,
errors, a client that goes away mid-stream."""

import json
import threading
import time

import numpy as np
import pytest

import minifd

# The serve and test extras (pip install -e '.[test]'); CI has them, a bare GPU machine may not.
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
Server = pytest.importorskip("minifd.serve.app").Server

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tiny_model import tiny_model

    directory, _, _ = tiny_model(tmp_path_factory.mktemp("serve") / "m")
    template = directory.parent / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    engine = minifd.load(directory, device="cpu", progress=False, chat_template=template)
    server = Server(engine, "tiny", slots=4, max_queue=16, context=128, api_key="sesame")
    config = uvicorn.Config(server.app(), host="127.0.0.1", port=0, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.01)
    port = http.servers[0].sockets[0].getsockname()[1]
    yield engine, server, f"http://127.0.0.1:{port}"
    http.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[2] + "/v1", api_key="sesame", max_retries=0)


def test_models_lists_the_served_name(client):
    assert [model.id for model in client.models.list().data] == ["tiny"]


def test_a_completion_is_the_engines_greedy_continuation(served, client):
    engine = served[0]
    answer = client.completions.create(model="tiny", prompt="hello there", max_tokens=6, temperature=0)
    expected = engine.generate(["hello there"], max_new_tokens=6)
    assert answer.choices[0].text == expected.completions[0].text
    assert answer.usage.completion_tokens == len(expected.completions[0].token_ids)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_streamed_completion_adds_up_to_the_whole(client):
    whole = client.completions.create(model="tiny", prompt="a b c", max_tokens=8, temperature=0).choices[0].text
    stream = client.completions.create(model="tiny", prompt="a b c", max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


def test_chat_streamed_and_not_agree(served, client):
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    expected = served[0].chat(messages, max_new_tokens=5)
    assert whole.choices[0].message.content == expected


def test_eight_concurrent_requests_get_what_each_gets_alone(client):
    prompts = [f"prompt number {i}" for i in range(8)]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    results = [None] * 8

    def ask(i):
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == alone


@pytest.mark.parametrize("body, status", [
    ({"model": "tiny", "prompt": "x", "n": 2}, 400),
    ({"model": "other", "prompt": "x"}, 404),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, 400),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, client, body, status):
    response = httpx.post(served[2] + "/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
    assert response.status_code == status
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert client.completions.create(model="tiny", prompt="still here", max_tokens=2).choices[0].text is not None


def test_malformed_json_and_a_wrong_key(served):
    response = httpx.post(served[2] + "/v1/completions", content=b"{not json",
                          headers={"Authorization": "Bearer sesame"})
    assert response.status_code == 400
    assert httpx.get(served[2] + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_client_gone_mid_stream_frees_its_slot(served, monkeypatch):
    server = served[1]
    step = server.scheduler.step

    def slow_step():  # 100 tokens now take a second or more, far longer than noticing the client has gone
        time.sleep(0.01)
        step()

    monkeypatch.setattr(server.scheduler, "step", slow_step)
    cancelled = cancelled_count(served[2])
    with httpx.stream("POST", served[2] + "/v1/completions", headers={"Authorization": "Bearer sesame"},
                      json={"model": "tiny", "prompt": "go on", "max_tokens": 100, "stream": True,
                            "temperature": 0}) as response:
        next(response.iter_lines())  # the first piece arrived: the request is running
    deadline = time.time() + 10
    while any(slot is not None for slot in server.scheduler.slots) and time.time() < deadline:
        time.sleep(0.02)
    assert all(slot is None for slot in server.scheduler.slots)
    assert cancelled_count(served[2]) == cancelled + 1


def test_a_full_queue_is_answered_429(served, monkeypatch):
    server = served[1]
    monkeypatch.setattr(server, "max_queue", 0)
    step = server.scheduler.step
    monkeypatch.setattr(server.scheduler, "step", lambda: (time.sleep(0.01), step()))
    headers = {"Authorization": "Bearer sesame"}
    body = {"model": "tiny", "prompt": "long", "max_tokens": 60, "stream": True, "temperature": 0}
    streams = [httpx.stream("POST", served[2] + "/v1/completions", headers=headers, json=body) for _ in range(4)]
    responses = [stream.__enter__() for stream in streams]  # the 4 slots busy
    try:
        refused = httpx.post(served[2] + "/v1/completions", headers=headers, json={**body, "stream": False})
        assert refused.status_code == 429 and refused.json()["error"]["type"]
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
    assert all(response.status_code == 200 for response in responses)


def cancelled_count(base_url):
    lines = httpx.get(base_url + "/metrics").text.splitlines()
    return float(next(line.split()[1] for line in lines if line.startswith("minifd_cancelled_requests_total ")))


def test_health_and_metrics(served):
    assert httpx.get(served[2] + "/health").json() == {"status": "ok"}
    text = httpx.get(served[2] + "/metrics").text
    assert 'minifd_requests_total{endpoint="/v1/completions",status="200"}' in text


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_minifd_serve_answers_and_exits_0_on_sigterm(served):
    import os
    import signal
    import subprocess
    import sys

    directory = served[0].weights_dir
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "minifd", "serve", "--weights", str(directory), "--device", "cpu",
                                "--port", str(port), "--served-model-name", "tiny", "--grace", "5"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).choices[0].text is not None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    assert "serving tiny" in process.stderr.read()


def test_minifd_serve_without_weights_or_fixture_is_one_line(monkeypatch, capsys):
    from minifd.cli import main

    monkeypatch.setattr("minifd.fixture.fixture_ready", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def poison_prefill(monkeypatch, model, failure):
    """Every prefill pass of `model` gives NaN logits ("nan") or raises ("raise") until monkeypatch undoes it."""
    prefill_chunks = model.prefill_chunks

    def poisoned(cache, chunks):
        if failure == "raise":
            raise RuntimeError("the device went away")
        logits = prefill_chunks(cache, chunks)
        logits[:, 0] = np.nan
        return logits

    monkeypatch.setattr(model, "prefill_chunks", poisoned)


@pytest.mark.parametrize("failure", ["nan", "raise"])
def test_a_request_that_fails_is_answered_500_and_the_server_goes_on(served, client, monkeypatch, failure):
    engine, server, base_url = served
    poison_prefill(monkeypatch, server.scheduler.model, failure)
    headers = {"Authorization": "Bearer sesame"}
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 4, "temperature": 0}
    whole = httpx.post(base_url + "/v1/completions", headers=headers, json=body)
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
    with httpx.stream("POST", base_url + "/v1/completions", headers=headers, json={**body, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert "error" in json.loads(events[0][len("data: "):]) and events[-1] == "data: [DONE]"
    monkeypatch.undo()
    answer = client.completions.create(model="tiny", prompt="hello there", max_tokens=4, temperature=0)
    assert answer.choices[0].text == engine.generate(["hello there"], max_new_tokens=4).completions[0].text
