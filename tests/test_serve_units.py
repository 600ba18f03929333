"""In-process tests of the serving pieces that need no model: error table, framing, allowlist, image payloads,
the controller's registry/dispatch/expiry and its HTTP endpoints (FastAPI TestClient)."""

from __future__ import annotations

import base64
import json
import random

import pytest
from fastapi.testclient import TestClient

from serve.common import AddressAllowlist, FrameSplitter, decode_image_payload, encode_chunk, iter_chunks
from serve.controller import ControllerConfig, Metrics, Registry, create_app
from serve.protocol import ERROR_STATUS, ErrorCode, ServeError, WorkerStatus


# ----------------------------------------------------------------------------------------------- protocol


def test_error_codes_are_stable_and_all_have_a_status():
    # LLaVA's meanings for 0-3 must not move
    assert (ErrorCode.OK, ErrorCode.INTERNAL, ErrorCode.NO_WORKER, ErrorCode.WORKER_UNREACHABLE) == (0, 1, 2, 3)
    assert set(ERROR_STATUS) == set(ErrorCode)
    assert ERROR_STATUS[ErrorCode.BAD_IMAGE] == 400 and ERROR_STATUS[ErrorCode.UNKNOWN_MODEL] == 404
    assert ERROR_STATUS[ErrorCode.BODY_TOO_LARGE] == 413 and ERROR_STATUS[ErrorCode.OUT_OF_MEMORY] >= 500


def test_serve_error_round_trips_through_a_chunk():
    err = ServeError(ErrorCode.PROMPT_TOO_LONG, "prompt has 600 tokens but the context is 512")
    chunk = json.loads(encode_chunk(err.to_chunk())[:-1])
    assert chunk == {"text": err.message, "error_code": 44,
                     "error": {"code": "prompt_too_long", "message": err.message}}
    back = ServeError.from_chunk(chunk)
    assert back.code == ErrorCode.PROMPT_TOO_LONG and back.message == err.message and back.status == 400
    assert ServeError.from_chunk({"text": "x", "error_code": 999}).code == ErrorCode.INTERNAL


# ----------------------------------------------------------------------------------------------- framing


def test_frame_splitter_handles_any_cut():
    chunks = [{"text": f"t{i}\u00e9", "error_code": 0} for i in range(5)]
    stream = b"".join(encode_chunk(c) for c in chunks)
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(stream)), 6))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        assert list(iter_chunks(pieces)) == chunks


def test_cut_off_stream_is_an_error():
    data = encode_chunk({"text": "a", "error_code": 0}) + b'{"text": "b"'
    splitter = FrameSplitter()
    assert splitter.feed(data) == [{"text": "a", "error_code": 0}]
    assert splitter.pending == b'{"text": "b"'
    with pytest.raises(ServeError) as e:
        list(iter_chunks([data]))
    assert e.value.code == ErrorCode.WORKER_UNREACHABLE


# ----------------------------------------------------------------------------------------------- allowlist / images


def test_default_allowlist_is_loopback_only():
    allow = AddressAllowlist.parse("127.0.0.1,localhost,::1")
    assert allow.check_url("http://127.0.0.1:21002/") == "http://127.0.0.1:21002"
    assert allow.check_url("http://[::1]:8000") == "http://[::1]:8000"
    assert allow.check_url("http://LOCALHOST:1") == "http://LOCALHOST:1"
    for bad in ("http://169.254.169.254", "http://10.0.0.5:21002", "file:///etc/passwd", "gopher://127.0.0.1",
                "http://user:pw@127.0.0.1:1", "http://127.0.0.1:1/?x=1", "127.0.0.1:21002"):
        with pytest.raises(ServeError) as e:
            allow.check_url(bad)
        assert e.value.code == ErrorCode.WORKER_NOT_ALLOWED and e.value.status == 403


def test_allowlist_networks_and_suffixes():
    allow = AddressAllowlist.parse("10.0.0.0/8, *.cluster.local, gpu-box")
    assert allow.allows_host("10.1.2.3") and not allow.allows_host("11.0.0.1")
    assert allow.allows_host("w1.cluster.local") and not allow.allows_host("cluster.local.evil.com")
    assert allow.allows_host("gpu-box") and not allow.allows_host("gpu-box2")
    assert AddressAllowlist.parse("*").allows_host("example.com")


