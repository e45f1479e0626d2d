"""The server against the official ``openai`` client on localhost (CPU, tiny random model)."""

import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from live_server import LiveServer  # noqa: E402


def _client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_and_chat_with_the_openai_client(live_server):
    client = _client(live_server)
    out = client.completions.create(model="m", prompt="In the beginning", max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "light"}], max_tokens=6)
    assert chat.id.startswith("chatcmpl-") and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 6
    models = client.models.list()
    assert [m.id for m in models.data] == [live_server.cfg.served_model_name]


def test_streamed_chunks_reassemble_to_the_non_streamed_text(live_server):
    client = _client(live_server)
    kw = dict(model="m", prompt="And God said", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    parts = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole
    assert parts[-2].choices[0].finish_reason == "length" and parts[-1].usage.completion_tokens == 20
    chat_kw = dict(model="m", messages=[{"role": "user", "content": "earth"}], max_tokens=12, temperature=0)
    chat_whole = client.chat.completions.create(**chat_kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **chat_kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_whole


def test_streamed_chunks_with_a_stop_string_reassemble_to_the_non_streamed_text(live_server):
    """With stop strings the stream reads the text the engine keeps for them (one incremental decode, not two):
    the chunks still add up to the non-streamed answer, and the stop string is never streamed."""
    client = _client(live_server)
    kw = dict(model="m", prompt="And God said", max_tokens=40, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 2]  # a stop the greedy answer meets half way
    assert stop.strip(), free
    whole = client.completions.create(stop=[stop], **kw).choices[0]
    parts = list(client.completions.create(stream=True, stop=[stop], **kw))
    streamed = "".join(p.choices[0].text for p in parts if p.choices)
    assert whole.finish_reason == "stop" and streamed == whole.text and stop not in streamed
    assert parts[-1].choices[0].finish_reason == "stop"


def test_cancelled_stream_frees_its_kv_blocks(live_server):
    pool = live_server.app.state.server.engine.pool
    free_before = pool.num_free
    with httpx.Client(base_url=live_server.base_url, timeout=60) as http:
        body = {"model": "m", "prompt": "In the beginning", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # the first chunk arrived: disconnect mid-generation
    deadline = time.time() + 20
    while (pool.num_free != free_before or live_server.loop.in_flight) and time.time() < deadline:
        time.sleep(0.05)
    assert pool.num_free == free_before and live_server.loop.in_flight == 0


def test_overload_answers_429_with_retry_after(serve_model_dir):
    with LiveServer(serve_model_dir, "--max-queue", "1") as server, httpx.Client(base_url=server.base_url,
                                                                                timeout=60) as http:
        body = {"model": "m", "prompt": "In the beginning", "max_tokens": 300, "ignore_eos": True}
        first = threading.Thread(target=http.post, args=("/v1/completions",), kwargs={"json": body})
        first.start()
        deadline = time.time() + 20
        while server.loop.in_flight == 0 and time.time() < deadline:
            time.sleep(0.01)
        second = http.post("/v1/completions", json={**body, "max_tokens": 2})
        first.join()
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "invalid_request_error"


def test_bad_requests_are_400_with_openai_error_shape(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=30) as http:
        for body in ({"prompt": 5}, {"prompt": "x", "stream": "yes"}, [1, 2], {"prompt": "x", "max_tokens": -3}):
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 400, body
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        too_long = http.post("/v1/completions", json={"prompt": "light " * 2000, "max_tokens": 4})
        assert too_long.status_code == 400


def test_metrics_parse_as_prometheus_text(live_server):
    from prometheus_client.parser import text_string_to_metric_families

    _client(live_server).completions.create(model="m", prompt="In", max_tokens=4)
    with httpx.Client(base_url=live_server.base_url, timeout=30) as http:
        text = http.get("/metrics").text
        assert http.get("/health").json() == {"status": "ok"}
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"batchpilot_requests_waiting", "batchpilot_requests_running", "batchpilot_kv_cache_usage_ratio",
            "batchpilot_time_to_first_token_seconds", "batchpilot_time_per_output_token_seconds",
            "batchpilot_preemptions", "batchpilot_requests_finished", "batchpilot_engine_steps_by_kind",
            "batchpilot_engine_step_seconds", "batchpilot_step_token_budget"} <= names
    kinds = {s.labels["kind"]: s.value for f in text_string_to_metric_families(text)
             if f.name == "batchpilot_engine_steps_by_kind" for s in f.samples}
    assert kinds.keys() == {"decode", "mixed"} and kinds["mixed"] >= 1  # the prompt's prefill was a mixed step


def test_soak_nothing_lost_and_no_kv_leak(live_server):
    """A bounded, self-stopping soak: 200 requests from 8 threads, mixed streaming, all answered, pool back to full."""
    pool = live_server.app.state.server.engine.pool
    free_before = pool.num_free
    results, errors = [], []

    def worker(k: int) -> None:
        client = _client(live_server)
        for i in range(25):
            try:
                kw = dict(model="m", prompt=f"light {k} {i}", max_tokens=1 + (i * 7 + k) % 24, temperature=0.7,
                          seed=i)
                if i % 3 == 0:
                    text = "".join(p.choices[0].text for p in client.completions.create(stream=True, **kw))
                else:
                    text = client.completions.create(**kw).choices[0].text
                results.append(text)
            except Exception as e:  # noqa: BLE001 -- collected and asserted below
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 200
    deadline = time.time() + 10
    while pool.num_free != free_before and time.time() < deadline:
        time.sleep(0.05)
    assert pool.num_free == free_before and live_server.loop.in_flight == 0


def test_fields_answer_as_jobs_do(live_server, serve_model_dir):
    """n, logprobs, echo, a list prompt and penalties go through jobs' rules: the same choices and shapes as a
    job line; a seeded sampled request gives the engine's text for that seed; a stream asking for n > 1 is a 400
    naming the field."""
    from batchpilot import load_model
    from batchpilot.data.tokenizer import Tokenizer
    from batchpilot.generate.engine import Engine, EngineConfig
    from batchpilot.generate.request import SamplingParams

    client = _client(live_server)
    out = client.completions.create(model="m", prompt=["In the beginning", "light"], max_tokens=3, n=2, logprobs=2,
                                    echo=True, temperature=0.9, seed=5, presence_penalty=0.5,
                                    extra_body={"top_k": 20})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text.startswith("In the beginning") and out.choices[2].text.startswith("light")
    assert all(c.logprobs.token_logprobs[0] is None for c in out.choices)
    engine = Engine(load_model(serve_model_dir), Tokenizer.from_path(serve_model_dir), EngineConfig(num_blocks=64))
    want = engine.generate(["In the beginning"], SamplingParams(max_tokens=3, n=2, temperature=0.9, seed=5,
                                                                presence_penalty=0.5, top_k=20))
    assert [c.text[len("In the beginning"):] for c in out.choices[:2]] == [c.text for c in want]
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "light"}], max_tokens=2,
                                          n=3, logprobs=True, top_logprobs=2)
    assert len(chat.choices) == 3 and all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    with httpx.Client(base_url=live_server.base_url, timeout=30) as http:
        r = http.post("/v1/completions", json={"prompt": "x", "n": 2, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = http.post("/v1/completions", json={"prompt": "x", "best_of": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
