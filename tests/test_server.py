"""The OpenAI-compatible server, driven by the official `openai` client (and raw HTTP for what a
well-behaved client never sends) against a real uvicorn server on a free loopback port, with the
default SmolLM2 model. Greedy answers are checked against the in-process API."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time

import pytest
from conftest import CLI, ROOT

openai = pytest.importorskip("openai")  # the [test] extra installs it (and fastapi, uvicorn)
pytest.importorskip("fastapi")

from flashinfer_lite.server import LocalServer  # noqa: E402

MODEL_ID = "smollm2-135m"
GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}  # OpenAI's sampling, T=0
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2):
    with LocalServer(smollm2, MODEL_ID, cache_slots=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def raw(server, method, path, body=None, headers=None):
    """(status, decoded JSON) for one request over a fresh connection."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def counting(smollm2):
    """What the model answers in process to the request still_serves sends."""
    smollm2.reset()
    return smollm2.generate("1, 2, 3,", max_tokens=2, **GREEDY)


def still_serves(server, want):
    status, body = raw(server, "POST", "/v1/completions",
                       {"model": MODEL_ID, "prompt": "1, 2, 3,", "max_tokens": 2,
                        "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == want


def test_chat_matches_in_process_greedy(client, smollm2):
    r = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=8,
                                       temperature=0)
    want = smollm2.chat(QUESTION, max_tokens=8, **GREEDY)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(smollm2.apply_chat_template(QUESTION))
    assert r.usage.completion_tokens <= 8


def test_stream_equals_non_stream(client):
    kw = dict(model=MODEL_ID, messages=QUESTION, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len(chunks) > 3  # one event per token, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completions_match_in_process(client, smollm2):
    r = client.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=6,
                                  temperature=0)
    assert r.choices[0].text == smollm2.generate("1, 2, 3, 4,", max_tokens=6, **GREEDY)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_conversation_reuses_its_prefix_when_interleaved(client):
    def turn(history):
        r = client.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=4,
                                           temperature=0)
        history.append({"role": "assistant", "content": r.choices[0].message.content})
        return r.usage

    a = [{"role": "user", "content": "Name a fruit."}]
    b = [{"role": "user", "content": "Name a planet."}]
    first_a = turn(a)
    turn(b)  # another conversation in between
    a.append({"role": "user", "content": "And a vegetable?"})
    second_a = turn(a)
    assert second_a.prompt_tokens_details.cached_tokens >= first_a.prompt_tokens
    # the same prompt again is answered from scratch (see Engine._take_slot)
    again = client.chat.completions.create(model=MODEL_ID, messages=a[:1], max_tokens=2,
                                           temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL_ID, messages=QUESTION, max_tokens=6, temperature=0.9, top_p=0.9,
              seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == a


def test_stop_string_ends_the_answer(client):
    r = client.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=12,
                                  temperature=0, stop=["7"])
    assert "7" not in r.choices[0].text and r.choices[0].finish_reason == "stop"


BIG = 10 * 1024 * 1024


@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "smollm2-135m", "prompt": ', 400, None),  # malformed JSON
    ({"model": MODEL_ID, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),  # wrong type
    ({"model": MODEL_ID, "prompt": 12}, 400, "prompt"),
    ({"model": MODEL_ID, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL_ID, "prompt": "hi", "max_tokens": 10**12}, 400, None),  # past the context
    ({"model": MODEL_ID, "prompt": "hi", "temperature": 7}, 400, "temperature"),
    ({"model": MODEL_ID, "prompt": "hi", "bogus": 1}, 400, "bogus"),  # unknown field
    ({"model": MODEL_ID, "prompt": "hi", "n": 3}, 400, "n"),
    ({"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
    ({"prompt": "hi"}, 400, "model"),
    ([1, 2], 400, None),
    (b"x" * BIG, 413, None),  # a 10 MB body
])
def test_bad_requests_get_openai_errors(server, counting, body, status, param):
    got, reply = raw(server, "POST", "/v1/completions", body)
    assert got == status, reply
    err = reply["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    still_serves(server, counting)


def test_prompt_past_the_context(client, smollm2):
    text = "lorem ipsum " * (smollm2.n_ctx // 2 + 100)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user",
                                                                   "content": text}])
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # and through the streaming path
        client.chat.completions.create(model=MODEL_ID, stream=True, messages=[
            {"role": "user", "content": text}])