def test_image_payload_decoding_never_reads_files():
    raw = b"\x89PNG whatever"
    assert decode_image_payload(base64.b64encode(raw).decode(), 0, 100) == raw
    assert decode_image_payload("data:image/png;base64," + base64.b64encode(raw).decode(), 0, 100) == raw
    # a path is decoded as (odd) base64 text, never opened
    assert decode_image_payload("/etc/hosts", 0, 100) == base64.b64decode("/etc/hosts" + "==")
    for bad, match in (("not base64!", "invalid base64"), ("data:image/png,abc", "must be base64"),
                       ("", "non-empty"), (base64.b64encode(b"x" * 300).decode(), "exceeds the limit")):
        with pytest.raises(ServeError, match=match) as e:
            decode_image_payload(bad, 3, 100)
        assert e.value.code == ErrorCode.BAD_IMAGE and "image 3" in e.value.message


# ----------------------------------------------------------------------------------------------- registry


def make_registry(method="shortest_queue", expiration=30.0, seed=0) -> Registry:
    return Registry(ControllerConfig(dispatch_method=method, heart_beat_expiration=expiration), Metrics(),
                    rng=random.Random(seed))


def status(*models, speed=1.0, queue=0) -> WorkerStatus:
    return WorkerStatus(model_names=list(models), speed=speed, queue_length=queue)


def test_shortest_queue_picks_least_loaded_and_counts_its_own_dispatches():
    reg = make_registry()
    reg.add("http://a", status("m", queue=3), True)
    reg.add("http://b", status("m", queue=1), True)
    reg.add("http://c", status("other"), True)
    picks = [reg.choose("m") for _ in range(4)]
    # b: 1 -> 2 -> 3, then a and b tie at 3
    assert picks[:2] == ["http://b", "http://b"] and set(picks[2:]) <= {"http://a", "http://b"}
    assert reg.choose("missing") is None
    reg.release("http://b")
    assert reg.heart_beat("http://a", 0) and reg.choose("m") == "http://a"
    assert reg.models() == ["m", "other"]
    s = reg.status()
    assert s.speed == 3 and s.model_names == ["m", "other"]


def test_shortest_queue_weighs_speed():
    reg = make_registry()
    reg.add("http://slow", status("m", speed=1, queue=2), True)
    reg.add("http://fast", status("m", speed=4, queue=4), True)
    assert reg.choose("m") == "http://fast"  # 4/4 < 2/1


def test_lottery_is_weighted_by_speed():
    reg = make_registry("lottery", seed=1)
    reg.add("http://a", status("m", speed=1), True)
    reg.add("http://b", status("m", speed=3), True)
    picks = [reg.choose("m") for _ in range(4000)]
    share = picks.count("http://b") / len(picks)
    assert 0.70 < share < 0.80


def test_expiry_drops_silent_workers_only():
    reg = make_registry(expiration=10)
    reg.add("http://a", status("m"), True)
    reg.add("http://b", status("m"), True)
    reg.add("http://pinned", status("m"), check_heart_beat=False)
    now = reg.workers["http://a"].last_heart_beat
    reg.workers["http://b"].last_heart_beat = now + 8
    assert reg.expire(now + 11) == ["http://a"]
    assert sorted(reg.workers) == ["http://b", "http://pinned"]
    assert not reg.heart_beat("http://a", 0)  # unknown now: the worker will re-register


def test_bad_dispatch_method_is_refused():
    with pytest.raises(ValueError, match="shortest_queue, lottery"):
        ControllerConfig(dispatch_method="round_robin")


# ----------------------------------------------------------------------------------------------- controller HTTP


@pytest.fixture
def controller():
    with TestClient(create_app(ControllerConfig(heart_beat_expiration=30))) as client:
        yield client


def register(client, url, *models, queue=0):
    return client.post("/register_worker", json={
        "worker_name": url, "check_heart_beat": True,
        "worker_status": {"model_names": list(models), "speed": 1, "queue_length": queue}})


