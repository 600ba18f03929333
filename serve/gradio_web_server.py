"""The browser chat of the LLaVA demo: a gradio 6 Blocks app in front of a controller.

Run: `python -m serve.gradio_web_server --controller-url http://127.0.0.1:21001 [--host 127.0.0.1] [--port 7860]
[--log-dir serve_logs] [--log-ip] [--concurrency-count 16]`.

Promises:
- The conversation is a `llava.chat.ChatSession` (the same object the terminal CLI uses) inside a per-browser
  `WebChat`; the chat display is re-derived from it, so what is shown is what the model is sent. Prompts are never
  formatted here: the messages go to the controller's `/worker_generate_messages`, and the worker renders them with
  its model's own template.
- Several images and videos per conversation: each turn may attach images and videos (an upload never wipes the
  chat); earlier ones stay in the conversation, in marker order. Images show in the chat, a video as a player; after
  each reply the tokens each image and video cost are shown (the worker's `usage`).
- Replies stream; Stop cancels the request (the worker stops generating when the stream closes) and keeps the text
  shown so far in the conversation; Regenerate replaces the last reply; Clear starts a new conversation.
- Errors are shown in the chat with the server's stable code, its name and the message naming the real cause
  (no generic "network error").
- Logs: `<log-dir>/<UTC date>-conv.jsonl`, one JSON object per event (replies, votes, flags), appended and flushed
  per event, so a killed server loses nothing it already showed; images are saved once as `<log-dir>/images/<sha256
  of the uploaded bytes>.png`, videos as `<log-dir>/videos/<sha256>.<ext>`. The client IP is logged only with
  --log-ip.
- Binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
from PIL import Image

from llava.chat import ChatSession, ChatStateError, image_bytes, video_bytes_of
from llava.config import assets_root
from llava.images import ImageError
from llava.templates import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, ImageCountError, media_order
from llava.video import VideoError
from serve.common import aiter_chunks, config_from_args, server_parser, setup_logging
from serve.protocol import DEFAULT_CONTROLLER_URL, ErrorCode, ServeError

logger = setup_logging("serve.gradio_web_server")

IMAGE_MODES = ("default", "pad", "resize", "crop")  # "default" = the model's own preprocessing
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")  # attachments read as videos (llava.video's containers)
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.7
DEFAULT_MAX_TOKENS = 512
STOP_SETTLE_SECONDS = 5.0  # Stop waits at most this long for the cancelled reply to end
STOP_RESYNC_SECONDS = 1.0  # after Stop, the page is brought up to date once more this much later


def demo_dir() -> Path:
    """Shipped example images (assets/demo; LLAVA_ASSETS overrides assets/, as for the default model)."""
    return assets_root() / "demo"


@dataclass(frozen=True)
class WebConfig:
    controller_url: str = DEFAULT_CONTROLLER_URL
    log_dir: Path = field(default=Path("serve_logs"), metadata={
        "help": "conversation/vote JSONL logs and saved images", "parse": Path})
    log_ip: bool = field(default=False, metadata={"help": "record the client IP in the logs (off by default)"})
    concurrency_count: int = field(default=16, metadata={"help": "replies streamed at once"})
    request_timeout: float = field(default=300.0, metadata={
        "help": "seconds of silence from the controller before a reply fails"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_dir", Path(self.log_dir).resolve())  # frozen: set once here


# ----------------------------------------------------------------------------------------------- state


@dataclass
class Streaming:
    """A reply being generated: kept on the chat so Stop can keep its text even if the generator never resumes."""

    pending: dict[str, str]  # the user message being answered (by identity: a replaced turn is not touched)
    record: dict[str, Any]  # model, params, start: logged with the outcome
    text: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set when the generator has stopped yielding


@dataclass
class WebChat:
    """One browser tab's conversation: the shared `ChatSession` + what only the web page needs."""

    session: ChatSession = field(default_factory=ChatSession)
    conv_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    image_paths: list[str] = field(default_factory=list)  # display copies, parallel to session.images
    image_shas: list[str] = field(default_factory=list)  # names of the logged copies, parallel to session.images
    video_paths: list[str] = field(default_factory=list)  # parallel to session.videos
    video_shas: list[str] = field(default_factory=list)
    costs: str = ""  # what the last reply's prompt cost, per image and video (shown under the chat)
    error: str | None = None  # shown after the messages until the next action
    streaming: Streaming | None = None
    voted: bool = False  # one vote/flag per reply

    @property
    def generating(self) -> bool:
        return self.streaming is not None

    def add_user(self, text: str, images: Sequence[bytes], paths: Sequence[str], shas: Sequence[str],
                 videos: Sequence[bytes] = (), video_paths: Sequence[str] = (), video_shas: Sequence[str] = ()) -> None:
        """A user turn with `images` / `videos` (encoded bytes) shown from `paths` and logged as `shas`."""
        if self.session.awaiting_reply:
            # a turn whose reply failed or was stopped before any text: the new message replaces it
            self.drop_pending_user()
        self.session.add_user(text, images, videos)
        self.image_paths.extend(paths)
        self.image_shas.extend(shas)
        self.video_paths.extend(video_paths)
        self.video_shas.extend(video_shas)

    def drop_pending_user(self) -> None:
        n_videos = len(self.session.videos)
        _, taken = self.session.pop_user()
        if taken:
            del self.image_paths[-len(taken):]
            del self.image_shas[-len(taken):]
        del self.video_paths[len(self.session.videos):n_videos]
        del self.video_shas[len(self.session.videos):n_videos]

    @property
    def has_reply(self) -> bool:
        return bool(self.session.messages) and self.session.messages[-1]["role"] == "assistant"


