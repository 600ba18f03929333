"""An OpenAI-compatible HTTP API in front of the controller (the `openai` Python SDK works unmodified).

Run: `python -m serve.openai_api_server [--host 127.0.0.1] [--port 8000] [--controller-address
http://127.0.0.1:21001] [--api-keys KEY1,KEY2] [--allow-image-urls --image-url-max-bytes N --image-url-timeout S]`.

- GET /v1/models: the models the controller's workers serve.
- POST /v1/chat/completions: messages whose content is a string or parts {"type": "text"} / {"type": "image_url",
  "image_url": {"url": "data:image/...;base64,..."}}; http(s) image URLs only with --allow-image-urls (then fetched
  here with a byte cap and a deadline). Each image part becomes one `<image>` marker where it stands (parts joined
  with newlines) and the worker renders the conversation with the model's own template. `stream: true` answers with
  server-sent events (`chat.completion.chunk`, then `data: [DONE]`); `stream_options.include_usage` adds a usage
  chunk. `usage.prompt_tokens` counts image tokens too; `usage.prompt_tokens_details.image_tokens` says how many.
  Extensions: top_k, repetition_penalty, image_mode.
- Errors: {"error": {"message", "type", "code", "param"}} with the worker's status (400 bad image, 404 unknown model,
  401 bad key...); an error after streaming began is one SSE event `data: {"error": {...}}` (the SDK raises it).
- With --api-keys, every /v1 request needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llava.image_data import MAX_IMAGE_BYTES
from llava.templates import IMAGE_PLACEHOLDER
from serve.common import (
    DEFAULT_MAX_BODY_BYTES, FRAME_DELIMITER, aiter_chunks, config_from_args, fetch_image_url, iter_chunks,
    parse_body, server_parser, setup_logging,
)
from serve.protocol import DEFAULT_CONTROLLER_URL, ErrorCode, ServeError

logger = setup_logging("serve.openai_api_server")

IMAGE_MARKER = IMAGE_PLACEHOLDER  # the marker the worker's renderer expands


# ----------------------------------------------------------------------------------------------- schemas


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, metadata, ...) are accepted and unused

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    image_mode: Literal["pad", "resize", "crop", "anyres", "default"] | None = None


# ----------------------------------------------------------------------------------------------- state


@dataclass
class OpenAIConfig:
    controller_address: str = field(default=DEFAULT_CONTROLLER_URL, metadata={"parse": lambda v: v.rstrip("/")})
    api_keys: frozenset[str] = field(default=frozenset(), metadata={
        "help": "comma-separated keys; empty = no authentication",
        "parse": lambda v: frozenset(k.strip() for k in v.split(",") if k.strip())})
    allow_image_urls: bool = field(default=False, metadata={"help": "fetch http(s) image_url parts"})
    image_url_max_bytes: int = MAX_IMAGE_BYTES
    image_url_timeout: float = 10.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_max_tokens: int = 256


@dataclass
class OpenAIState:
    config: OpenAIConfig
    client: httpx.AsyncClient


def openai_error(err: ServeError) -> JSONResponse:
    status = err.status
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": err.message, "type": kind, "code": err.code.name.lower(), "param": None}}
    return JSONResponse(body, status_code=status)


def check_api_key(config: OpenAIConfig, request: Request) -> None:
    if not config.api_keys:
        return
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    # compare against every key in constant time, so timing does not reveal how much of a key matched
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
        raise ServeError(ErrorCode.UNAUTHORIZED, "missing or invalid API key (send Authorization: Bearer <key>)")


# ----------------------------------------------------------------------------------------------- conversion


async def image_payload(config: OpenAIConfig, url: str, index: int) -> str:
    """What the worker receives for an image_url: data URIs as they are; http(s) fetched here (if enabled)."""
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        if not config.allow_image_urls:
            raise ServeError(
                ErrorCode.BAD_IMAGE,
                f"image {index}: http(s) image URLs are disabled on this server; send a data: URI "
                f"(or start the server with --allow-image-urls)",
            )
        data = await asyncio.to_thread(
            fetch_image_url, url, max_bytes=config.image_url_max_bytes, timeout=config.image_url_timeout,
        )
        return base64.b64encode(data).decode()
    raise ServeError(ErrorCode.BAD_IMAGE, f"image {index}: image_url must be a data: URI or an http(s) URL")


async def to_worker_messages(config: OpenAIConfig, messages: list[Message]) -> tuple[list[dict], list[str]]:
    """Worker messages (content strings with `<image>` markers) and the images, in marker order."""
    out: list[dict] = []
    images: list[str] = []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None or isinstance(msg.content, str):
            out.append({"role": role, "content": msg.content or ""})
            continue
        pieces = []
        for part in msg.content:
            if part.type == "text":
                pieces.append(part.text or "")
            elif part.image_url is None:
                raise ServeError(
                    ErrorCode.INVALID_PARAMS, f"invalid request: messages.{i}: image_url part without image_url"
                )
            else:
                images.append(await image_payload(config, part.image_url.url, len(images)))
                pieces.append(IMAGE_MARKER)
        out.append({"role": role, "content": "\n".join(pieces)})
    return out, images


async def worker_payload(config: OpenAIConfig, req: ChatCompletionRequest) -> dict:
    if req.n != 1:
        raise ServeError(ErrorCode.INVALID_PARAMS, f"invalid request: n: only n=1 is supported, got {req.n}")
    messages, images = await to_worker_messages(config, req.messages)
    given = [t for t in (req.max_completion_tokens, req.max_tokens) if t is not None]
    max_tokens = given[0] if given else config.default_max_tokens  # 0 or less is refused by the worker
    return {
        "model": req.model, "messages": messages, "images": images, "temperature": req.temperature,
        "top_p": req.top_p, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
        "max_new_tokens": max_tokens, "stop": req.stop, "seed": req.seed, "image_mode": req.image_mode,
    }


# ----------------------------------------------------------------------------------------------- upstream


def unreachable(config: OpenAIConfig, e: Exception) -> ServeError:
    return ServeError(ErrorCode.WORKER_UNREACHABLE, f"controller {config.controller_address} unreachable: {e!r}")


async def open_generation(state: OpenAIState, payload: dict) -> httpx.Response:
    url = state.config.controller_address + "/worker_generate_messages"
    request = state.client.build_request("POST", url, json=payload)
    try:
        upstream = await state.client.send(request, stream=True)
    except httpx.TransportError as e:
        raise unreachable(state.config, e) from None
    if upstream.status_code != 200:
        body = await upstream.aread()
        await upstream.aclose()
        raise error_from_body(body, upstream.status_code)
    return upstream


def error_from_body(body: bytes, status: int) -> ServeError:
    try:
        chunks = list(iter_chunks([body + FRAME_DELIMITER], raise_errors=False))
    except ServeError:  # not our framing (e.g. a proxy's HTML error page)
        chunks = []
    if chunks and isinstance(chunks[0], dict) and chunks[0].get("error_code"):
        return ServeError.from_chunk(chunks[0])
    return ServeError(ErrorCode.INTERNAL, f"upstream answered HTTP {status}: {body[:200]!r}")


async def upstream_chunks(upstream: httpx.Response) -> AsyncIterator[dict]:
    """The worker's chunks; an error chunk raises ServeError; a cut connection raises WORKER_UNREACHABLE."""
    try:
        async for chunk in aiter_chunks(upstream.aiter_raw()):
            yield chunk
    except httpx.TransportError as e:
        raise ServeError(ErrorCode.WORKER_UNREACHABLE, f"the connection to the controller broke: {e!r}") from None
    finally:
        await upstream.aclose()


