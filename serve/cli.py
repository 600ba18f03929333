"""Multi-turn terminal chat with streamed replies, in-process or against a controller.

Run: `python -m serve.cli --model-path PATH [--image-file FILE_OR_URL ...] [--video-file FILE ...] [--max-frames N]`
(loads the model here), or `python -m serve.cli --controller-url http://127.0.0.1:21001 [--model-name NAME]` (asks
the controller's workers). Commands typed at the prompt: `/image PATH_OR_URL` attaches an image to the next message,
`/video PATH` a video (mp4 / webm / mkv / mov / avi; frames sampled where the model runs), `/clear` starts over,
`/exit` (or end of input) quits. The conversation is a `llava.chat.ChatSession`, rendered by the model's own
template (in-process through `ServingModel.prepare_messages`, remotely by the worker's /worker_generate_messages).
Errors print their real cause and leave the conversation as it was before the failed message.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import httpx

from llava.chat import ChatSession, ChatStateError, image_bytes, video_bytes_of
from llava.config import LoadOptions
from llava.hardware import single_openmp_thread
from llava.images import MAX_IMAGE_BYTES, ImageError
from llava.templates import ImageCountError
from llava.video import VideoError
from serve.common import (
    add_config_args, add_precision_args, config_from_args, fetch_image_url, iter_chunks, parse_lora_module,
)
from serve.protocol import ErrorCode, GenerateMessagesRequest, SamplingFields, ServeError
from serve.serving import ServingModel


class Backend(Protocol):
    name: str

    def stream(self, session: ChatSession, fields: SamplingFields) -> Iterator[str]:
        """Text deltas of the reply to the session's last user message; ServeError on failure."""

    def close(self) -> None:
        """Release the model / connections."""


class LocalBackend:
    """The model and the engine in this process."""

    def __init__(self, args: argparse.Namespace):
        options = config_from_args(LoadOptions, args, quantization=args.quantization, dtype=args.dtype)
        self.serving = ServingModel.load(
            args.model_path, options, names=[args.model_name] if args.model_name else None, max_batch_size=1)
        self.adapter = None
        if args.lora:
            name, path = args.lora
            self.adapter = self.serving.adapter_for(self.serving.load_adapter(name, path)["name"])
        self.serving.engine.start()
        self.name = self.adapter or self.serving.names[0]

    def close(self) -> None:
        self.serving.engine.shutdown()  # join the scheduler thread before the interpreter tears torch down

    def stream(self, session: ChatSession, fields: SamplingFields) -> Iterator[str]:
        request = GenerateMessagesRequest(**fields.model_dump(), messages=session.to_messages(),
                                          videos=[base64.b64encode(v).decode() for v in session.videos])
        prepared = self.serving.prepare_messages(session.to_messages(), session.images, request)
        prepared.adapter = self.adapter
        handle = self.serving.submit(prepared)
        try:
            for ev in handle:
                if ev.finish_reason in ("error", "cancelled"):
                    raise ServeError(ErrorCode.GENERATION_FAILED, f"generation failed: {ev.error or ev.finish_reason}")
                yield ev.text
        finally:
            handle.cancel()  # no-op when finished; stops generation on Ctrl-C


