"""A model worker backed by an OpenAI-compatible engine server: vLLM, SGLang, llama.cpp's server, Ollama, or our
own `serve.openai_api_server`. The controller, the web UI and LLaVA's clients then reach GPU engines the way they
reach our own workers.

Run: `python -m serve.model_worker --backend openai --upstream http://GPU-HOST:8000 --upstream-model NAME
[--model-name NAME] [--upstream-api-key KEY] [--template NAME] [--controller-address URL] [--worker-address URL]`.

- /worker_generate_stream (LLaVA's templated prompt + base64 images): the prompt is turned back into messages
  (`llava.templates.parse_prompt`: the layout of `--template`, else detected from its markers), each `<image>`
  becomes an `image_url` part (a data URI) where it stood, and the upstream renders with the model's own template.
  /worker_generate_messages sends the messages as they are. Sampling: temperature (<= 0.001 = greedy, as LLaVA),
  top_p, max_new_tokens -> max_tokens, stop, seed; top_k / repetition_penalty only when a request sets them (vLLM
  and SGLang accept them); logprobs -> logprobs/top_logprobs; structured -> response_format (json) or vLLM's
  `structured_outputs` (regex, choice, grammar).
- The reply streams back in LLaVA's framing with the upstream's usage; a client that leaves closes the upstream
  stream (engines cancel the generation then). Upstream errors keep the upstream's own message and map its HTTP
  status onto our codes (400 invalid, 401 unauthorized, 404 unknown model, 413 too large, 429/503 overloaded).
- Health and load come from the upstream: the worker registers only while the upstream answers (GET /health or
  /v1/models), stops heartbeating when it does not (the controller drops it, requests go elsewhere) and registers
  again when it is back; `queue_length` is the upstream's running + waiting requests where its Prometheus metrics
  say so (vLLM, SGLang), else the requests in flight through this worker.
- Images by id (`llava-image://`) are a feature of our own workers and are refused here with a 400.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from llava.templates import IMAGE_PLACEHOLDER, TemplateError, parse_prompt
from serve.common import (
    STREAM_MEDIA_TYPE, auth_headers, decode_image_payload, encode_chunk, error_response, parse_body,
    require_token_middleware,
)
from serve.heartbeat import heart_beat_loop
from serve.protocol import (
    IMAGE_REF_SCHEME, ErrorCode, GenerateMessagesRequest, GenerateStreamRequest, SamplingFields, ServeError,
)

logger = logging.getLogger("serve.upstream")

# Prometheus gauges of requests an engine holds (running + waiting), by engine
QUEUE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "sglang:num_running_reqs",
                "sglang:num_queue_reqs")
STATUS_CODES = {400: ErrorCode.INVALID_PARAMS, 401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.UNAUTHORIZED,
                404: ErrorCode.UNKNOWN_MODEL, 413: ErrorCode.BODY_TOO_LARGE, 422: ErrorCode.INVALID_PARAMS,
                429: ErrorCode.OVERLOADED, 503: ErrorCode.OVERLOADED, 507: ErrorCode.OUT_OF_MEMORY}
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+([0-9.eE+-]+)")


def image_mime(data: bytes) -> str:
    for magic, mime in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp")):
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def data_uri(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"


def openai_messages(messages: list[dict], images: list[bytes]) -> list[dict]:
    """Messages whose `<image>` markers are replaced, in order, by `image_url` parts (text parts around them)."""
    out, it = [], iter(images)
    for m in messages:
        pieces = m["content"].split(IMAGE_PLACEHOLDER)
        if len(pieces) == 1:
            out.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for i, text in enumerate(pieces):
            if i:
                parts.append({"type": "image_url", "image_url": {"url": data_uri(next(it))}})
            if text.strip():
                parts.append({"type": "text", "text": text.strip()})
        out.append({"role": m["role"], "content": parts})
    return out


def sampling_body(f: SamplingFields) -> dict:
    body: dict = {
        "temperature": f.sampling_temperature(), "top_p": f.top_p,
        "max_tokens": f.max_new_tokens,
    }
    stops = [f.stop] if isinstance(f.stop, str) else list(f.stop or [])
    if stops := [s for s in stops if s]:
        body["stop"] = stops
    if f.seed is not None:
        body["seed"] = f.seed
    if f.top_k:
        body["top_k"] = f.top_k
    if f.repetition_penalty != 1.0:
        body["repetition_penalty"] = f.repetition_penalty
    if f.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = f.logprobs
    if f.structured is not None:
        kind, value = f.structured.type, f.structured.value
        if kind == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif kind == "json_schema":
            schema = json.loads(value) if isinstance(value, str) else value
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        else:
            body["structured_outputs"] = {kind: value}
    return body


def upstream_error(status: int, body: bytes, where: str) -> ServeError:
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else {}
        message = err.get("message") if isinstance(err, dict) else str(err)
        message = message or data.get("detail") or body.decode(errors="replace")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")[:500]
    return ServeError(STATUS_CODES.get(status, ErrorCode.GENERATION_FAILED), f"upstream {where}: {message}")


@dataclass
class Upstream:
    """The engine server: chat completions, health and load, through one pooled client."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 600.0
    client: httpx.AsyncClient = field(init=False)
    context_length: int | None = None

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1")
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=self.timeout, write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            headers=auth_headers(self.api_key))

    async def probe(self) -> bool:
        """Whether the upstream answers and serves `model` (GET /v1/models); notes its context length."""
        try:
            r = await self.client.get(self.url + "/v1/models", timeout=5.0)
        except httpx.HTTPError as e:
            logger.warning("upstream %s not reachable: %s", self.url, e)
            return False
        if r.status_code != 200:
            logger.warning("upstream %s: GET /v1/models answered %d: %s", self.url, r.status_code, r.text[:300])
            return False
        models = {m.get("id"): m for m in r.json().get("data", []) if isinstance(m, dict)}
        if self.model not in models:
            logger.warning("upstream %s does not serve %r; it serves %s", self.url, self.model, sorted(models))
            return False
        length = models[self.model].get("max_model_len") or models[self.model].get("context_length")
        self.context_length = int(length) if isinstance(length, (int, float)) else None
        return True

    async def load(self) -> int | None:
        """Requests the upstream holds (running + waiting) from its Prometheus metrics, if it exports them."""
        try:
            r = await self.client.get(self.url + "/metrics", timeout=2.0)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        total, found = 0.0, False
        for line in r.text.splitlines():
            m = _METRIC_LINE.match(line)
            if m and m.group(1) in QUEUE_GAUGES:
                total += float(m.group(2))
                found = True
        return int(total) if found else None

    async def open(self, body: dict) -> httpx.Response:
        """POST a streaming chat completion; the open response, or the upstream's error as a ServeError."""
        request = self.client.build_request("POST", self.url + "/v1/chat/completions", json=body)
        try:
            r = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise ServeError(ErrorCode.WORKER_UNREACHABLE,
                             f"upstream {self.url} not reachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            content = await r.aread()
            await r.aclose()
            raise upstream_error(r.status_code, content, self.url)
        return r

    async def aclose(self) -> None:
        await self.client.aclose()


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON events of a server-sent-events stream, until `[DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError:
            raise ServeError(ErrorCode.GENERATION_FAILED, f"upstream sent an event that is not JSON: {data[:200]}") from None


@dataclass
class UpstreamWorker:
    """What the worker app needs from its backend: names, status, and generation as framed chunks."""

    upstream: Upstream
    names: list[str]
    template: str | None = None
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_images: int = 8
    in_flight: int = 0
    healthy: bool = False
    upstream_load: int | None = None

    def queue_length(self) -> int:
        return max(self.in_flight, self.upstream_load or 0)

    def status(self) -> dict:
        return {"model_names": self.names, "speed": 1, "queue_length": self.queue_length(),
                "context_length": self.upstream.context_length, "template": self.template,
                "backend": f"openai upstream {self.upstream.url} ({self.upstream.model})"}

    async def refresh(self) -> bool:
        self.healthy = await self.upstream.probe()
        self.upstream_load = await self.upstream.load() if self.healthy else None
        return self.healthy

    def chat_body(self, req: SamplingFields, messages: list[dict], images: list[bytes]) -> dict:
        return {"model": self.upstream.model, "messages": openai_messages(messages, images), "stream": True,
                "stream_options": {"include_usage": True}, **sampling_body(req)}

    def prepare(self, req: GenerateStreamRequest | GenerateMessagesRequest) -> tuple[dict, str]:
        """The upstream body and the echo prefix (LLaVA's stream repeats the prompt in `text`)."""
        if req.model is not None and req.model not in self.names:
            raise ServeError(ErrorCode.UNKNOWN_MODEL, f"this worker serves {self.names}, not {req.model!r}")
        if len(req.images) > self.max_images:
            raise ServeError(ErrorCode.TOO_MANY_IMAGES,
                             f"{len(req.images)} images in one request; this worker allows at most {self.max_images}")
        images = []
        for i, payload in enumerate(req.images):
            if payload.startswith(IMAGE_REF_SCHEME):
                raise ServeError(ErrorCode.INVALID_PARAMS, f"image {i}: images by id ({IMAGE_REF_SCHEME}...) are "
                                 "served by llava workers only; this worker forwards to an OpenAI-compatible engine")
            images.append(decode_image_payload(payload, i, self.max_image_bytes))
        if isinstance(req, GenerateStreamRequest):
            try:
                messages = parse_prompt(req.prompt, self.template)
            except TemplateError as e:
                raise ServeError(ErrorCode.INVALID_PARAMS, f"cannot read the prompt: {e}") from None
            echo = req.prompt
        else:
            messages, echo = [m.model_dump() for m in req.messages], ""
        markers = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if markers != len(images):
            raise ServeError(ErrorCode.IMAGE_COUNT_MISMATCH,
                             f"the prompt has {markers} {IMAGE_PLACEHOLDER} marker(s) but {len(images)} image(s) were sent")
        if not messages or messages[-1]["role"] != "user":
            raise ServeError(ErrorCode.INVALID_PARAMS, "the prompt must end with a user turn")
        return self.chat_body(req, messages, images), echo

    async def relay(self, response: httpx.Response, echo: str) -> AsyncIterator[bytes]:
        """The upstream's events as LLaVA chunks; closing this generator closes the upstream stream."""
        text, finish, usage = "", None, None
        self.in_flight += 1
        try:
            async for event in sse_events(response):
                if "error" in event:
                    err = event["error"]
                    message = err.get("message") if isinstance(err, dict) else str(err)
                    yield encode_chunk(ServeError(ErrorCode.GENERATION_FAILED, f"upstream: {message}").to_chunk())
                    return
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
                    chunk = {"text": echo + text + delta, "delta": delta, "error_code": 0, "finish_reason": None}
                    lp = (choice.get("logprobs") or {}).get("content")
                    if lp:
                        chunk["logprobs"] = lp
                    text += delta
                    if delta or lp:
                        yield encode_chunk(chunk)
            u = usage or {}
            prompt_tokens = int(u.get("prompt_tokens") or 0)
            completion = int(u.get("completion_tokens") or 0)
            details = u.get("prompt_tokens_details") or {}
            yield encode_chunk({
                "text": echo + text, "delta": "", "error_code": 0,
                "finish_reason": "length" if finish == "length" else "stop",
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion,
                          "image_tokens": int(details.get("image_tokens") or 0), "image_ids": []},
            })
        except ServeError as e:
            yield encode_chunk(e.to_chunk())
        except httpx.HTTPError as e:
            err = ServeError(ErrorCode.WORKER_UNREACHABLE, f"upstream {self.upstream.url} failed mid-stream: "
                             f"{type(e).__name__}: {e}")
            yield encode_chunk(err.to_chunk())
        finally:
            self.in_flight -= 1
            await response.aclose()


def create_upstream_app(config, backend: UpstreamWorker) -> FastAPI:
    """The worker app for `--backend openai` (config: serve.model_worker.WorkerConfig)."""
    @dataclass
    class State:  # what heart_beat_loop reads
        config: object
        client: httpx.AsyncClient
        worker: UpstreamWorker

        @property
        def in_flight(self) -> int:
            return self.worker.queue_length()

        def status(self) -> dict:
            return self.worker.status()

        async def ready(self) -> bool:
            return await self.worker.refresh()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        client = httpx.AsyncClient(timeout=10.0, headers=auth_headers(config.auth_token))
        state = State(config, client, backend)
        await backend.refresh()
        tasks = [asyncio.create_task(heart_beat_loop(state))] if config.register else []
        app.state.worker = state
        logger.info("worker for upstream %s (%s) ready as %s at %s", backend.upstream.url, backend.upstream.model,
                    backend.names, config.worker_address)
        yield
        for t in tasks:
            t.cancel()
        await client.aclose()
        await backend.upstream.aclose()

    app = FastAPI(title="llava model worker (OpenAI-compatible upstream)", lifespan=lifespan)

    require_token_middleware(app, config.auth_token)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(exc, framed=False)

    async def generate(request: Request, model) -> Response:
        try:
            req = await parse_body(request, model, backend.max_body_bytes)
            body, echo = backend.prepare(req)
            response = await backend.upstream.open(body)
        except ServeError as e:
            return error_response(e, framed=True)
        return StreamingResponse(backend.relay(response, echo), media_type=STREAM_MEDIA_TYPE)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        return await generate(request, GenerateStreamRequest)

    @app.post("/worker_generate_messages")
    async def worker_generate_messages(request: Request):
        return await generate(request, GenerateMessagesRequest)

    @app.post("/worker_get_status")
    async def worker_get_status(request: Request):
        return backend.status()

    @app.post("/model_details")
    async def model_details(request: Request):
        return {"model_names": backend.names, "context_length": backend.upstream.context_length,
                "template": backend.template}

    @app.get("/health")
    async def health(request: Request):
        ok = await backend.refresh()
        body = {"status": "ok" if ok else "upstream unavailable", "model_names": backend.names,
                "queue_length": backend.queue_length(), "upstream": backend.upstream.url}
        return Response(json.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    return app