def usage_dict(usage: dict | None) -> dict | None:
    if not usage:
        return None
    return {
        "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "prompt_tokens_details": {"image_tokens": usage.get("image_tokens", 0), "cached_tokens": 0},
    }


async def complete(upstream: httpx.Response, req: ChatCompletionRequest, rid: str, created: int) -> dict:
    text, finish, usage = "", None, None
    async for chunk in upstream_chunks(upstream):
        text += chunk.get("delta", "")
        if chunk.get("finish_reason"):
            finish, usage = chunk["finish_reason"], chunk.get("usage")
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                     "logprobs": None}],
        "usage": usage_dict(usage),
    }


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def stream_sse(
    upstream: httpx.Response, req: ChatCompletionRequest, rid: str, created: int
) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    want_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for c in upstream_chunks(upstream):
            if c.get("delta"):
                yield chunk({"content": c["delta"]})
            if c.get("finish_reason"):
                yield chunk({}, c["finish_reason"])
                if want_usage:
                    yield sse({**base, "choices": [], "usage": usage_dict(c.get("usage"))})
    except ServeError as e:
        yield sse({"error": {"message": e.message, "type": "server_error", "code": e.code.name.lower(), "param": None}})
        return
    yield sse("[DONE]")


# ----------------------------------------------------------------------------------------------- app


def create_app(config: OpenAIConfig | None = None) -> FastAPI:
    config = config or OpenAIConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        timeout = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=30.0)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        client = httpx.AsyncClient(timeout=timeout, limits=limits)
        app.state.openai = OpenAIState(config, client)
        yield
        await client.aclose()

    app = FastAPI(title="llava OpenAI-compatible API", lifespan=lifespan)

    def st(request: Request) -> OpenAIState:
        return request.app.state.openai

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return openai_error(exc)

    @app.get("/v1/models")
    async def list_models(request: Request):
        s = st(request)
        check_api_key(s.config, request)
        try:
            r = await s.client.post(s.config.controller_address + "/list_models")
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise unreachable(s.config, e) from None
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "llava"} for m in r.json()["models"]
        ]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        s = st(request)
        check_api_key(s.config, request)
        req = await parse_body(request, ChatCompletionRequest, s.config.max_body_bytes)
        upstream = await open_generation(s, await worker_payload(s.config, req))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(stream_sse(upstream, req, rid, created), media_type="text/event-stream")
        return JSONResponse(await complete(upstream, req, rid, created))

    @app.get("/health")
    async def health(request: Request):
        return {"status": "ok", "controller": st(request).config.controller_address}

    return app


def build_parser() -> argparse.ArgumentParser:
    return server_parser("OpenAI-compatible API over the LLaVA controller", 8000, OpenAIConfig)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(OpenAIConfig, args)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