def test_controller_endpoints(controller):
    assert register(controller, "http://127.0.0.1:5001", "a").status_code == 200
    assert register(controller, "http://localhost:5002/", "a", "b", queue=5).status_code == 200
    assert controller.post("/list_models").json() == {"models": ["a", "b"], "adapters": {}}
    assert controller.post("/get_worker_address", json={"model": "b"}).json() == {"address": "http://localhost:5002"}
    assert controller.post("/get_worker_address", json={"model": "a"}).json() == {"address": "http://127.0.0.1:5001"}
    assert controller.post("/get_worker_address", json={"model": "zzz"}).json() == {"address": ""}
    def beat(url):
        return controller.post("/receive_heart_beat", json={"worker_name": url, "queue_length": 0}).json()

    assert beat("http://localhost:5002") == {"exist": True}
    assert beat("http://127.0.0.1:9") == {"exist": False}
    st = controller.post("/worker_get_status").json()
    assert st["model_names"] == ["a", "b"] and st["speed"] == 2
    health = controller.get("/health").json()
    assert health == {"status": "ok", "workers": 2, "models": ["a", "b"]}
    assert "llava_controller_workers 2.0" in controller.get("/metrics").text


def test_controller_refuses_and_reports_clearly(controller):
    r = register(controller, "http://8.8.8.8:80", "evil")
    assert r.status_code == 403 and r.json()["error"]["code"] == "worker_not_allowed"
    r = controller.post("/register_worker", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = controller.post("/get_worker_address", json={"modell": "x"})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    # proxy: unknown model is a framed 404 naming what is served
    register(controller, "http://127.0.0.1:5001", "a")
    r = controller.post("/worker_generate_stream", json={"model": "llava-13b", "prompt": "hi"})
    chunk = FrameSplitter().feed(r.content)[0]
    assert r.status_code == 404 and chunk["error_code"] == ErrorCode.UNKNOWN_MODEL
    assert "llava-13b" in chunk["text"] and "available models: a" in chunk["text"]
    r = controller.post("/worker_generate_stream", json={"prompt": "hi"})
    assert r.status_code == 400 and FrameSplitter().feed(r.content)[0]["error_code"] == ErrorCode.INVALID_PARAMS


def test_unreachable_worker_is_dropped_and_reported(controller):
    from serve.common import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    register(controller, dead, "a")
    r = controller.post("/worker_generate_stream", json={"model": "a", "prompt": "hi"})
    chunk = FrameSplitter().feed(r.content)[0]
    assert r.status_code == 503 and chunk["error_code"] == ErrorCode.NO_WORKER and dead in chunk["text"]
    assert controller.post("/list_models").json() == {"models": [], "adapters": {}}
    r = controller.post("/refresh_all_workers")
    assert r.status_code == 200


# ----------------------------------------------------------------------------------------------- OpenAI SSE


def sse_events(chunks: list[dict], include_usage: bool = False) -> list:
    """Run the OpenAI server's SSE conversion over a worker stream made of `chunks`."""
    import asyncio

    import httpx

    from serve.openai_api_server import ChatCompletionRequest, stream_sse

    async def body():
        for c in chunks:
            yield encode_chunk(c)

    async def collect():
        upstream = httpx.Response(200, content=body())
        req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    stream_options={"include_usage": include_usage})
        return [piece async for piece in stream_sse([upstream], req, "chatcmpl-1", 0)]

    out = []
    for raw in asyncio.run(collect()):
        text = raw.decode()
        assert text.startswith("data: ") and text.endswith("\n\n")
        payload = text[6:-2]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_sse_stream_shape_and_usage():
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11, "image_tokens": 4}
    events = sse_events([
        {"text": "A", "delta": "A", "error_code": 0, "finish_reason": None},
        {"text": "AB", "delta": "B", "error_code": 0, "finish_reason": "stop", "usage": usage},
    ], include_usage=True)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""} and [d.get("content") for d in deltas[1:3]] == ["A", "B"]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens_details"]["image_tokens"] == 4


def test_sse_error_mid_stream_is_an_error_event_without_done():
    err = ServeError(ErrorCode.WORKER_UNREACHABLE, "worker http://127.0.0.1:1 failed mid-stream")
    events = sse_events([{"text": "A", "delta": "A", "error_code": 0, "finish_reason": None}, err.to_chunk()])
    assert "[DONE]" not in events
    assert events[-1] == {"error": {"message": err.message, "type": "server_error", "code": "worker_unreachable",
                                    "param": None}}