def new_chat() -> WebChat:
    return WebChat()


def format_error(err: ServeError) -> str:
    return f"Error {int(err.code)} ({err.code.name.lower()}): {err.message}"


def render(chat: WebChat, partial: str | None = None) -> list[dict[str, Any]]:
    """gr.Chatbot messages for the conversation (+ a reply being streamed, + the last error)."""
    out: list[dict[str, Any]] = []
    paths = {"image": iter(chat.image_paths), "video": iter(chat.video_paths)}  # a video path shows as a player
    for m in chat.session.messages:
        if m["role"] == "assistant":
            out.append({"role": "assistant", "content": m["content"] or "_(empty reply)_"})
            continue
        text = m["content"]
        for marker in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
            text = text.replace(marker + "\n", "").replace(marker, "")
        content: list[Any] = [{"path": next(paths[kind])} for kind in media_order(m["content"])]
        text = text.strip()
        out.append({"role": "user", "content": content + [text] if text else content})
    if partial is not None:
        out.append({"role": "assistant", "content": partial})
    if chat.error:
        out.append({"role": "assistant", "content": f"**⚠ {chat.error}**"})
    return out


def token_costs(usage: dict | None) -> str | None:
    """What the prompt cost, per image and video when the worker lists them ("image 1: 64 tokens, video 1: 16
    frames, 1024 tokens, text: 52 tokens"), else the images' and videos' total."""
    if not usage:
        return None
    media, total = usage.get("media") or [], usage.get("prompt_tokens", 0)
    visual = usage.get("image_tokens", 0)
    if not media:
        return f"prompt: {total} tokens, {visual} of them for images/video frames"
    seen = {"image": 0, "video": 0}
    parts = []
    for item in media:
        seen[item["type"]] = seen.get(item["type"], 0) + 1
        frames = f"{item['frames']} frames, " if item.get("frames") else ""
        parts.append(f"{item['type']} {seen[item['type']]}: {frames}{item['tokens']} tokens")
    return f"prompt {total} tokens — " + ", ".join(parts) + f", text: {total - visual} tokens"


def button_updates(chat: WebChat, busy: bool = False) -> tuple:
    """Interactivity of (upvote, downvote, flag, regenerate, clear); `busy`: a reply is about to start."""
    idle = not (chat.generating or busy)
    vote = idle and chat.has_reply and not chat.voted
    regenerate = idle and (chat.has_reply or chat.session.awaiting_reply)
    clear = idle and bool(chat.session.messages or chat.error)
    return (gr.update(interactive=vote),) * 3 + (gr.update(interactive=regenerate), gr.update(interactive=clear))


# ----------------------------------------------------------------------------------------------- logs


