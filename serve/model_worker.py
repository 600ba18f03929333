"""A model worker: one loaded model + the continuous-batching engine behind the LLaVA worker HTTP protocol.

Run: `python -m serve.model_worker --model-path PATH [--model-base BASE] [--model-name NAME] [--template NAME]
[--dtype auto] [--quantization auto|none|int8|int4|8bit|4bit] [--load-8bit|--load-4bit] [--device cpu]
[--host 127.0.0.1] [--port 21002] [--worker-address URL]
[--controller-address http://127.0.0.1:21001] [--no-register] [--limit-model-concurrency 16]
[--lora-modules NAME=PATH ...] [--auth-token SECRET]`.
PATH is anything `llava.loading.load_model` takes: `default`, an HF llava folder or hub id, an original-format
checkpoint, a projector-only or LoRA folder (with --model-base).

Endpoints:
- POST /worker_generate_stream (LLaVA): {model, prompt, images: [base64], temperature, top_p, max_new_tokens, stop,
  + optional top_k, repetition_penalty, seed, image_mode}. `prompt` is already templated, with one `<image>` per
  image; it is tokenised as is (the template's BOS is prepended when the prompt lacks it) and each `<image>` is
  expanded to that image's token count. Streams NUL-delimited JSON chunks {"text": prompt + generated so far,
  "delta", "error_code": 0, "finish_reason"}; the last chunk has finish_reason and usage.
  temperature <= 0.001 means greedy, as in LLaVA.
- POST /worker_generate_messages (new): {model, messages: [{role, content}], images: [base64], sampling fields}.
  Rendered with the model's own template (`LoadedModel.render`); chunks carry `text` = generated text only.
- POST /worker_get_status -> {model_names, speed, queue_length, context_length, template, adapters}; POST
  /model_details; GET /health; GET /metrics (Prometheus).
- LoRA adapters (`--lora-modules name=path ...`, vLLM's syntax, or JSON {"name", "path"}): each is one more model
  name of this worker, chosen by the request's `model`; requests of every adapter and of the base share the running
  batch (`llava.adapters`). POST /load_lora_adapter {lora_name, lora_path} and /unload_lora_adapter {lora_name}
  change them at run time; they need the cluster token (`--auth-token` / $LLAVA_AUTH_TOKEN) and re-register the
  worker's model list with the controller at once.
- With a cluster token every endpoint but /health refuses requests without it (the controller sends it).
Errors use `serve.protocol.ErrorCode`: found before generation -> HTTP 4xx/5xx with one framed error chunk; during
generation -> a final chunk with error_code != 0. `queue_length` counts requests accepted and not yet finished.

The worker registers with the controller in the background and keeps a heartbeat every --heart-beat-interval
seconds; when the controller answers that it does not know the worker (it restarted), the worker registers again at
once. A controller that is down is retried, so start order does not matter.

The HTTP-free part (`ServingModel`: prepare + submit) is `serve.serving`, which `serve.cli` uses in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llava.config import EngineConfig, LoadOptions
from llava.engine import RequestHandle
from llava.hardware import single_openmp_thread
from llava.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from pydantic import BaseModel

from serve.common import (
    AUTH_TOKEN_HELP, DEFAULT_MAX_BODY_BYTES, KEEP_ALIVE_SECONDS, STREAM_MEDIA_TYPE, add_config_args, add_engine_args,
    add_precision_args, auth_headers, config_from_args, decode_image_payload, encode_chunk,
    engine_config_from_args, error_response, parse_body, parse_lora_module, resolve_token, server_parser,
    require_token_middleware, setup_logging,
)
from serve.protocol import (
    DEFAULT_CONTROLLER_URL, ErrorCode, GenerateMessagesRequest, GenerateStreamRequest, ServeError, Usage, image_ref,
)
from serve.heartbeat import heart_beat_loop, register
from serve.serving import ImageLimits, Prepared, ServingModel, is_out_of_memory

logger = setup_logging("serve.model_worker")

# ----------------------------------------------------------------------------------------------- HTTP layer


@dataclass
class WorkerConfig:
    """The worker's settings; its command line is generated from these fields (`build_parser`)."""

    model_path: str | None = field(default=None, metadata={
        "help": "default | HF folder/hub id | original | projector/LoRA folder (required with --backend local)"})
    model_name: str | None = field(default=None, metadata={"help": "name clients ask for (default: the folder name)"})
    load: LoadOptions = field(default_factory=lambda: LoadOptions(quantization="auto"), metadata={"cli": False})
    worker_address: str | None = field(default=None, metadata={
        "help": "URL the controller uses to reach this worker (default http://HOST:PORT)"})
    controller_address: str = field(default=DEFAULT_CONTROLLER_URL, metadata={"parse": lambda v: v.rstrip("/")})
    register: bool = field(default=True, metadata={"help": "register with a controller (--no-register: do not)"})
    heart_beat_interval: float = 15.0
    max_batch_size: int = field(default=16, metadata={
        "flag": "--limit-model-concurrency",
        "help": "requests generated together (the engine's batch size); more wait in the queue"})
    max_queue: int = field(default=256, metadata={"help": "requests waiting beyond the batch before 503s"})
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    limits: ImageLimits = field(default_factory=ImageLimits, metadata={"cli": False})  # its own flags
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"cli": False})  # add_engine_args
    warm_up: bool = field(default=True, metadata={"help": "run one request before registering"})
    lora_modules: list[tuple[str, str]] = field(default_factory=list, metadata={"cli": False})  # (name, path)
    auth_token: str | None = field(default=None, metadata={"help": AUTH_TOKEN_HELP})
    backend: str = field(default="local", metadata={
        "choices": ("local", "openai"),
        "help": "local: load --model-path here; openai: forward to an OpenAI-compatible engine server (--upstream)"})
    upstream: str | None = field(default=None, metadata={
        "help": "with --backend openai: the engine server's base URL (vLLM, SGLang, llama.cpp server, Ollama, ...)"})
    upstream_model: str | None = field(default=None, metadata={"help": "with --backend openai: its model name"})
    upstream_api_key: str | None = field(default=None, metadata={
        "help": "with --backend openai: the engine server's API key (default: $LLAVA_UPSTREAM_API_KEY)"})

    def __post_init__(self) -> None:
        self.auth_token = resolve_token(self.auth_token)
        if self.backend == "openai":
            if not self.upstream or not self.upstream_model:
                raise ValueError("--backend openai needs --upstream URL and --upstream-model NAME")
            self.upstream_api_key = self.upstream_api_key or os.environ.get("LLAVA_UPSTREAM_API_KEY") or None
        elif not self.model_path:
            raise ValueError("--model-path is required (or --backend openai --upstream URL --upstream-model NAME)")


class LoadAdapterBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapterBody(BaseModel):
    lora_name: str


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llava_worker_requests", "generate requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("llava_worker_prompt_tokens", "prompt tokens (incl. image tokens)", registry=r)
        self.image_tokens = Counter("llava_worker_image_tokens", "image tokens in prompts", registry=r)
        self.completion_tokens = Counter("llava_worker_completion_tokens", "generated tokens", registry=r)
        self.queue_length = Gauge("llava_worker_queue_length", "requests accepted and not finished", registry=r)
        self.engine_queued = Gauge("llava_worker_engine_queued", "requests waiting for a batch slot", registry=r)
        self.ttft = Histogram("llava_worker_time_to_first_token_seconds", "time to first token", registry=r)
        self.cpu_threads = Gauge("llava_worker_cpu_threads", "torch CPU threads of the engine's last step "
                                 "(--num-threads auto: its current choice; 0 on a GPU or before the first step)",
                                 registry=r)


@dataclass
class WorkerState:
    config: WorkerConfig
    serving: ServingModel
    metrics: WorkerMetrics
    client: httpx.AsyncClient
    active: set[RequestHandle] = field(default_factory=set)
    tasks: list[asyncio.Task] = field(default_factory=list)
    ignored_fields: set[str] = field(default_factory=set)

    def note_unknown(self, names: set[str]) -> None:
        """Unknown request fields are ignored (as LLaVA's worker does); each name is logged once."""
        new = names - self.ignored_fields
        if new:
            self.ignored_fields |= new
            logger.info("ignoring request field(s) this worker does not know: %s", ", ".join(sorted(new)))

    @property
    def in_flight(self) -> int:
        """Requests accepted and not finished. Counted from the handles themselves, so a stream whose client left
        before it started (its generator never ran) cannot leak a count."""
        self.active = {h for h in self.active if not h.done}
        self.metrics.queue_length.set(len(self.active))
        return len(self.active)

    def status(self) -> dict:
        return {
            "model_names": self.serving.names, "speed": 1, "queue_length": self.in_flight,
            "context_length": self.serving.loaded.context_length, "template": self.serving.loaded.template.name,
            "adapters": {name: self.serving.base_names[0] for name in self.serving.adapter_info},
        }


