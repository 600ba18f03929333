"""An OpenAI-compatible HTTP API in front of the controller (the `openai` Python SDK works unmodified).

Run: `python -m serve.openai_api_server [--host 127.0.0.1] [--port 8000] [--controller-address
http://127.0.0.1:21001] [--api-keys KEY1,KEY2] [--allow-image-urls --image-url-max-bytes N --image-url-timeout S]`.

- GET /v1/models: the models the controller's workers serve; a LoRA adapter names its base as `parent` (as vLLM).
- POST /v1/load_lora_adapter {lora_name, lora_path, base_model?} and /v1/unload_lora_adapter {lora_name} (vLLM's
  run-time adapter endpoints): only with --api-keys (the caller's key) and the cluster token (--auth-token /
  $LLAVA_AUTH_TOKEN, passed on to the controller); the adapter is then a `model` like any other.
- POST /v1/chat/completions: messages whose content is a string or parts {"type": "text"} / {"type": "image_url",
  "image_url": {"url": "data:image/...;base64,..."}}; http(s) image URLs only with --allow-image-urls (then fetched
  here with a byte cap and a deadline). Each image part becomes one `<image>` marker where it stands (parts joined
  with newlines) and the worker renders the conversation with the model's own template. `stream: true` answers with
  server-sent events (`chat.completion.chunk`, then `data: [DONE]`); `stream_options.include_usage` adds a usage
  chunk. `usage.prompt_tokens` counts image tokens too; `usage.prompt_tokens_details.image_tokens` says how many.
  `logprobs` / `top_logprobs` (<= 20; log-softmax of the model's logits), `n` (<= 16 choices, decoded in one
  batch; a seeded request's choice i uses seed + i), `max_completion_tokens`, `stop` lists. Structured output:
  `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}, and vLLM's
  `structured_outputs` {json | regex | choice | grammar | json_object} and `guided_json` / `guided_regex` /
  `guided_choice` / `guided_grammar` (one constraint per request; the reply always matches unless cut by
  max_tokens). Images sent again by id: `usage.prompt_tokens_details.image_ids` lists each image's id; a later
  image part may be {"type": "image_url", "image_url": {"url": "llava-image://<id>"}} (or vLLM's {"type":
  "image_url", "uuid": "<id>"}), served from the worker's feature cache (404 `unknown_image` once evicted).
  Video: {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}} (mp4 / webm / mkv / mov / avi;
  http(s) only with --allow-image-urls, capped by --video-url-max-bytes), one `<video>` marker where it stands; the
  worker decodes it (PyAV) and samples `max_frames` frames uniformly (default: the model's); broken, empty, oversized,
  over-long or non-video files are a 400 `bad_video` naming the cause. `usage.prompt_tokens_details.image_tokens`
  counts the frames' tokens too.
  Extensions: top_k, repetition_penalty, image_mode, max_frames.
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
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llava.config import MAX_TOP_LOGPROBS
from llava.image_data import MAX_IMAGE_BYTES
from llava.templates import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from llava.video import MAX_VIDEO_BYTES
from serve.common import (
    AUTH_TOKEN_HELP, DEFAULT_MAX_BODY_BYTES, FRAME_DELIMITER, aiter_chunks, auth_headers, bearer, fetch_image_url,
    iter_chunks, parse_body, resolve_token, run_server, server_parser, setup_logging,
)
from serve.protocol import DEFAULT_CONTROLLER_URL, IMAGE_REF_SCHEME, ErrorCode, ServeError, image_ref

logger = setup_logging("serve.openai_api_server")

IMAGE_MARKER = IMAGE_PLACEHOLDER  # the marker the worker's renderer expands


# ----------------------------------------------------------------------------------------------- schemas


MAX_CHOICES = 16  # `n`: choices per request (each is one request in the worker's batch)


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    uuid: str | None = None  # with no image_url: the id of an image sent before (usage.image_ids)
    image_url: ImageURL | None = None
    video_url: ImageURL | None = None

    @field_validator("image_url", "video_url", mode="before")
    @classmethod
    def _bare_url(cls, value):
        return {"url": value} if isinstance(value, str) else value  # Ollama's clients send the URL as a string


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # always strict here: the output is decoded under the schema


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (one of them)."""

    model_config = ConfigDict(populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


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
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices generated together (seed + i for choice i when seeded)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    image_mode: Literal["pad", "resize", "crop", "anyres", "default"] | None = None
    max_frames: int | None = Field(None, ge=1)  # frames sampled from each video (default: the model's)


class AdapterRequest(BaseModel):
    """vLLM's run-time LoRA requests (its other fields, e.g. lora_int_id, are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    lora_name: str
    lora_path: str | None = None
    base_model: str | None = None


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
    video_url_max_bytes: int = MAX_VIDEO_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_max_tokens: int = 256
    auth_token: str | None = field(default=None, metadata={"help": AUTH_TOKEN_HELP})

    def __post_init__(self) -> None:
        self.auth_token = resolve_token(self.auth_token)


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
    key = bearer(request)
    # compare against every key in constant time, so timing does not reveal how much of a key matched
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
        raise ServeError(ErrorCode.UNAUTHORIZED, "missing or invalid API key (send Authorization: Bearer <key>)")


# ----------------------------------------------------------------------------------------------- conversion


async def image_payload(config: OpenAIConfig, url: str, index: int) -> str:
    """What the worker receives for an image_url: data URIs and image ids as they are; http(s) fetched here (if
    enabled)."""
    if url.startswith("data:"):
        return url
    if image_ref(url):  # a malformed id raises a 400 naming it
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
    raise ServeError(ErrorCode.BAD_IMAGE, f"image {index}: image_url must be a data: URI, an http(s) URL or "
                                          f"{IMAGE_REF_SCHEME}<id> (an id from a previous reply's usage)")


async def video_payload(config: OpenAIConfig, url: str, index: int) -> str:
    """What the worker receives for a video_url: a data: URI as it is; http(s) fetched here (if enabled)."""
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        if not config.allow_image_urls:
            raise ServeError(ErrorCode.BAD_VIDEO, f"video {index}: http(s) URLs are disabled on this server; send a "
                                                  f"data: URI (or start the server with --allow-image-urls)")
        try:
            data = await asyncio.to_thread(fetch_image_url, url, max_bytes=config.video_url_max_bytes,
                                           timeout=config.image_url_timeout)
        except ServeError as e:
            raise ServeError(ErrorCode.BAD_VIDEO, f"video {index}: {e.message}") from None
        return base64.b64encode(data).decode()
    raise ServeError(ErrorCode.BAD_VIDEO, f"video {index}: video_url must be a data: URI or an http(s) URL")


async def to_worker_messages(config: OpenAIConfig, messages: list[Message]) -> tuple[list[dict], list[str]]:
    """Worker messages (content strings with `<image>` markers) and the images, in marker order."""
    out, images, _ = await to_worker_media(config, messages)
    return out, images


async def to_worker_media(config: OpenAIConfig, messages: list[Message]) -> tuple[list[dict], list[str], list[str]]:
    """Worker messages (content strings with `<image>` / `<video>` markers), the images and the videos, each in
    marker order."""
    out: list[dict] = []
    images: list[str] = []
    videos: list[str] = []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None or isinstance(msg.content, str):
            out.append({"role": role, "content": msg.content or ""})
            continue
        pieces = []
        for part in msg.content:
            if part.type == "text":
                pieces.append(part.text or "")
            elif part.type == "video_url":
                if part.video_url is None:
                    raise ServeError(ErrorCode.INVALID_PARAMS,
                                     f"invalid request: messages.{i}: video_url part without video_url")
                videos.append(await video_payload(config, part.video_url.url, len(videos)))
                pieces.append(VIDEO_PLACEHOLDER)
            elif part.image_url is None and part.uuid:  # vLLM's way to refer to an image sent before
                images.append(await image_payload(config, IMAGE_REF_SCHEME + part.uuid, len(images)))
                pieces.append(IMAGE_MARKER)
            elif part.image_url is None:
                raise ServeError(
                    ErrorCode.INVALID_PARAMS, f"invalid request: messages.{i}: image_url part without image_url"
                )
            else:
                images.append(await image_payload(config, part.image_url.url, len(images)))
                pieces.append(IMAGE_MARKER)
        out.append({"role": role, "content": "\n".join(pieces)})
    return out, images, videos


def structured_of(req: ChatCompletionRequest) -> dict | None:
    """The worker's `structured` field from OpenAI's response_format or vLLM's structured_outputs / guided_*."""
    given: list[tuple[str, dict]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", {"type": "json_object"}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or not rf.json_schema.schema_:
            raise ServeError(ErrorCode.INVALID_PARAMS,
                             "invalid request: response_format.json_schema.schema: a JSON schema is required")
        given.append(("response_format", {"type": "json_schema", "value": rf.json_schema.schema_}))
    so = req.structured_outputs
    options = [] if so is None else [("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                     ("grammar", so.grammar), ("json_object", True if so.json_object else None)]
    options += [("json_schema", req.guided_json), ("regex", req.guided_regex), ("choice", req.guided_choice),
                ("grammar", req.guided_grammar)]
    for kind, value in options:
        if value is not None:
            given.append((kind, {"type": kind, "value": None if kind == "json_object" else value}))
    if len(given) > 1:
        raise ServeError(ErrorCode.INVALID_PARAMS, "invalid request: give one output constraint, not several "
                                                   "(response_format, structured_outputs, guided_*)")
    return given[0][1] if given else None


async def worker_payload(config: OpenAIConfig, req: ChatCompletionRequest) -> dict:
    if req.top_logprobs is not None and not req.logprobs:
        raise ServeError(ErrorCode.INVALID_PARAMS, "invalid request: top_logprobs: needs logprobs set to true")
    messages, images, videos = await to_worker_media(config, req.messages)
    given = [t for t in (req.max_completion_tokens, req.max_tokens) if t is not None]
    max_tokens = given[0] if given else config.default_max_tokens  # 0 or less is refused by the worker
    return {
        "model": req.model, "messages": messages, "images": images, "videos": videos, "max_frames": req.max_frames,
        "temperature": req.temperature,
        "top_p": req.top_p, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
        "max_new_tokens": max_tokens, "stop": req.stop, "seed": req.seed, "image_mode": req.image_mode,
        "logprobs": (req.top_logprobs or 0) if req.logprobs else None, "structured": structured_of(req),
    }


def choice_payloads(payload: dict, n: int) -> list[dict]:
    """One worker request per choice; a seeded request's choice i samples with seed + i (all differ, all repeat)."""
    seed = payload.get("seed")
    return [payload if i == 0 or seed is None else {**payload, "seed": seed + i} for i in range(n)]


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


async def open_generations(state: OpenAIState, payloads: list[dict]) -> list[httpx.Response]:
    """One upstream stream per choice, opened together; if any is refused, the others are closed and its error
    raised."""
    results = await asyncio.gather(*(open_generation(state, p) for p in payloads), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for r in results:
            if isinstance(r, httpx.Response):
                await r.aclose()
        raise failed[0]
    return list(results)


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
        "prompt_tokens_details": {"image_tokens": usage.get("image_tokens", 0), "cached_tokens": 0,
                                  "image_ids": usage.get("image_ids", []),
                                  **({"media": usage["media"]} if usage.get("media") else {})},
    }


def total_usage(usages: list[dict | None]) -> dict | None:
    """One prompt (counted once, as OpenAI does for n choices) and every choice's completion tokens."""
    if not usages or any(u is None for u in usages):
        return None
    completion = sum(u["completion_tokens"] for u in usages)
    return {**usages[0], "completion_tokens": completion, "total_tokens": usages[0]["prompt_tokens"] + completion}


def choice_logprobs(req: ChatCompletionRequest, entries: list | None) -> dict | None:
    return {"content": entries or [], "refusal": None} if req.logprobs else None


async def complete(upstreams: list[httpx.Response], req: ChatCompletionRequest, rid: str, created: int) -> dict:
    async def one(index: int, upstream: httpx.Response) -> tuple[dict, dict | None]:
        text, finish, usage, entries = "", None, None, []
        async for chunk in upstream_chunks(upstream):
            text += chunk.get("delta", "")
            entries += chunk.get("logprobs") or []
            if chunk.get("finish_reason"):
                finish, usage = chunk["finish_reason"], chunk.get("usage")
        choice = {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": choice_logprobs(req, entries)}
        return choice, usage

    done = await gather_all(one(i, u) for i, u in enumerate(upstreams))
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": req.model,
        "choices": [c for c, _ in done], "usage": usage_dict(total_usage([u for _, u in done])),
    }


async def gather_all(aws) -> list:
    """asyncio.gather that cancels the others when one fails (their upstreams close in `upstream_chunks`)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def merged_chunks(upstreams: list[httpx.Response]) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, chunk) from every upstream as they arrive; an error in one stops all."""
    if len(upstreams) == 1:
        async for c in upstream_chunks(upstreams[0]):
            yield 0, c
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, upstream: httpx.Response) -> None:
        try:
            async for c in upstream_chunks(upstream):
                await queue.put((i, c))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which re-raises it)
            await queue.put((i, e))
        else:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, u)) for i, u in enumerate(upstreams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def stream_sse(
    upstreams: list[httpx.Response], req: ChatCompletionRequest, rid: str, created: int
) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    want_usage = bool(req.stream_options and req.stream_options.include_usage)
    usages: list[dict | None] = [None] * len(upstreams)

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> bytes:
        lp = choice_logprobs(req, logprobs) if logprobs else None
        return sse({**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}]})

    for i in range(len(upstreams)):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for i, c in merged_chunks(upstreams):
            if c.get("delta") or c.get("logprobs"):
                yield chunk(i, {"content": c.get("delta", "")}, logprobs=c.get("logprobs"))
            if c.get("finish_reason"):
                usages[i] = c.get("usage")
                yield chunk(i, {}, c["finish_reason"])
        if want_usage:
            yield sse({**base, "choices": [], "usage": usage_dict(total_usage(usages))})
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
        adapters = r.json().get("adapters") or {}
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "llava", "root": m, "parent": adapters.get(m)}
            for m in r.json()["models"]
        ]}

    async def adapter_admin(request: Request, endpoint: str, keys: tuple[str, ...]) -> Response:
        s = st(request)
        if not s.config.api_keys:
            raise ServeError(ErrorCode.UNAUTHORIZED, "loading and unloading adapters at run time needs the server "
                             "started with --api-keys (and --auth-token, the cluster's token)")
        check_api_key(s.config, request)
        body = (await parse_body(request, AdapterRequest, s.config.max_body_bytes)).model_dump()
        if endpoint == "/load_lora_adapter" and not body.get("lora_path"):
            raise ServeError(ErrorCode.INVALID_PARAMS, "invalid request: lora_path: the adapter's folder is required")
        payload = {k: body.get(k) for k in keys if body.get(k) is not None}
        try:
            r = await s.client.post(s.config.controller_address + endpoint, json=payload, timeout=600.0,
                                    headers=auth_headers(s.config.auth_token))
        except httpx.HTTPError as e:
            raise unreachable(s.config, e) from None
        if r.status_code != 200:
            raise error_from_body(r.content, r.status_code)
        done = "added" if endpoint == "/load_lora_adapter" else "removed"
        return PlainTextResponse(f"Success: LoRA adapter '{payload.get('lora_name')}' {done} successfully.")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await adapter_admin(request, "/load_lora_adapter", ("lora_name", "lora_path", "base_model"))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await adapter_admin(request, "/unload_lora_adapter", ("lora_name",))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        s = st(request)
        check_api_key(s.config, request)
        req = await parse_body(request, ChatCompletionRequest, s.config.max_body_bytes)
        payloads = choice_payloads(await worker_payload(s.config, req), req.n)
        upstreams = await open_generations(s, payloads)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(stream_sse(upstreams, req, rid, created), media_type="text/event-stream")
        return JSONResponse(await complete(upstreams, req, rid, created))

    @app.get("/health")
    async def health(request: Request):
        return {"status": "ok", "controller": st(request).config.controller_address}

    return app


def build_parser() -> argparse.ArgumentParser:
    return server_parser("OpenAI-compatible API over the LLaVA controller", 8000, OpenAIConfig)


def main(argv: list[str] | None = None) -> None:
    run_server(build_parser(), OpenAIConfig, create_app, argv)


if __name__ == "__main__":
    main()