class EventLog:
    """Append-only JSONL per UTC day + images saved once by content hash."""

    def __init__(self, log_dir: Path, log_ip: bool):
        self.dir = Path(log_dir)
        self.images_dir = self.dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.log_ip = log_ip
        self._lock = threading.Lock()

    def path_for(self, when: dt.datetime) -> Path:
        return self.dir / f"{when:%Y-%m-%d}-conv.jsonl"

    def write(self, event: dict[str, Any], request: gr.Request | None) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        record = {"tstamp": now.timestamp(), **event}
        if self.log_ip and request is not None and request.client is not None:
            record["ip"] = request.client.host
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, open(self.path_for(now), "a", encoding="utf-8") as f:
            f.write(line)  # closing flushes: a later kill -9 cannot lose this event

    def save_image(self, data: bytes) -> str:
        """Store the image as <sha256 of its bytes>.png (once) and return the sha."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.images_dir / f"{sha}.png"
        if not target.exists():
            tmp = target.with_suffix(f".{uuid.uuid4().hex}.tmp")
            Image.open(io.BytesIO(data)).save(tmp, format="PNG")
            os.replace(tmp, target)  # readers never see a half-written file
        return sha

    def save_video(self, data: bytes, suffix: str) -> str:
        """Store the video as <sha256 of its bytes><suffix> (once) and return the sha."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.dir / "videos" / f"{sha}{suffix}"
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            tmp = target.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return sha


def conversation_record(chat: WebChat, model: str | None) -> dict[str, Any]:
    record = {
        "conv_id": chat.conv_id, "model": model, "messages": chat.session.to_messages(),
        "images": list(chat.image_shas),
    }
    if chat.video_shas:
        record["videos"] = list(chat.video_shas)
    return record


# ----------------------------------------------------------------------------------------------- controller I/O