def final_chunk(state: WorkerState, handle: RequestHandle, prepared: Prepared) -> dict:
    result = handle.result(timeout=0)
    usage = Usage(len(prepared.input_ids), result.completion_tokens, prepared.image_tokens,
                  tuple(im.key for im in prepared.images), media=tuple(prepared.media))
    state.metrics.completion_tokens.inc(result.completion_tokens)
    if result.time_to_first_token is not None:
        state.metrics.ttft.observe(result.time_to_first_token)
    return {"finish_reason": result.finish_reason, "usage": usage.to_dict()}


async def stream(
    state: WorkerState, handle: RequestHandle, prepared: Prepared, echo: str, endpoint: str
) -> AsyncIterator[bytes]:
    """Engine events as framed chunks; a client that leaves cancels the request (finally)."""
    text = ""
    outcome = "cancelled"
    pending = []  # log-probabilities of tokens whose text is not sent yet
    want_logprobs = prepared.sampling.logprobs is not None

    def logprobs() -> dict:
        if not want_logprobs:
            return {}
        entries = state.serving.logprob_entries(pending)
        pending.clear()
        return {"logprobs": entries}

    try:
        async for ev in handle:
            text += ev.text
            if ev.logprob is not None:
                pending.append(ev.logprob)
            if not ev.finished:
                if ev.text:
                    yield encode_chunk({"text": echo + text, "delta": ev.text, "error_code": 0, "finish_reason": None,
                                        **logprobs()})
                continue
            if ev.finish_reason in ("stop", "length"):
                outcome = "ok"
                extra = final_chunk(state, handle, prepared)
                yield encode_chunk({"text": echo + text, "delta": ev.text, "error_code": 0, **extra, **logprobs()})
            else:
                message = ev.error or f"generation ended: {ev.finish_reason}"
                code = ErrorCode.OUT_OF_MEMORY if is_out_of_memory(message) else ErrorCode.GENERATION_FAILED
                outcome = code.name.lower()
                yield encode_chunk(ServeError(code, f"generation failed: {message}").to_chunk())
    except Exception as e:  # a bug while streaming: the client gets the cause as an error chunk, not a cut stream
        logger.exception("streaming request %s failed", handle.request_id)
        outcome = "internal"
        yield encode_chunk(ServeError(ErrorCode.INTERNAL, f"streaming failed: {type(e).__name__}: {e}").to_chunk())
    finally:
        if not handle.done:
            handle.cancel()
        state.active.discard(handle)
        state.metrics.requests.labels(endpoint, outcome).inc()


