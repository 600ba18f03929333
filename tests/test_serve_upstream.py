"""A worker backed by an OpenAI-compatible engine server (`--backend openai`), against a real upstream process: our
own OpenAI server in front of a second controller + worker. LLaVA's templated prompts and the messages endpoint
give the same replies as the engine's own worker reached directly; stop strings, usage, the upstream's error text,
cancellation that reaches the engine, and an upstream that goes away and comes back."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from conftest import (  # noqa: E402
    API_KEY, MODEL, Cluster, b64, chatml_prompt, greedy, png, stream_chunks, wait_healthy, wait_until, workers,
)

GPU_NAME = "tiny-on-engine"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from llava.testing import make_tiny_llava

    tmp = tmp_path_factory.mktemp("upstream")
    c = Cluster(tmp, make_tiny_llava(tmp / "tiny"))
    engine_ctl = c.start("engine-controller", "serve.controller")
    c.start_worker("engine-worker", engine_ctl.url, "--no-warm-up")
    c.openai_port = None
    api = c.start("engine-api", "serve.openai_api_server", "--controller-address", engine_ctl.url,
                  "--api-keys", API_KEY)
    ctl = c.start("controller", "serve.controller", "--heart-beat-expiration", "3")
    c.start("upstream-worker", "serve.model_worker", "--backend", "openai", "--upstream", api.url + "/v1",
            "--upstream-model", MODEL, "--upstream-api-key", API_KEY, "--model-name", GPU_NAME,
            "--controller-address", ctl.url, "--heart-beat-interval", "0.5")
    try:
        for name in ("engine-controller", "engine-worker", "engine-api", "controller"):
            wait_healthy(c.procs[name])
        wait_until(lambda: len(workers(engine_ctl.url)) == 1, 60, "the engine's worker to register")
        wait_until(lambda: len(workers(ctl.url)) == 1, 60, "the upstream-backed worker to register")
    except Exception:
        c.stop_all()
        raise
    yield c
    c.stop_all()


def _direct(c: Cluster, endpoint: str, payload: dict):
    return stream_chunks(c.procs["engine-worker"].url + endpoint, {**payload, "model": MODEL})


def _via_upstream(c: Cluster, endpoint: str, payload: dict):
    return stream_chunks(c.procs["controller"].url + endpoint, {**payload, "model": GPU_NAME})


def test_registered_with_the_upstream_model(cluster):
    ctl = cluster.procs["controller"].url
    assert httpx.post(ctl + "/list_models").json()["models"] == [GPU_NAME]
    (url, info), = workers(ctl).items()
    status = httpx.post(url + "/worker_get_status").json()
    assert status["model_names"] == [GPU_NAME] and "openai upstream" in status["backend"]


def test_templated_prompt_with_image_equals_the_engine_reached_directly(cluster):
    prompt = chatml_prompt("What color is the shape?", images=1)
    payload = greedy({"prompt": prompt, "images": [b64(png((200, 30, 30)))]}, max_new_tokens=10)
    status, chunks = _via_upstream(cluster, "/worker_generate_stream", payload)
    assert status == 200 and all(c["error_code"] == 0 for c in chunks)
    _, direct = _direct(cluster, "/worker_generate_stream", payload)
    assert chunks[-1]["text"] == direct[-1]["text"] and chunks[-1]["text"].startswith(prompt)
    assert chunks[-1]["finish_reason"] == direct[-1]["finish_reason"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert chunks[-1]["usage"][key] == direct[-1]["usage"][key]


def test_messages_and_stop_strings_equal_the_engine(cluster):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nDescribe."},
                {"role": "assistant", "content": "A shape."}, {"role": "user", "content": "<image>\nAnd this?"}]
    payload = greedy({"messages": messages, "images": [b64(png()), b64(png((0, 0, 255)))]}, max_new_tokens=16)
    _, direct = _direct(cluster, "/worker_generate_messages", payload)
    _, via = _via_upstream(cluster, "/worker_generate_messages", payload)
    assert via[-1]["text"] == direct[-1]["text"] and via[-1]["error_code"] == 0
    text = direct[-1]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        _, d = _direct(cluster, "/worker_generate_messages", {**payload, "stop": [stop]})
        _, v = _via_upstream(cluster, "/worker_generate_messages", {**payload, "stop": [stop]})
        assert v[-1]["text"] == d[-1]["text"] and stop not in v[-1]["text"]


def test_upstream_errors_keep_their_text(cluster):
    bad = greedy({"prompt": chatml_prompt("hi", images=1), "images": [b64(b"not an image at all")]})
    status, chunks = _via_upstream(cluster, "/worker_generate_stream", bad)
    _, direct = _direct(cluster, "/worker_generate_stream", bad)
    assert status == 400 and chunks[0]["error_code"] != 0
    assert direct[0]["error"]["message"] in chunks[0]["text"] and "upstream" in chunks[0]["text"]
    status, chunks = _via_upstream(cluster, "/worker_generate_stream",
                                   greedy({"prompt": chatml_prompt("hi", images=1)}))
    assert status == 400 and "1 <image> marker(s) but 0 image(s)" in chunks[0]["text"]


def test_a_client_leaving_cancels_the_engine_request(cluster):
    payload = greedy({"messages": [{"role": "user", "content": "count to a thousand"}]}, max_new_tokens=400)
    with httpx.stream("POST", cluster.procs["controller"].url + "/worker_generate_messages",
                      json={**payload, "model": GPU_NAME}, timeout=30) as r:
        buf, texts = b"", []
        for raw in r.iter_raw():  # leave once the engine has streamed text: the request has reached it
            *done, buf = (buf + raw).split(b"\0")
            texts += [json.loads(c).get("text") for c in done if c.strip()]
            if sum(bool(t) for t in texts) >= 2:
                break
    assert sum(bool(t) for t in texts) >= 2, texts
    engine = cluster.procs["engine-worker"].url
    # the request is counted once the engine has dropped it: waiting for an empty queue alone raced the count
    wait_until(lambda: 'outcome="cancelled"' in httpx.get(engine + "/metrics").text, 10,
               "the engine worker to count the abandoned request as cancelled")
    assert httpx.get(engine + "/health").json()["queue_length"] == 0


def test_upstream_down_drops_the_worker_and_back_registers_it(cluster):
    ctl = cluster.procs["controller"].url
    api = cluster.procs["engine-api"]
    api.popen.send_signal(signal.SIGKILL)
    api.popen.wait(10)
    wait_until(lambda: workers(ctl) == {}, 20, "the controller to drop the worker whose upstream is gone")
    status, chunks = stream_chunks(ctl + "/worker_generate_stream", greedy({"prompt": "hi"}, model=GPU_NAME))
    assert status == 404 and GPU_NAME in chunks[0]["text"]
    port = int(api.url.rsplit(":", 1)[1])
    back = cluster.start("engine-api", "serve.openai_api_server", "--controller-address",
                         cluster.procs["engine-controller"].url, "--api-keys", API_KEY, port=port)
    wait_healthy(back)
    t0 = time.monotonic()
    wait_until(lambda: len(workers(ctl)) == 1, 30, "the worker to register again")
    assert time.monotonic() - t0 < 10
