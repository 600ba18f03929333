"""The web chat end to end: real controller + worker (tiny model) + gradio server processes on free loopback ports,
driven with gradio_client; and `serve.launch` starting and stopping all three."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.common import free_port

from conftest import DEMO, ENV, REPO, Stack, spawn, wait_for  # noqa: E402  (shared with test_browser)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from llava.testing import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    s = Stack(tiny_model, tmp_path_factory.mktemp("stack"), "tiny")
    try:
        s.wait_ready(timeout=180)
        yield s
    finally:
        s.close()


def client_for(stack: Stack):
    from gradio_client import Client

    return Client(stack.url, verbose=False)


def chatbot_of(result) -> list[dict]:
    """The Chatbot value in an event's outputs: State and Buttons are hidden from clients, the chat comes first (and
    is the whole result when it is the only visible output)."""
    return result[0] if isinstance(result, tuple) else result


def texts(message: dict) -> str:
    return " ".join(part["text"] for part in message["content"] if part.get("type") == "text")


def files(message: dict) -> list[dict]:
    return [part for part in message["content"] if part.get("type") == "file"]


def ask(client, text: str, images: list[Path], model: str = "tiny", max_tokens: int = 12, mode: str = "default"):
    """add_text + the streamed bot_response; returns (final chatbot, all streamed chatbots)."""
    from gradio_client import handle_file

    client.predict({"text": text, "files": [handle_file(str(p)) for p in images]}, api_name="/add_text")
    job = client.submit(model, 0.2, 0.7, max_tokens, mode, api_name="/bot_response")
    final = job.result(timeout=120)
    return chatbot_of(final), [chatbot_of(o) for o in job.outputs()]


# ----------------------------------------------------------------------------------------------- tests


def test_models_listed_from_controller(stack):
    update, notice = client_for(stack).predict(None, api_name="/refresh_models")
    assert [c[0] for c in update["choices"]] == ["tiny"]
    assert update["value"] == "tiny" and notice == ""


def test_multi_turn_image_conversation_streams_and_logs(stack):
    client = client_for(stack)
    first_img, second_img = DEMO / "easyvqa-4.png", DEMO / "chelsea.jpg"

    chat, streamed = ask(client, "What color is the shape?", [first_img])
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert texts(chat[0]) == "What color is the shape?" and len(files(chat[0])) == 1
    reply1 = texts(chat[1])
    assert reply1
    # streamed: several intermediate states, each reply a prefix of the next
    partials = [texts(c[1]) for c in streamed if len(c) == 2 and c[1]["role"] == "assistant"]
    assert len(partials) >= 3, partials
    assert all(b.startswith(a) for a, b in zip(partials, partials[1:]))

    # a second image later in the conversation keeps the first turn
    chat, _ = ask(client, "And this one?", [second_img], mode="pad")
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert texts(chat[1]) == reply1
    assert len(files(chat[0])) == 1 and len(files(chat[2])) == 1 and texts(chat[3])

    client.predict("tiny", api_name="/upvote")

    events = [e for e in stack.log_events() if e["conv_id"] == stack.log_events()[-1]["conv_id"]]
    assert [e["type"] for e in events] == ["chat", "chat", "upvote"]
    last_chat = events[1]
    assert [m["role"] for m in last_chat["messages"]] == ["user", "assistant", "user", "assistant"]
    assert last_chat["messages"][0]["content"] == "<image>\nWhat color is the shape?"
    assert last_chat["finish_reason"] in ("stop", "length") and last_chat["usage"]["image_tokens"] > 0
    assert last_chat["params"] == {"temperature": 0.2, "top_p": 0.7, "max_new_tokens": 12, "image_mode": "pad"}
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first_img, second_img)]
    assert last_chat["images"] == shas
    assert all((stack.log_dir / "images" / f"{s}.png").is_file() for s in shas)
    assert all("ip" not in e for e in events)  # not logged without --log-ip


def test_errors_show_the_real_cause_and_regenerate_recovers(stack):
    client = client_for(stack)
    chat, _ = ask(client, "What shape is this?", [DEMO / "easyvqa-128.png"], model="no-such-model")
    assert chat[-1]["role"] == "assistant"
    err = texts(chat[-1])
    assert "Error 47 (unknown_model)" in err and "no-such-model" in err and "tiny" in err

    client.predict(api_name="/regenerate")
    job = client.submit("tiny", 0.2, 0.7, 8, "default", api_name="/bot_response")
    chat = chatbot_of(job.result(timeout=120))
    assert [m["role"] for m in chat] == ["user", "assistant"] and "Error" not in texts(chat[1])


def test_json_output_formats(stack):
    """The Parameters' output format: JSON under a schema (the random model's reply still parses and matches),
    and a schema that is not JSON is shown as the error."""
    client = client_for(stack)
    schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "rectangle"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["shape", "n"], "additionalProperties": False}
    client.predict({"text": "Describe it as JSON", "files": []}, api_name="/add_text")
    job = client.submit("tiny", 0.0, 1.0, 60, "default", "JSON schema", json.dumps(schema), api_name="/bot_response")
    reply = json.loads(texts(chatbot_of(job.result(timeout=120))[-1]))
    assert reply["shape"] in ("circle", "rectangle") and 0 <= reply["n"] <= 9
    client.predict(api_name="/clear")
    client.predict({"text": "Again", "files": []}, api_name="/add_text")
    job = client.submit("tiny", 0.0, 1.0, 20, "default", "JSON schema", "{not json", api_name="/bot_response")
    assert "not valid JSON" in texts(chatbot_of(job.result(timeout=120))[-1])


def test_bad_image_is_refused_with_its_cause(stack, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    client = client_for(stack)
    result = client.predict({"text": "What is this?", "files": [handle_file(str(bad))]}, api_name="/add_text")
    chat = chatbot_of(result)
    assert len(chat) == 1 and "ImageError" in texts(chat[0])


def test_clear_starts_a_new_conversation(stack):
    client = client_for(stack)
    chat, _ = ask(client, "hello", [])
    assert len(chat) == 2
    assert chatbot_of(client.predict(api_name="/clear")) == []
    chat, _ = ask(client, "again", [])
    assert [texts(m) for m in chat][:1] == ["again"] and len(chat) == 2


def test_client_ip_logged_only_when_enabled(tmp_path):
    import gradio as gr
    from starlette.requests import Request

    from serve.gradio_web_server import EventLog

    request = gr.Request(request=Request({"type": "http", "client": ("10.1.2.3", 5000), "headers": []}))
    for enabled in (False, True):
        log = EventLog(tmp_path / str(enabled), log_ip=enabled)
        log.write({"type": "upvote"}, request)
        (event,) = [json.loads(line) for line in next((tmp_path / str(enabled)).glob("*-conv.jsonl")).read_text().splitlines()]
        assert event.get("ip") == ("10.1.2.3" if enabled else None) and event["type"] == "upvote"


# ----------------------------------------------------------------------------------------------- launch


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_launch_starts_everything_and_stops_cleanly(tiny_model, tmp_path, sig):
    port, cport, wport = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.launch", "--model-path", str(tiny_model), "--model-name", "tiny", "--port",
         str(port), "--controller-port", str(cport), "--worker-port", str(wport), "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    pids, lines = {}, []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.match(r"started (.+) pid (\d+)", line):
                pids[m.group(1)] = int(m.group(2))
            if "LLaVA demo ready" in line:
                break
        assert any("LLaVA demo ready" in l and f"http://127.0.0.1:{port}" in l for l in lines), "".join(lines[-40:])
        assert set(pids) == {"controller", "model worker", "web UI"}
        # keep reading: the children share this pipe and must never block on a full one
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
        assert httpx.post(f"http://127.0.0.1:{cport}/list_models", timeout=5).json()["models"] == ["tiny"]

        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert proc.returncode == 0
        assert [name for name, pid in pids.items() if alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stop_keeps_the_partial_reply(stack, tmp_path):
    """Closing the reply stream mid-way (what Stop does) keeps the text shown so far and logs it as stopped."""
    import asyncio

    from serve.gradio_web_server import ChatHandlers, WebChat, WebConfig

    handlers = ChatHandlers(WebConfig(controller_url=stack.controller, log_dir=tmp_path / "logs"))
    chat = WebChat()
    handlers.add_text(chat, {"text": "What color is the shape?", "files": [str(DEMO / "easyvqa-35.png")]})

    async def stop_after(n: int) -> str:
        # greedy: sampled, the random tiny model may end its reply before n characters (then nothing is stopped)
        gen = handlers.bot_response(chat, "tiny", 0.0, 1.0, 400, "default", None)
        shown = ""
        async for out in gen:
            shown = out[1][-1]["content"] if out[1][-1]["role"] == "assistant" else ""
            if chat.generating and len(shown) >= n:
                break
        await gen.aclose()  # gradio cancels the event the same way: the generator is closed mid-stream
        return shown

    shown = asyncio.run(stop_after(3))
    assert shown and not chat.generating
    assert chat.session.messages[-1] == {"role": "assistant", "content": shown}
    (event,) = [json.loads(line) for f in (tmp_path / "logs").glob("*-conv.jsonl") for line in f.read_text().splitlines()]
    assert event["finish_reason"] == "stopped" and event["messages"][-1]["content"] == shown
    # the conversation goes on from the kept reply
    handlers.add_text(chat, {"text": "And the shape?", "files": []})
    assert [m["role"] for m in chat.session.messages] == ["user", "assistant", "user"]