async def generate(state: WorkerState, request: Request, endpoint: str) -> Response:
    try:
        if state.in_flight >= state.config.max_batch_size + state.config.max_queue:
            raise ServeError(ErrorCode.OVERLOADED, f"worker queue is full ({state.in_flight} requests in flight)")
        model = GenerateStreamRequest if endpoint == "/worker_generate_stream" else GenerateMessagesRequest
        req = await parse_body(request, model, state.config.max_body_bytes, on_unknown=state.note_unknown)
        adapter = state.serving.adapter_for(req.model)
        images = [image_ref(p) or decode_image_payload(p, i, state.config.limits.max_bytes)
                  for i, p in enumerate(req.images)]
        if isinstance(req, GenerateStreamRequest):
            prepared = await asyncio.to_thread(state.serving.prepare_prompt, req, images)
            echo = req.prompt
        else:
            messages = [m.model_dump() for m in req.messages]
            prepared = await asyncio.to_thread(state.serving.prepare_messages, messages, images, req)
            echo = ""
        prepared.adapter = adapter
        handle = state.serving.submit(prepared)
    except ServeError as e:
        state.metrics.requests.labels(endpoint, e.code.name.lower()).inc()
        return error_response(e, framed=True)
    except torch.OutOfMemoryError as e:
        state.metrics.requests.labels(endpoint, "out_of_memory").inc()
        err = ServeError(ErrorCode.OUT_OF_MEMORY, f"out of memory while preparing the request: {e}")
        return error_response(err, framed=True)
    except Exception as e:  # a bug: still answer with its real name, framed, and keep serving
        logger.exception("preparing a %s request failed", endpoint)
        state.metrics.requests.labels(endpoint, "internal").inc()
        return error_response(ServeError(ErrorCode.INTERNAL, f"internal error while preparing the request: "
                                                             f"{type(e).__name__}: {e}"), framed=True)
    state.active.add(handle)
    state.metrics.prompt_tokens.inc(len(prepared.input_ids))
    state.metrics.image_tokens.inc(prepared.image_tokens)
    return StreamingResponse(stream(state, handle, prepared, echo, endpoint), media_type=STREAM_MEDIA_TYPE)