def test_client_closing_mid_stream_stops_generation(server, smollm2, counting):
    before = raw(server, "GET", "/health")[1]["cancelled"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL_ID, "prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0,
         "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 3:  # a few tokens have arrived: generation is under way
        events += resp.readline().startswith(b"data: ")
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 20
    while raw(server, "GET", "/health")[1]["cancelled"] == before:
        assert time.monotonic() < deadline, "generation was not cancelled"
        time.sleep(0.05)
    assert smollm2.stats["cancelled"] and smollm2.stats["generated_tokens"] < 400
    assert smollm2.kv_bytes == 0  # its cache was freed, not parked for reuse
    still_serves(server, counting)


def test_api_key_checked_on_every_request(smollm2):
    want = smollm2.chat(QUESTION, max_tokens=2, **GREEDY)
    with LocalServer(smollm2, MODEL_ID, api_key="s3cret") as srv:
        good = openai.OpenAI(base_url=srv.base_url, api_key="s3cret", max_retries=0)
        bad = openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=2)
        assert raw(srv, "GET", "/health")[0] == 401
        assert good.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=2,
                                            temperature=0).choices[0].message.content == want


@pytest.mark.slow
def test_cli_serve_warns_off_loopback_and_reads_key_from_env():
    """`flashinfer-lite serve` as a user runs it: a port, the key from the environment, and a
    warning when bound beyond loopback (0.0.0.0 is reached here through 127.0.0.1)."""
    env = {**os.environ, "FLASHINFER_LITE_API_KEY": "k1"}
    proc = subprocess.Popen([*CLI, "serve", "--host", "0.0.0.0", "--port", "0", "-t", "2"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not lines or "serving" not in lines[-1]:
            line = proc.stderr.readline()
            assert line, f"serve exited: {''.join(lines)}"
            lines.append(line)
        assert any(x.startswith("warning: listening on 0.0.0.0") for x in lines)
        port = int(lines[-1].rsplit(":", 1)[1].split("/")[0])
        srv = type("S", (), {"host": "127.0.0.1", "port": port})
        assert raw(srv, "GET", "/v1/models")[0] == 401
        status, body = raw(srv, "GET", "/v1/models", headers={"Authorization": "Bearer k1"})
        assert status == 200 and body["data"][0]["id"] == MODEL_ID
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_queue_limit_and_non_streaming_disconnect(smollm2, counting):
    """With room for one request, a second gets 503 while the first runs; a client that
    hangs up while waiting for a non-streamed answer cancels it too."""
    with LocalServer(smollm2, MODEL_ID, max_queue=1) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": MODEL_ID, "prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0}),
            {"Content-Type": "application/json"})
        deadline = time.monotonic() + 20
        while srv.engine.queued == 0:  # the first request has reached the worker
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = raw(srv, "POST", "/v1/completions",
                           {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "server_busy"
        conn.sock.close()  # hang up on the non-streamed request
        conn.close()
        while srv.engine.counters["cancelled"] == 0:
            assert time.monotonic() < deadline, "the abandoned request ran on"
            time.sleep(0.05)
        assert smollm2.stats["generated_tokens"] < 400
        still_serves(srv, counting)


def test_kept_conversation_caches_stay_within_their_memory_bound(smollm2):
    with LocalServer(smollm2, MODEL_ID, cache_slots=4, cache_bytes=7_000_000) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
        for fruit in ("apple", "pear"):
            client.chat.completions.create(model=MODEL_ID, max_tokens=1, messages=[
                {"role": "user", "content": f"Spell {fruit}."}])
        health = raw(srv, "GET", "/health")[1]
        # a cache grows in 256-position blocks (~5.9 MB here): only the newest one fits
        assert health["cache_slots"] == 1 and 0 < health["cache_slot_bytes"] <= 7_000_000