class ControllerClient:
    """The few controller calls the UI makes; every failure becomes a `ServeError` naming its cause."""

    def __init__(self, url: str, timeout: float):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _unreachable(self, what: str, e: Exception) -> ServeError:
        return ServeError(ErrorCode.WORKER_UNREACHABLE,
                          f"cannot reach the controller at {self.url} ({what}): {type(e).__name__}: {e}")

    async def list_models(self) -> list[str]:
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                r = await client.post(self.url + "/refresh_all_workers")
                r.raise_for_status()
                r = await client.post(self.url + "/list_models")
                r.raise_for_status()
                return list(r.json()["models"])
        except (httpx.HTTPError, ValueError, KeyError) as e:
            raise self._unreachable("listing models", e) from None

    async def stream_messages(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Chunks of `/worker_generate_messages`; an error chunk or status is raised as the server's ServeError."""
        timeout = httpx.Timeout(connect=10.0, read=self.timeout, write=60.0, pool=10.0)
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                async with client.stream("POST", self.url + "/worker_generate_messages", json=payload) as r:
                    async for chunk in aiter_chunks(r.aiter_raw()):
                        if r.status_code != 200:  # an error status always carries an error chunk; be safe
                            raise ServeError.from_chunk(chunk)
                        yield chunk
                    if r.status_code != 200:
                        raise ServeError(ErrorCode.WORKER_UNREACHABLE,
                                         f"the controller answered HTTP {r.status_code} with an empty body")
        except httpx.HTTPError as e:
            raise self._unreachable("generating", e) from None


# ----------------------------------------------------------------------------------------------- handlers


class ChatHandlers:
    """The UI's event functions. Each takes the tab's `WebChat` and returns the components it updates."""

    def __init__(self, config: WebConfig):
        self.config = config
        self.controller = ControllerClient(config.controller_url, config.request_timeout)
        self.log = EventLog(config.log_dir, config.log_ip)

    async def refresh_models(self, current: str | None):
        try:
            models = await self.controller.list_models()
        except ServeError as e:
            return gr.update(choices=[], value=None), f"⚠ {format_error(e)}"
        if not models:
            return gr.update(choices=[], value=None), "⚠ No model worker is registered with the controller yet."
        value = current if current in models else models[0]
        return gr.update(choices=models, value=value), ""

    def add_text(self, chat: WebChat, message: dict | None):
        """Add the user's turn (text + attached images and videos) to the conversation."""
        message = message or {}
        text, files = (message.get("text") or "").strip(), list(message.get("files") or [])
        chat.error = None
        try:
            if chat.generating:
                raise ChatStateError("a reply is still being generated; wait for it or press Stop")
            videos = [f for f in files if Path(f).suffix.lower() in VIDEO_SUFFIXES]
            images = [f for f in files if f not in videos]
            # validated first: a bad file is refused, not logged
            data, clips = [image_bytes(path) for path in images], [video_bytes_of(path) for path in videos]
            chat.add_user(text, data, images, [self.log.save_image(d) for d in data], clips, videos,
                          [self.log.save_video(c, Path(v).suffix.lower()) for c, v in zip(clips, videos)])
        except (ImageError, VideoError, ImageCountError, ChatStateError, OSError) as e:
            chat.error = f"{type(e).__name__}: {e}"
            return chat, render(chat), gr.update(), *button_updates(chat)
        chat.voted = False
        return chat, render(chat), gr.update(value=None), *button_updates(chat, busy=True)

    def regenerate(self, chat: WebChat):
        chat.error = None
        if chat.has_reply and not chat.generating:
            chat.session.pop_assistant()
            chat.voted = False
        return chat, render(chat), *button_updates(chat, busy=chat.session.awaiting_reply)

    def clear(self, chat: WebChat):
        if chat.generating:
            chat.error = "a reply is still being generated; press Stop first"
            return chat, render(chat), gr.update(), *button_updates(chat), chat.costs
        fresh = WebChat()
        return fresh, render(fresh), gr.update(value=None), *button_updates(fresh), ""

    async def stopped(self, chat: WebChat, request: gr.Request):
        """Stop: keep the text shown so far as the reply.

        Gradio runs the cancellation of the streaming event beside this handler, not before it, so first wait
        (briefly) until that generator has ended: an update it yields after this handler's would otherwise leave
        the buttons disabled with nothing streaming any more."""
        s = chat.streaming
        if s is not None:
            try:
                await asyncio.wait_for(s.ended.wait(), STOP_SETTLE_SECONDS)
            except TimeoutError:  # suspended at a yield when cancelled: it never resumes, nothing more comes
                pass
            self.finish_reply(chat, s, {"finish_reason": "stopped"}, request)
        return chat, render(chat), *button_updates(chat)

    async def resync(self, chat: WebChat):
        """After Stop: show the conversation and buttons once more, a moment later. An update of the cancelled
        reply that was already on its way can reach the page after Stop's own (seen once on a loaded 2-core
        machine: the reply was stopped and logged, but the page kept Regenerate and Clear disabled)."""
        await asyncio.sleep(STOP_RESYNC_SECONDS)
        # a new reply may have started meanwhile: keep its streamed text on show
        return chat, render(chat, chat.streaming.text if chat.streaming else None), *button_updates(chat)

    def finish_reply(self, chat: WebChat, s: Streaming, outcome: dict[str, Any], request: gr.Request | None) -> None:
        """Commit and log the reply `s` once (Stop and the closing generator may both get here)."""
        if chat.streaming is not s:
            return
        chat.streaming = None
        complete = outcome["finish_reason"] in ("stop", "length")
        if chat.session.messages and chat.session.messages[-1] is s.pending and (s.text or complete):
            chat.session.add_assistant(s.text)
            chat.costs = token_costs(outcome.get("usage")) or chat.costs
        self.log.write({
            "type": "chat", **conversation_record(chat, s.record["model"]), **s.record, "finish": time.time(),
            **outcome,
        }, request)

    def vote(self, kind: str):
        def handler(chat: WebChat, model: str | None, request: gr.Request):
            if chat.has_reply and not chat.voted:
                self.log.write({"type": kind, **conversation_record(chat, model)}, request)
                chat.voted = True
            return chat, *button_updates(chat)

        handler.__name__ = kind
        return handler

    async def bot_response(self, chat: WebChat, model: str | None, temperature: float, top_p: float,
                           max_new_tokens: int, image_mode: str, request: gr.Request, output_format: str = "text",
                           json_schema: str = ""):
        """Stream the reply to the pending user turn (as JSON, or JSON under a schema, when asked)."""
        if not chat.session.awaiting_reply or chat.generating:
            yield chat, render(chat), chat.costs, *button_updates(chat)
            return
        if not model:
            chat.error = "no model selected: pick one in the Model list (press Refresh if it is empty)"
            yield chat, render(chat), chat.costs, *button_updates(chat)
            return
        try:
            structured = structured_field(output_format, json_schema)
        except ValueError as e:
            chat.error = str(e)
            yield chat, render(chat), chat.costs, *button_updates(chat)
            return
        payload = {
            "model": model, "messages": chat.session.to_messages(),
            "images": [base64.b64encode(b).decode() for b in chat.session.images],
            "videos": [base64.b64encode(v).decode() for v in chat.session.videos],
            "temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_new_tokens),
            "image_mode": image_mode, "structured": structured,
        }
        params = {k: payload[k] for k in ("temperature", "top_p", "max_new_tokens", "image_mode")}
        if structured:
            params["structured"] = structured
        s = Streaming(chat.session.messages[-1], {"model": model, "params": params, "start": time.time()})
        chat.streaming, chat.error = s, None
        outcome: dict[str, Any] = {"finish_reason": "stopped"}  # stays so if the event is cancelled (Stop)
        yield chat, render(chat, ""), chat.costs, *button_updates(chat)
        try:
            async for chunk in self.controller.stream_messages(payload):
                s.text = chunk.get("text", s.text)
                if chunk.get("finish_reason"):
                    outcome = {"finish_reason": chunk["finish_reason"], "usage": chunk.get("usage")}
                yield chat, render(chat, s.text), chat.costs, *button_updates(chat)
        except ServeError as e:
            chat.error = format_error(e)
            outcome = {"finish_reason": "error", "error": {"code": int(e.code), "message": e.message}}
        finally:
            # success, error and cancellation alike (a no-op when Stop already kept the reply)
            s.ended.set()
            self.finish_reply(chat, s, outcome, request)
        yield chat, render(chat), chat.costs, *button_updates(chat)


OUTPUT_FORMATS = ("text", "JSON", "JSON schema")


def structured_field(output_format: str, json_schema: str) -> dict | None:
    """The worker's `structured` field for the UI's output format; ValueError naming what is wrong."""
    if output_format in (None, "", "text"):
        return None
    if output_format == "JSON":
        return {"type": "json_object"}
    if output_format != "JSON schema":
        raise ValueError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    try:
        schema = json.loads(json_schema or "")
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError("the JSON schema must be a JSON object")
    return {"type": "json_schema", "value": schema}


# ----------------------------------------------------------------------------------------------- layout


EXAMPLE_SCHEMA = json.dumps({
    "type": "object",
    "properties": {"shape": {"enum": ["circle", "rectangle", "triangle"]}, "color": {"type": "string"}},
    "required": ["shape", "color"],
}, indent=2)

EXAMPLES = (  # (file in assets/demo, question)
    ("easyvqa-4.png", "What color is the shape?"),
    ("easyvqa-128.png", "What shape is in the image?"),
    ("easyvqa-35.png", "Is there a green shape in the image?"),
    ("easyvqa-39.png", "What is the color of the circle?"),
    ("chelsea.jpg", "What animal is in this photo?"),
    ("astronaut.jpg", "Describe this photo."),
    ("coffee.jpg", "What is in the cup?"),
    ("rocket.jpg", "What is this?"),
)

CSS = "#llava-chatbot { min-height: 420px; }"


def example_rows() -> list[list[dict[str, Any]]]:
    """The default model's own examples first (assets/default/examples.json: `[{"files": [...], "text": ...}]`,
    files in assets/demo; the scenes default lists one per question family), then EXAMPLES."""
    root = demo_dir()
    own = assets_root() / "default" / "examples.json"
    examples = [(tuple(e["files"]), e["text"]) for e in json.loads(own.read_text())] if own.is_file() else []
    examples += [((f,), q) for f, q in EXAMPLES]
    return [[{"text": q, "files": [str(root / f) for f in files]}] for files, q in examples
            if all((root / f).is_file() for f in files)]


def build_demo(config: WebConfig) -> gr.Blocks:
    h = ChatHandlers(config)
    with gr.Blocks(title="LLaVA", analytics_enabled=False) as demo:
        chat_state = gr.State(new_chat)  # a factory: every tab gets its own conversation
        gr.Markdown("# LLaVA — chat about images")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                with gr.Row():
                    model = gr.Dropdown(label="Model", choices=[], value=None, interactive=True, scale=4, allow_custom_value=True,
                                        elem_id="model-selector")
                    refresh_btn = gr.Button("Refresh", scale=1, min_width=60, elem_id="refresh-btn")
                model_notice = gr.Markdown(elem_id="model-notice")
                image_mode = gr.Radio(list(IMAGE_MODES), value="default", label="Image process mode",
                                      info="default = the model's own preprocessing")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                                            info="0 = greedy", elem_id="temperature")
                    top_p = gr.Slider(0.0, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top P")
                    max_tokens = gr.Slider(1, 2048, value=DEFAULT_MAX_TOKENS, step=1, label="Max output tokens",
                                           elem_id="max-tokens")
                    output_format = gr.Radio(list(OUTPUT_FORMATS), value="text", label="Output format",
                                             info="JSON: the reply is a JSON object; JSON schema: one matching it",
                                             elem_id="output-format")
                    json_schema = gr.Code(value=EXAMPLE_SCHEMA, language="json", label="JSON schema",
                                          elem_id="json-schema")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="LLaVA", elem_id="llava-chatbot", height=480, feedback_options=None,
                                     buttons=["copy"])
                costs = gr.Markdown(elem_id="token-costs")  # tokens of each image / video in the last prompt
                textbox = gr.MultimodalTextbox(
                    placeholder="Ask about the image(s) or video… attach one or more with the clip button",
                    file_types=["image", "video"], file_count="multiple", show_label=False, elem_id="chat-input",
                )
                with gr.Row():
                    upvote_btn = gr.Button("Upvote", interactive=False, elem_id="upvote-btn")
                    downvote_btn = gr.Button("Downvote", interactive=False, elem_id="downvote-btn")
                    flag_btn = gr.Button("Flag", interactive=False, elem_id="flag-btn")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                    regenerate_btn = gr.Button("Regenerate", interactive=False, elem_id="regenerate-btn")
                    clear_btn = gr.Button("Clear", interactive=False, elem_id="clear-btn")
        rows = example_rows()
        if rows:
            gr.Examples(examples=rows, inputs=[textbox], label="Examples (click one, then press Enter)")

        buttons = [upvote_btn, downvote_btn, flag_btn, regenerate_btn, clear_btn]
        gen_inputs = [chat_state, model, temperature, top_p, max_tokens, image_mode, output_format, json_schema]
        gen_outputs = [chat_state, chatbot, costs, *buttons]

        refresh_args = dict(fn=h.refresh_models, inputs=[model], outputs=[model, model_notice])
        refresh_btn.click(**refresh_args, api_name="refresh_models")
        demo.load(**refresh_args, api_visibility="private")

        submit = textbox.submit(h.add_text, [chat_state, textbox], [chat_state, chatbot, textbox, *buttons],
                                api_name="add_text")
        submit_gen = submit.then(h.bot_response, gen_inputs, gen_outputs, api_name="bot_response")
        regen = regenerate_btn.click(h.regenerate, [chat_state], [chat_state, chatbot, *buttons],
                                     api_name="regenerate")
        regen_gen = regen.then(h.bot_response, gen_inputs, gen_outputs, api_visibility="private")
        stop_btn.click(h.stopped, [chat_state], [chat_state, chatbot, *buttons], cancels=[submit_gen, regen_gen],
                       api_name="stop").then(h.resync, [chat_state], [chat_state, chatbot, *buttons],
                                             api_visibility="private")
        clear_btn.click(h.clear, [chat_state], [chat_state, chatbot, textbox, *buttons, costs], api_name="clear")
        # the chatbot's own trash icon must clear the conversation too, not just the display
        chatbot.clear(h.clear, [chat_state], [chat_state, chatbot, textbox, *buttons, costs], api_visibility="private")
        for btn, kind in ((upvote_btn, "upvote"), (downvote_btn, "downvote"), (flag_btn, "flag")):
            btn.click(h.vote(kind), [chat_state, model], [chat_state, *buttons], api_name=kind)
    demo.queue(default_concurrency_limit=config.concurrency_count)
    return demo


# ----------------------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    return server_parser("LLaVA web chat (gradio) in front of a controller", 7860, WebConfig)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(WebConfig, args)
    demo = build_demo(config)
    logger.info("web UI on http://%s:%d (controller %s, logs in %s)", args.host, args.port, config.controller_url,
                config.log_dir)
    demo.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, show_error=True,
                allowed_paths=[str(demo_dir())], css=CSS, footer_links=["api", "settings"])


if __name__ == "__main__":
    main()
