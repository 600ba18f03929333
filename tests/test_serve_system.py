"""End-to-end serving on loopback: a controller, two model workers (tiny random model), the OpenAI server, the CLI.

Real processes, real ports. The tests run in file order: the SIGKILL and controller-restart tests come last
because they change the cluster. Helpers here are reused by tests/test_serve_load.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from llava.templates import render_text
from serve.common import FrameSplitter, free_port

from conftest import (  # noqa: E402  (shared with test_serve_load)
    ROOT, MODEL, IMAGE_TOKENS, API_KEY, png, b64, env, Proc, Cluster, wait_healthy, wait_until, workers, stream_chunks, chatml_prompt, greedy, start_cluster,
)


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("serve"), 2, openai=True, worker_args=("--max-body-bytes", "1000000"))
    yield c
    c.stop_all()


@pytest.fixture
def ctl(cluster) -> str:
    return cluster.procs["controller"].url


def assert_still_serving(url: str) -> None:
    status, chunks = stream_chunks(url + "/worker_generate_stream", greedy({"prompt": chatml_prompt("hello")}))
    assert status == 200 and chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"] in ("stop", "length")


# ----------------------------------------------------------------------------------------------- happy paths


def test_controller_knows_both_workers(cluster, ctl):
    assert httpx.post(ctl + "/list_models").json() == {"models": [MODEL], "adapters": {}}
    status = httpx.post(ctl + "/worker_get_status").json()
    assert status["model_names"] == [MODEL] and status["speed"] == 2
    urls = {cluster.procs["worker0"].url, cluster.procs["worker1"].url}
    assert set(workers(ctl)) == urls
    assert httpx.post(ctl + "/get_worker_address", json={"model": MODEL}).json()["address"] in urls
    assert httpx.post(ctl + "/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
    w = httpx.post(cluster.procs["worker0"].url + "/worker_get_status").json()
    assert w["model_names"] == [MODEL] and w["speed"] == 1 and w["queue_length"] == 0


def test_llava_protocol_stream_through_controller(cluster, ctl):
    prompt = chatml_prompt("What color is the shape?", images=1)
    payload = greedy({"prompt": prompt, "images": [b64(png())], "stop": "<|im_end|>"}, max_new_tokens=12)
    status, chunks = stream_chunks(ctl + "/worker_generate_stream", payload)
    assert status == 200 and len(chunks) >= 2
    assert all(c["error_code"] == 0 and c["text"].startswith(prompt) for c in chunks)
    final = chunks[-1]
    assert final["finish_reason"] in ("stop", "length")
    assert final["text"] == prompt + "".join(c["delta"] for c in chunks)
    usage = final["usage"]
    assert usage["image_tokens"] == IMAGE_TOKENS
    assert usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # greedy: every worker, reached directly, gives the same text as the controller's proxy
    for name in ("worker0", "worker1"):
        _, direct = stream_chunks(cluster.procs[name].url + "/worker_generate_stream", payload)
        assert direct[-1]["text"] == final["text"]


def test_original_llava_client_flow(ctl):
    """What LLaVA's gradio_web_server does: ask the controller for an address, post to the worker with requests,
    split on NUL, slice the prompt off `text`."""
    requests = pytest.importorskip("requests")
    worker = requests.post(ctl + "/get_worker_address", json={"model": MODEL}).json()["address"]
    prompt = ("A chat between a curious user and an artificial intelligence assistant. "
              "USER: <image>\nWhat is it? ASSISTANT:")
    pload = {"model": MODEL, "prompt": prompt, "temperature": 0.2, "top_p": 0.7, "max_new_tokens": 8,
             "stop": "</s>", "images": [b64(png())]}
    response = requests.post(worker + "/worker_generate_stream", json=pload, stream=True, timeout=10)
    outputs = []
    for chunk in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
        if chunk:
            data = json.loads(chunk.decode())
            assert data["error_code"] == 0
            outputs.append(data["text"][len(prompt):].strip())
    assert outputs and all(b.startswith(a) for a, b in zip(outputs, outputs[1:]))


def test_messages_endpoint_renders_like_the_raw_prompt(ctl):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is this?"}]
    images = [b64(png((0, 0, 255)))]
    _, by_messages = stream_chunks(ctl + "/worker_generate_messages", greedy({"messages": messages, "images": images}))
    prompt = render_text(messages, "chatml_direct", add_generation_prompt=True)
    _, by_prompt = stream_chunks(ctl + "/worker_generate_stream", greedy({"prompt": prompt, "images": images}))
    assert by_messages[-1]["error_code"] == 0
    assert by_messages[-1]["text"] == by_prompt[-1]["text"][len(prompt):]
    assert by_messages[-1]["usage"] == by_prompt[-1]["usage"]


def test_openai_sdk_stream_and_non_stream(cluster):
    import openai

    client = openai.OpenAI(base_url=cluster.procs["openai"].url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png((0, 255, 0)))}},
        {"type": "text", "text": "What color?"},
    ]}]
    done = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    text = done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens >= 1
    assert done.usage.prompt_tokens_details.image_tokens == IMAGE_TOKENS
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text and finish == done.choices[0].finish_reason
    assert usage.prompt_tokens == done.usage.prompt_tokens and usage.completion_tokens == done.usage.completion_tokens

    # the structured endpoint gives the same reply for the same conversation
    _, chunks = stream_chunks(cluster.procs["controller"].url + "/worker_generate_messages", greedy(
        {"messages": [{"role": "user", "content": "<image>\nWhat color?"}], "images": [b64(png((0, 255, 0)))]},
        max_new_tokens=10))
    assert chunks[-1]["text"] == text


def test_openai_logprobs_and_n_choices(cluster):
    import openai

    client = openai.OpenAI(base_url=cluster.procs["openai"].url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Say something"}]
    done = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                          logprobs=True, top_logprobs=3)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens or done.choices[0].finish_reason == "stop"
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == done.choices[0].message.content
    for t in content:  # greedy: the chosen token is the likeliest, and the alternatives are sorted
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob <= 0 and [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                                logprobs=True, top_logprobs=3, stream=True):
        for choice in chunk.choices:
            streamed += choice.logprobs.content if choice.logprobs else []
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).choices[0].logprobs is None

    # n choices: seeded choice i samples with seed + i, the prompt is counted once
    kw = dict(model=MODEL, messages=messages, temperature=1.5, max_tokens=8)
    many = client.chat.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(seed=11 + i, **kw) for i in range(3)]
    assert [c.message.content for c in many.choices] == [r.choices[0].message.content for r in singles]
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(r.usage.completion_tokens for r in singles)
    texts = {i: "" for i in range(3)}
    for chunk in client.chat.completions.create(n=3, seed=11, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert list(texts.values()) == [c.message.content for c in many.choices]
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(n=17, **kw)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(top_logprobs=2, **kw)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(logprobs=True, top_logprobs=21, **kw)


def test_openai_image_sent_again_by_id(cluster):
    """A reply lists each image's id; a later request may send the id instead of the bytes (the controller routes
    it to the worker that holds its features, among the two workers here); unknown ids are a 404 naming them."""
    import openai

    client = openai.OpenAI(base_url=cluster.procs["openai"].url + "/v1", api_key=API_KEY, max_retries=0)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png((10, 20, 200)))}}
    first = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [image, {"type": "text", "text": "What color?"}]}])
    (image_id,) = first.usage.prompt_tokens_details.image_ids
    for part in ({"type": "image_url", "image_url": {"url": "llava-image://" + image_id}},
                 {"type": "image_url", "uuid": image_id}):  # vLLM's form
        for _ in range(3):  # whichever worker is less busy, the one holding the image answers
            again = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
                {"role": "user", "content": [part, {"type": "text", "text": "What color?"}]}])
            assert again.choices[0].message.content == first.choices[0].message.content
            assert again.usage.prompt_tokens == first.usage.prompt_tokens
    unknown = "0" * 64 + ".pad32-0000000000000000"
    with pytest.raises(openai.NotFoundError, match="unknown image id"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "llava-image://" + unknown}}, {"type": "text", "text": "?"}]}])
    with pytest.raises(openai.BadRequestError, match="malformed image id"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "llava-image://../etc"}}, {"type": "text", "text": "?"}]}])


def test_controller_routes_image_ids_to_the_worker_holding_them(cluster, ctl):
    image = b64(png((200, 30, 30)))
    ask = {"messages": [{"role": "user", "content": "<image>\nWhat color?"}]}
    with httpx.stream("POST", ctl + "/worker_generate_messages", json=greedy({**ask, "images": [image]}),
                      timeout=60) as r:
        owner = r.headers["x-worker-address"]
        splitter = FrameSplitter()
        first = [c for data in r.iter_raw() for c in splitter.feed(data)][-1]
    (image_id,) = first["usage"]["image_ids"]
    ref = {**ask, "images": ["llava-image://" + image_id]}
    other = next(u for u in workers(ctl) if u != owner)
    status, chunks = stream_chunks(other + "/worker_generate_messages", greedy(ref))
    assert status == 404 and chunks[0]["error"]["code"] == "unknown_image" and image_id in chunks[0]["text"]
    # keep the owner busy (a long request sending the id), so shortest-queue dispatch alone would pick the other
    with httpx.stream("POST", ctl + "/worker_generate_messages", json=greedy(ref, max_new_tokens=480),
                      timeout=60) as busy:
        assert busy.headers["x-worker-address"] == owner
        with httpx.stream("POST", ctl + "/worker_generate_messages", json=greedy(ref), timeout=60) as r:
            assert r.status_code == 200 and r.headers["x-worker-address"] == owner
            splitter = FrameSplitter()
            again = [c for data in r.iter_raw() for c in splitter.feed(data)][-1]
    assert again["text"] == first["text"] and again["usage"]["image_ids"] == [image_id]


def test_openai_structured_output(cluster):
    """response_format json_schema / json_object and vLLM's structured_outputs / guided_* through the SDK, streaming
    and not: the tiny random model's replies parse and match."""
    import openai

    client = openai.OpenAI(base_url=cluster.procs["openai"].url + "/v1", api_key=API_KEY, max_retries=0)
    schema = {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "sizes": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
        "required": ["color", "count", "sizes"], "additionalProperties": False}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Describe"}], max_tokens=60)
    for temperature in (0, 1.0):
        done = client.chat.completions.create(temperature=temperature, seed=3, **kw, response_format={
            "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
        value = json.loads(done.choices[0].message.content)
        assert value["color"] in ("red", "green", "blue") and 0 <= value["count"] <= 9
        assert list(value) == ["color", "count", "sizes"] and all(isinstance(b, bool) for b in value["sizes"])
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        temperature=0, stream=True, **kw, extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
        if c.choices)
    assert text in ("alpha", "beta")
    done = client.chat.completions.create(temperature=0, **kw, extra_body={"guided_regex": "[a-c]{4}"})
    assert re.fullmatch("[a-c]{4}", done.choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="invalid regex"):
        client.chat.completions.create(**kw, extra_body={"guided_regex": "[a-"})
    with pytest.raises(openai.BadRequestError, match="one output constraint"):
        client.chat.completions.create(**kw, response_format={"type": "json_object"}, extra_body={"guided_regex": "a"})
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(**kw, response_format={"type": "json_schema", "json_schema": {"name": "x"}})


def test_openai_several_images_in_several_messages_and_bare_string_urls(cluster):
    """Two images in one message and a third in a later one, one of them as Ollama's bare-string image_url: each
    becomes one <image> where it stands, and the usage counts all three."""
    import openai

    client = openai.OpenAI(base_url=cluster.procs["openai"].url + "/v1", api_key=API_KEY, max_retries=0)
    uri = ["data:image/png;base64," + b64(png(c)) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri[0]}},
                                     {"type": "image_url", "image_url": uri[1]},
                                     {"type": "text", "text": "Compare these."}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                     {"type": "image_url", "image_url": {"url": uri[2]}}]},
    ]
    done = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert done.usage.prompt_tokens_details.image_tokens == 3 * IMAGE_TOKENS
    assert len(done.usage.prompt_tokens_details.image_ids) == 3
    # the same conversation through the worker protocol, markers where the parts stood
    _, chunks = stream_chunks(cluster.procs["controller"].url + "/worker_generate_messages", greedy(
        {"messages": [{"role": "user", "content": "<image>\n<image>\nCompare these."},
                      {"role": "assistant", "content": "They differ."},
                      {"role": "user", "content": "And this?\n<image>"}],
         "images": [u.split(",", 1)[1] for u in uri]}, max_new_tokens=4))
    assert chunks[-1]["text"] == done.choices[0].message.content