def create_app(config: WorkerConfig, serving: ServingModel | None = None) -> FastAPI:
    """The worker app; `serving` may be given (tests, embedding), else it is loaded from `config` at startup."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        model = serving or ServingModel.load(
            config.model_path, config.load, names=[config.model_name] if config.model_name else None,
            max_batch_size=config.max_batch_size, limits=config.limits, engine_config=config.engine,
        )
        for name, path in config.lora_modules:
            model.load_adapter(name, path)
        model.engine.start()
        if serving is None and model.engine.device.type == "cpu":  # our process: the engine's OpenMP team alone
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
                thread_name_prefix="llava-request", initializer=single_openmp_thread))
            single_openmp_thread(release=True)
        if config.warm_up and serving is None:
            logger.info("warm-up request took %.2f s", await asyncio.to_thread(model.warm_up))
        client = httpx.AsyncClient(timeout=10.0, headers=auth_headers(config.auth_token))
        state = WorkerState(config, model, WorkerMetrics(), client)
        if config.register:
            state.tasks.append(asyncio.create_task(heart_beat_loop(state)))
        app.state.worker = state
        logger.info("worker ready: %s at %s", model.names, config.worker_address)
        yield
        for t in state.tasks:
            t.cancel()
        await client.aclose()
        model.engine.shutdown()

    app = FastAPI(title="llava model worker", lifespan=lifespan)

    def st(request: Request) -> WorkerState:
        return request.app.state.worker

    require_token_middleware(app, config.auth_token)

    async def changed_models(s: WorkerState) -> dict:
        if s.config.register:
            try:
                await register(s)
            except (httpx.HTTPError, RuntimeError) as e:  # the heartbeat loop registers again later
                logger.warning("could not register the new model list with the controller: %s", e)
        return s.status()

    def admin(request: Request, what: str) -> WorkerState:
        s = st(request)
        if not s.config.auth_token:
            raise ServeError(ErrorCode.UNAUTHORIZED, f"{what} at run time is off: start the worker with "
                             "--auth-token (or $LLAVA_AUTH_TOKEN) and send that token")
        return s

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        s = admin(request, "loading adapters")
        body = await parse_body(request, LoadAdapterBody)
        info = await asyncio.to_thread(s.serving.load_adapter, body.lora_name, body.lora_path)
        return {"adapter": info, "status": await changed_models(s)}

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        s = admin(request, "unloading adapters")
        s.serving.unload_adapter((await parse_body(request, UnloadAdapterBody)).lora_name)
        return {"status": await changed_models(s)}

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(exc, framed=False)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        return await generate(st(request), request, "/worker_generate_stream")

    @app.post("/worker_generate_messages")
    async def worker_generate_messages(request: Request):
        return await generate(st(request), request, "/worker_generate_messages")

    @app.post("/worker_get_status")
    async def worker_get_status(request: Request):
        return st(request).status()

    @app.post("/model_details")
    async def model_details(request: Request):
        s = st(request)
        loaded = s.serving.loaded
        return {
            "model_names": s.serving.names, "context_length": loaded.context_length,
            "template": loaded.template.name, "image_mode": loaded.image_processing.mode,
        }

    @app.get("/health")
    async def health(request: Request):
        s = st(request)
        return {"status": "ok", "model_names": s.serving.names, "queue_length": s.in_flight}

    @app.get("/metrics")
    async def metrics(request: Request):
        s = st(request)
        s.metrics.engine_queued.set(s.serving.engine.queue_length)
        s.metrics.cpu_threads.set(s.serving.engine.stats().cpu_threads or 0)
        s.metrics.queue_length.set(s.in_flight)
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def build_parser() -> argparse.ArgumentParser:
    p = server_parser("LLaVA model worker", 21002, WorkerConfig)
    p.add_argument("--num-threads", type=parse_threads, default=None,
                   help="torch CPU threads (default: torch's choice), or auto (the same as --cpu-threads auto: the "
                        "CPUs other processes leave free, re-decided as load changes); use 1-2 per worker when "
                        "several share a host")
    add_config_args(p.add_argument_group("loading", "how the checkpoint is loaded (llava.config.LoadOptions)"),
                    LoadOptions)
    add_config_args(p.add_argument_group("images", "limits on each request's images"), ImageLimits)
    p.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=[], metavar="NAME=PATH",
                   help="LoRA adapters served on this base, each as one more model name (PEFT folders or a "
                        "train.train output); vLLM's JSON form {\"name\": ..., \"path\": ...} works too")
    add_precision_args(p)
    add_engine_args(p)
    return p


def parse_threads(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--num-threads must be a positive integer or auto, got {value!r}")
    return n


def worker_config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return config_from_args(
        WorkerConfig, args, worker_address=args.worker_address or f"http://{args.host}:{args.port}",
        load=config_from_args(LoadOptions, args, quantization=args.quantization, dtype=args.dtype),
        limits=config_from_args(ImageLimits, args),
        engine=engine_config_from_args(args, max_batch_size=args.max_batch_size), lora_modules=list(args.lora_modules),
    )


def create_upstream_worker_app(config: WorkerConfig) -> FastAPI:
    from serve.upstream import Upstream, UpstreamWorker, create_upstream_app

    backend = UpstreamWorker(
        Upstream(config.upstream, config.upstream_model, config.upstream_api_key),
        names=[config.model_name or config.upstream_model], template=config.load.template,
        max_body_bytes=config.max_body_bytes, max_image_bytes=config.limits.max_bytes,
        max_images=config.limits.max_images)
    return create_upstream_app(config, backend)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.num_threads == "auto":
        args.engine_cpu_threads = "auto"
    elif args.num_threads:
        torch.set_num_threads(args.num_threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = worker_config_from_args(args)
    app = create_upstream_worker_app(config) if config.backend == "openai" else create_app(config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_SECONDS)


if __name__ == "__main__":
    main()