class RemoteBackend:
    """A controller over HTTP (a single worker's URL works too when --model-name is given)."""

    def __init__(self, url: str, model: str | None, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.client = httpx.Client(timeout=httpx.Timeout(connect=5.0, read=timeout, write=30.0, pool=30.0))
        self.name = model or self._only_model()

    def close(self) -> None:
        self.client.close()

    def _only_model(self) -> str:
        try:
            r = self.client.post(self.url + "/list_models")
            r.raise_for_status()
            models = r.json()["models"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            raise SystemExit(f"cannot list the models of {self.url} ({e!r}); is it a controller? "
                             f"(for a worker, pass --model-name)") from None
        if len(models) != 1:
            raise SystemExit(f"the controller serves {models or 'no models'}; choose one with --model-name")
        return models[0]

    def stream(self, session: ChatSession, fields: SamplingFields) -> Iterator[str]:
        payload = {
            **fields.model_dump(exclude_none=True), "model": self.name, "messages": session.to_messages(),
            "images": [base64.b64encode(b).decode() for b in session.images],
            "videos": [base64.b64encode(v).decode() for v in session.videos],
        }
        try:
            with self.client.stream("POST", self.url + "/worker_generate_messages", json=payload) as r:
                for chunk in iter_chunks(r.iter_raw()):
                    yield chunk.get("delta", "")
        except httpx.HTTPError as e:
            raise ServeError(ErrorCode.WORKER_UNREACHABLE, f"{self.url} unreachable: {e!r}") from None


def load_image_arg(src: str) -> bytes:
    if src.startswith(("http://", "https://")):
        return image_bytes(fetch_image_url(src, max_bytes=MAX_IMAGE_BYTES, timeout=10.0))
    if not os.path.isfile(src):
        raise ImageError(f"no such image file: {src}")
    return image_bytes(src)


def reply(backend: Backend, session: ChatSession, fields: SamplingFields, out) -> None:
    """Stream one reply; on failure restore the session and report the cause."""
    out.write("ASSISTANT: ")
    out.flush()
    text = ""
    try:
        for delta in backend.stream(session, fields):
            text += delta
            out.write(delta)
            out.flush()
    except ServeError as e:
        out.write(f"\n[error {e.code.name.lower()}: {e.message}]\n")
        session.pop_user()
        return
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    session.add_assistant(text)


def chat_loop(backend: Backend, session: ChatSession, fields: SamplingFields, pending: list[bytes], inp, out,
              pending_videos: list[bytes] | None = None) -> None:
    pending_videos = [] if pending_videos is None else pending_videos
    while True:
        out.write("USER: ")
        out.flush()
        line = inp.readline()
        if not line:
            break
        line = line.rstrip("\n")
        command, _, arg = line.strip().partition(" ")
        if command == "/exit":
            break
        if command == "/clear":
            session.clear()
            pending.clear()
            pending_videos.clear()
            out.write("(conversation cleared)\n")
            continue
        if command == "/image":
            try:
                pending.append(load_image_arg(arg.strip()))
                out.write(f"(image attached: {arg.strip()}; it goes with your next message)\n")
            except (ImageError, ServeError) as e:
                out.write(f"[error bad_image: {e}]\n")
            continue
        if command == "/video":
            try:
                pending_videos.append(video_bytes_of(arg.strip()))
                out.write(f"(video attached: {arg.strip()}; it goes with your next message)\n")
            except VideoError as e:
                out.write(f"[error bad_video: {e}]\n")
            continue
        if not line.strip():
            continue
        try:
            session.add_user(line, pending, pending_videos)
        except (ImageError, VideoError, ImageCountError, ChatStateError) as e:
            out.write(f"[error: {e}]\n")
            continue
        pending.clear()
        pending_videos.clear()
        reply(backend, session, fields, out)


def structured_arg(args: argparse.Namespace) -> dict | None:
    if args.json:
        return {"type": "json_object"}
    if not args.json_schema:
        return None
    try:
        schema = json.loads(Path(args.json_schema).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--json-schema: {e}") from None
    return {"type": "json_schema", "value": schema}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LLaVA terminal chat")
    p.add_argument("--model-path", default=None, help="load this model in-process (default | folder | hub id)")
    p.add_argument("--model-name", default=None, help="with --controller-url: which model (or adapter) to ask")
    p.add_argument("--lora", type=parse_lora_module, default=None, metavar="NAME=PATH",
                   help="with --model-path: chat with this LoRA adapter on the model (a PEFT folder)")
    p.add_argument("--controller-url", default=None, help="chat through a controller instead of loading a model")
    p.add_argument("--image-file", action="append", default=[],
                   help="image path or URL for the first message (repeat for several)")
    p.add_argument("--video-file", action="append", default=[], help="video file for the first message (repeatable)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="frames sampled from each video (default: the model's: 32 with a video token, else 16)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="every reply is a JSON object")
    fmt.add_argument("--json-schema", metavar="FILE", default=None, help="every reply is JSON matching this schema")
    add_config_args(p.add_argument_group("loading", "with --model-path: how it is loaded (llava.config.LoadOptions)"),
                    LoadOptions)
    add_precision_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.model_path is None) == (args.controller_url is None):
        raise SystemExit("give exactly one of --model-path (in-process) or --controller-url")
    try:
        pending = [load_image_arg(f) for f in args.image_file]
    except (ImageError, ServeError) as e:
        raise SystemExit(f"--image-file: {e}") from None
    try:
        pending_videos = [video_bytes_of(f) for f in args.video_file]
    except VideoError as e:
        raise SystemExit(f"--video-file: {e}") from None
    fields = SamplingFields(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, structured=structured_arg(args))
    if args.max_frames is not None:
        fields = SamplingFields(**fields.model_dump(), max_frames=args.max_frames)  # a VideoFields value
    backend: Backend = (
        RemoteBackend(args.controller_url, args.model_name) if args.controller_url else LocalBackend(args)
    )
    if isinstance(backend, LocalBackend) and backend.serving.engine.device.type == "cpu":
        single_openmp_thread(release=True)  # this process's model runs in the engine thread: its OpenMP team alone
    sys.stdout.write(f"chatting with {backend.name}; commands: /image PATH, /video PATH, /clear, /exit\n")
    try:
        chat_loop(backend, ChatSession(system=args.system), fields, pending, sys.stdin, sys.stdout, pending_videos)
    finally:
        backend.close()


if __name__ == "__main__":
    main()