def test_openai_errors(cluster):
    import openai

    url = cluster.procs["openai"].url + "/v1"
    client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="no worker serves model 'gpt-4'"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}},
                                          {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError, match="http\\(s\\) image URLs are disabled"):
        client.chat.completions.create(model=MODEL, messages=remote)
    not_png = "data:image/png;base64," + b64(b"text")
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": not_png}},
                                       {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError, match="not an image"):
        client.chat.completions.create(model=MODEL, messages=bad, stream=True)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    # JSON may carry a lone surrogate (the SDK cannot even encode one; raw clients can): a 400 naming the field
    for stream in (False, True):
        body = json.dumps({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi \ud800"}]})
        r = httpx.post(url + "/chat/completions", content=body, timeout=30,
                       headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 400 and "messages[0].content" in r.json()["error"]["message"], r.text


@pytest.fixture
def image_server(tmp_path):
    """A local http server for image_url tests (files under tmp_path)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_openai_image_urls_when_enabled(ctl, image_server):
    from fastapi.testclient import TestClient

    from serve.openai_api_server import OpenAIConfig, create_app

    root, base = image_server
    (root / "red.png").write_bytes(png((255, 0, 0)))
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noise.save(root / "big.png")
    config = OpenAIConfig(controller_address=ctl, allow_image_urls=True, image_url_max_bytes=5000, image_url_timeout=5)

    def ask(url: str):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
        return client.post("/v1/chat/completions", json={
            "model": MODEL, "temperature": 0, "max_tokens": 6, "messages": [{"role": "user", "content": content}]})

    with TestClient(create_app(config)) as client:
        by_url = ask(base + "/red.png")
        by_data = ask("data:image/png;base64," + b64(png((255, 0, 0))))
        assert by_url.status_code == 200, by_url.text
        assert by_url.json()["choices"][0]["message"] == by_data.json()["choices"][0]["message"]
        assert by_url.json()["usage"]["prompt_tokens_details"]["image_tokens"] == IMAGE_TOKENS
        for path, match in (("/big.png", "more than 5000 bytes"), ("/missing.png", "answered HTTP 404")):
            r = ask(base + path)
            assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
        r = ask("ftp://127.0.0.1/x.png")
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image"


def test_health_and_metrics(cluster, ctl):
    assert httpx.get(ctl + "/health").json()["workers"] == 2
    text = httpx.get(ctl + "/metrics").text
    assert "llava_controller_workers 2.0" in text
    assert 'llava_controller_requests_total{endpoint="/worker_generate_stream",outcome="ok"}' in text
    wtext = "".join(httpx.get(cluster.procs[n].url + "/metrics").text for n in ("worker0", "worker1"))
    assert "llava_worker_completion_tokens_total" in wtext and "llava_worker_queue_length 0.0" in wtext
    threads = [float(v) for v in re.findall(r"^llava_worker_cpu_threads (\S+)$", wtext, re.M)]
    assert len(threads) == 2 and max(threads) >= 1  # the workers above served requests on the CPU


def test_allowlist_refuses_foreign_worker(ctl):
    r = httpx.post(ctl + "/register_worker", json={
        "worker_name": "http://169.254.169.254:80", "check_heart_beat": True,
        "worker_status": {"model_names": ["evil"], "speed": 1, "queue_length": 0}})
    assert r.status_code == 403 and r.json()["error"]["code"] == "worker_not_allowed"
    assert "evil" not in httpx.post(ctl + "/list_models").json()["models"]


# ----------------------------------------------------------------------------------------------- bad input


def expect_error(url: str, payload, status: int, code: int, match: str) -> dict:
    got_status, chunks = stream_chunks(url, payload)
    assert got_status == status, chunks
    assert len(chunks) == 1 and chunks[0]["error_code"] == code, chunks
    assert match in chunks[0]["error"]["message"], chunks[0]
    return chunks[0]


def truncated_png() -> bytes:
    data = png(size=(64, 64), color=(10, 200, 30))
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8000, 8000), 0).save(buf, "PNG")  # 64 Mpx > the 40 Mpx default, ~60 KB compressed
    return buf.getvalue()


BAD_INPUTS = {
    "not_an_image": (lambda: greedy({"prompt": chatml_prompt("q", 1), "images": [b64(b"hello, not a picture")]}),
                     400, 42, "not an image"),
    "truncated_image": (lambda: greedy({"prompt": chatml_prompt("q", 1), "images": [b64(truncated_png())]}),
                        400, 42, "truncated"),
    "decompression_bomb": (lambda: greedy({"prompt": chatml_prompt("q", 1), "images": [b64(bomb_png())]}),
                           400, 42, "too many pixels"),
    "bad_base64": (lambda: greedy({"prompt": chatml_prompt("q", 1), "images": ["%%%not base64%%%"]}),
                   400, 42, "invalid base64"),
    "image_count_mismatch": (lambda: greedy({"prompt": chatml_prompt("q", 2), "images": [b64(png())]}),
                             400, 43, "2 <image> marker(s) but 1 image(s)"),
    "too_many_images": (lambda: greedy({"prompt": chatml_prompt("q", 9), "images": [b64(png())] * 9}),
                        400, 53, "at most 8"),
    "empty_prompt": (lambda: greedy({"prompt": "   "}), 400, 45, "empty"),
    "negative_temperature": (lambda: greedy({"prompt": chatml_prompt("q")}, temperature=-1.0), 400, 41, "temperature"),
    "zero_max_new_tokens": (lambda: greedy({"prompt": chatml_prompt("q")}, max_new_tokens=0),
                            400, 41, "max_new_tokens"),
    "top_p_above_one": (lambda: greedy({"prompt": chatml_prompt("q")}, top_p=1.5), 400, 41, "top_p"),
    "wrong_type": (lambda: greedy({"prompt": chatml_prompt("q")}, max_new_tokens="many"), 400, 41, "max_new_tokens"),
    "misspelt_field": (lambda: greedy({"prompt": chatml_prompt("q")}, temprature=0.5), 400, 41, "did you mean"),
    "lone_surrogate_prompt": (lambda: greedy({"prompt": chatml_prompt("q \ud800")}), 400, 41, "'prompt' holds"),
    "lone_surrogate_stop": (lambda: greedy({"prompt": chatml_prompt("q")}, stop=["\udfff"]), 400, 41,
                            "'stop[0]' holds"),
    "unknown_model": (lambda: greedy({"prompt": chatml_prompt("q")}, model="llava-13b"), 404, 47, "llava-13b"),
    "invalid_json": (lambda: b'{"model": "tiny", "prompt": ', 400, 40, "not valid JSON"),
    "prompt_too_long": (lambda: greedy({"prompt": chatml_prompt("the color " * 400, 1), "images": [b64(png())]}),
                        400, 44, "4 of them image tokens"),
    "body_too_large": (lambda: greedy({"prompt": chatml_prompt("q", 1), "images": [b64(os.urandom(1_200_000))]}),
                       413, 46, "exceeds the limit"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_4xx_and_the_worker_keeps_serving(cluster, ctl, case):
    make, status, code, match = BAD_INPUTS[case]
    chunk = expect_error(ctl + "/worker_generate_stream", make(), status, code, match)
    assert "NETWORK ERROR" not in chunk["text"]
    if case != "unknown_model":  # the worker itself says the same (unknown_model: the worker names what it serves)
        expect_error(cluster.procs["worker0"].url + "/worker_generate_stream", make(), status, code, match)
    assert_still_serving(cluster.procs["worker0"].url)
    assert len(workers(ctl)) == 2


def test_fields_of_llava_clients_are_accepted_and_ignored(cluster, ctl):
    # the original's clients send fields this worker does not use (e.g. echo); the original ignores them too
    payload = greedy({"prompt": chatml_prompt("hello"), "echo": False, "stop_str": None, "images": []})
    for url in (ctl, cluster.procs["worker0"].url):
        status, chunks = stream_chunks(url + "/worker_generate_stream", payload)
        assert status == 200 and chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"], chunks[-1:]
    log = cluster.procs["worker0"].log.read_text()
    assert log.count("ignoring request field(s) this worker does not know: echo, stop_str") == 1  # logged once


def test_bad_messages(ctl):
    url = ctl + "/worker_generate_messages"
    expect_error(url, greedy({"messages": [{"role": "assistant", "content": "hi"}]}), 400, 41, "alternate")
    expect_error(url, greedy({"messages": [{"role": "user", "content": " "}]}), 400, 45, "empty")
    expect_error(url, greedy({"messages": [{"role": "robot", "content": "hi"}]}), 400, 41, "role")
    expect_error(url, greedy({"messages": [{"role": "user", "content": "<image>\nhi"}]}), 400, 43, "1 <image> marker")
    expect_error(url, greedy({"messages": [{"role": "user", "content": "hi \ud83d"}]}), 400, 41,
                 "'messages[0].content' holds")


# ----------------------------------------------------------------------------------------------- CLI


def run_cli(args: list[str], stdin: str, timeout: float = 120) -> str:
    r = subprocess.run([sys.executable, "-m", "serve.cli", *args], input=stdin, capture_output=True, text=True,
                       cwd=ROOT, env=env(), timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def cli_replies(out: str) -> list[str]:
    return [part.split("\nUSER: ")[0] for part in out.split("ASSISTANT: ")[1:]]


def test_cli_through_controller(tmp_path, ctl):
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red.write_bytes(png((255, 0, 0)))
    blue.write_bytes(png((0, 0, 255)))
    stdin = f"what is this?\n/image {blue}\nand this?\n/image {tmp_path / 'missing.png'}\n/clear\nhello\n/exit\n"
    out = run_cli(["--controller-url", ctl, "--image-file", str(red), "--temperature", "0", "--max-new-tokens", "6"],
                  stdin)
    replies = cli_replies(out)
    assert len(replies) == 3 and "(image attached" in out and "(conversation cleared)" in out
    assert "[error bad_image: no such image file" in out
    # the CLI's second turn is exactly the two-image conversation sent to the worker
    messages = [{"role": "user", "content": "<image>\nwhat is this?"}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": "<image>\nand this?"}]
    _, chunks = stream_chunks(ctl + "/worker_generate_messages", greedy(
        {"messages": messages, "images": [b64(red.read_bytes()), b64(blue.read_bytes())]}, max_new_tokens=6))
    assert chunks[-1]["text"] == replies[1]
    _, chunks = stream_chunks(ctl + "/worker_generate_messages", greedy(
        {"messages": [{"role": "user", "content": "hello"}]}, max_new_tokens=6))
    assert chunks[-1]["text"] == replies[2]  # /clear really forgot the images and turns


def test_cli_in_process(cluster, ctl, tmp_path):
    red = tmp_path / "red.png"
    red.write_bytes(png((255, 0, 0)))
    out = run_cli(["--model-path", str(cluster.model_dir), "--image-file", str(red), "--temperature", "0",
                   "--max-new-tokens", "6"], "what is this?\n/exit\n")
    replies = cli_replies(out)
    _, chunks = stream_chunks(ctl + "/worker_generate_messages", greedy(
        {"messages": [{"role": "user", "content": "<image>\nwhat is this?"}], "images": [b64(red.read_bytes())]},
        max_new_tokens=6))
    assert replies == [chunks[-1]["text"]]


# ----------------------------------------------------------------------------------------------- failures


# greedy on the tiny model runs this prompt to the length limit (no EOS): ~0.5 s of streaming on an idle CPU
LONG = greedy({"prompt": chatml_prompt("count slowly")}, max_new_tokens=480)


def test_long_prompt_runs_to_the_length_limit(ctl):
    _, chunks = stream_chunks(ctl + "/worker_generate_stream", LONG)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["finish_reason"] == "length"
    assert usage["completion_tokens"] == min(480, 512 - usage["prompt_tokens"])  # clipped to the context


def test_client_leaving_cancels_generation(cluster, ctl):
    with httpx.stream("POST", ctl + "/worker_generate_stream", json=LONG, timeout=30) as r:
        url = r.headers["x-worker-address"]  # leave as soon as the headers arrive: generation is running
    # the controller closed its upstream and the worker cancelled the request (a finished one would count as ok)
    wait_until(lambda: httpx.get(url + "/health").json()["queue_length"] == 0, 5, "the request to end")
    text = httpx.get(url + "/metrics").text
    assert 'llava_worker_requests_total{endpoint="/worker_generate_stream",outcome="cancelled"} 1.0' in text


def test_silent_worker_expires_then_reregisters(cluster, ctl, record_property):
    frozen = cluster.procs["worker1"]
    frozen.popen.send_signal(signal.SIGSTOP)  # alive but silent: no heartbeats
    try:
        dropped = wait_until(lambda: frozen.url not in workers(ctl), 10, "the silent worker to expire")
    finally:
        frozen.popen.send_signal(signal.SIGCONT)
    # expiration is 3 s, checked every 0.75 s
    assert 2.0 < dropped < 6.0
    back = wait_until(lambda: frozen.url in workers(ctl), 5, "the worker to re-register")
    record_property("expiry_seconds", round(dropped, 2))
    print(f"\nsilent worker dropped after {dropped:.2f} s, re-registered {back:.2f} s after resuming")


def test_sigkill_worker_mid_stream(cluster, ctl, record_property):
    with httpx.stream("POST", ctl + "/worker_generate_stream", json=LONG, timeout=30) as r:
        splitter = FrameSplitter()
        chunks = iter(r.iter_raw())
        first = []
        while not first:
            first = splitter.feed(next(chunks))
        assert first[0]["error_code"] == 0
        victim = next(p for p in cluster.procs.values() if p.url == r.headers["x-worker-address"])
        killed_at = time.monotonic()
        victim.popen.send_signal(signal.SIGKILL)
        last = None
        for data in chunks:
            for c in splitter.feed(data):
                last = c
                if c["error_code"]:
                    break
            if last and last["error_code"]:
                break
        latency = time.monotonic() - killed_at
    record_property("kill_to_error_seconds", round(latency, 3))
    print(f"\nSIGKILL -> client error: {latency:.3f} s")
    assert last["error_code"] == 3 and "failed mid-stream" in last["error"]["message"]
    assert latency < 2.0
    assert victim.url not in workers(ctl)  # dropped at once, not after the heartbeat expiry
    survivor = next(p for n, p in cluster.procs.items() if n.startswith("worker") and p is not victim)
    status, done = stream_chunks(ctl + "/worker_generate_stream", greedy({"prompt": chatml_prompt("hello")}))
    assert status == 200 and done[-1]["error_code"] == 0
    assert list(workers(ctl)) == [survivor.url]


def test_controller_restart_workers_reregister(cluster, record_property):
    old = cluster.procs["controller"]
    port = int(old.url.rsplit(":", 1)[1])
    old.popen.send_signal(signal.SIGKILL)
    old.popen.wait(10)
    new = cluster.start("controller", "serve.controller", "--heart-beat-expiration", "3", port=port)
    wait_healthy(new)
    live = [p.url for n, p in cluster.procs.items() if n.startswith("worker") and p.popen.poll() is None]
    took = wait_until(lambda: sorted(workers(new.url)) == sorted(live), 10, "workers to re-register")
    record_property("reregister_seconds", round(took, 3))
    print(f"\nworkers re-registered {took:.3f} s after the new controller was healthy")
    status, chunks = stream_chunks(new.url + "/worker_generate_stream", greedy({"prompt": chatml_prompt("hello")}))
    assert status == 200 and chunks[-1]["error_code"] == 0


def test_default_model_worker(tmp_path):
    """The embedded default model behind a worker (builds and caches it on first use: minutes)."""
    cluster = Cluster(tmp_path, tmp_path)
    worker = cluster.start("default", "serve.model_worker", "--model-path", "default", "--no-register")
    try:
        wait_healthy(worker, timeout=900)
        shape = Image.new("RGB", (64, 64), (255, 255, 255))
        shape.paste((255, 0, 0), (16, 16, 48, 48))
        buf = io.BytesIO()
        shape.save(buf, "PNG")
        status, chunks = stream_chunks(worker.url + "/worker_generate_messages", {
            "messages": [{"role": "user", "content": "<image>\nWhat shape is in the image?"}],
            "images": [b64(buf.getvalue())], "temperature": 0, "max_new_tokens": 16}, timeout=120)
        assert status == 200 and chunks[-1]["error_code"] == 0, chunks[-1]
        assert chunks[-1]["usage"]["image_tokens"] == 64 and chunks[-1]["text"].strip()
        print("\ndefault model says:", chunks[-1]["text"])
    finally:
        cluster.stop_all()
