"""The controller: a registry of model workers and a dispatcher/proxy in front of them (LLaVA/FastChat protocol).

Run: `python -m serve.controller [--host 127.0.0.1] [--port 21001] [--dispatch-method shortest_queue|lottery]
[--heart-beat-expiration 30] [--allowed-worker-hosts 127.0.0.1,localhost,::1]`.

Endpoints (POST, JSON, as in the original LLaVA unless marked new):
- /register_worker {worker_name, check_heart_beat, worker_status?} -> null. `worker_name` is the worker's base URL;
  it must match the allowlist (http(s), host in `--allowed-worker-hosts`; default loopback only) so the proxy
  cannot be pointed at arbitrary hosts. Without `worker_status` the controller asks the worker's /worker_get_status.
- /receive_heart_beat {worker_name, queue_length} -> {exist}. `exist: false` tells an unknown worker (e.g. after a
  controller restart) to register again.
- /refresh_all_workers -> null: re-reads every worker's status, drops those that fail.
- /list_models -> {models}; /get_worker_address {model} -> {address} ("" when no worker serves it).
- /worker_get_status -> {model_names, speed, queue_length} summed over workers (controllers can nest).
- /worker_generate_stream and /worker_generate_messages (new): proxied to a worker chosen for body["model"], with
  the framing of `serve.protocol`. A worker that cannot be reached is dropped and the next one is tried; a worker
  that dies mid-stream ends the stream with an error chunk (code 3) and is dropped at once. The response header
  X-Worker-Address names the worker that served the request.
- /list_workers (new) -> {workers: {url: {...}}}; GET /health; GET /metrics (Prometheus text).
- /load_lora_adapter {lora_name, lora_path, base_model?} and /unload_lora_adapter {lora_name} (new, need the cluster
  token): forwarded to the workers serving `base_model` (needed only when several base models are registered) /
  holding the adapter; their new model lists are registered at once. /list_models also answers
  `adapters: {name: base}`.
With a cluster token (`--auth-token` / $LLAVA_AUTH_TOKEN) workers must send it to register and heartbeat, and the
controller sends it on every call to a worker; clients of /list_models, /get_worker_address and the generate
endpoints need none (put the API server in front for client keys).
Workers that miss heartbeats for `--heart-beat-expiration` seconds are dropped (checked every expiration/4 s).
Dispatch: shortest_queue (default; min queue_length / speed, counting requests this controller sent) or lottery
(random, weighted by speed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from pydantic import BaseModel
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from serve.common import (
    AUTH_TOKEN_HELP, DEFAULT_ALLOWED_HOSTS, DEFAULT_MAX_BODY_BYTES, STREAM_MEDIA_TYPE, AddressAllowlist,
    aiter_chunks, auth_headers, check_token, encode_chunk, error_response, parse_body, read_body, resolve_token,
    run_server, server_parser, setup_logging,
)
from serve.protocol import (
    ErrorCode, GetWorkerAddressRequest, HeartBeatRequest, RegisterWorkerRequest, ServeError, WorkerStatus, image_ref,
)

logger = setup_logging("serve.controller")

DISPATCH_METHODS = ("shortest_queue", "lottery")
MAX_IMAGE_OWNERS = 100_000  # image ids remembered for routing (about 20 MB)
WORKER_HEADER = "X-Worker-Address"  # proxied responses name the worker that served them (logs, debugging, tests)


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float
    # LoRA adapter name -> its base model name; None: the worker cannot load adapters (an upstream-backed or
    # original LLaVA worker)
    adapters: dict[str, str] | None = None

    def to_dict(self) -> dict:
        return {
            "model_names": self.model_names, "speed": self.speed, "queue_length": self.queue_length,
            "check_heart_beat": self.check_heart_beat, "last_heart_beat": self.last_heart_beat,
            "adapters": self.adapters,
        }


@dataclass
class ControllerConfig:
    dispatch_method: str = field(default="shortest_queue", metadata={"choices": DISPATCH_METHODS})
    heart_beat_expiration: float = field(default=30.0, metadata={
        "help": "seconds without a heartbeat after which a worker is dropped"})
    allowed_worker_hosts: str = field(default=DEFAULT_ALLOWED_HOSTS, metadata={
        "help": "comma list of hosts, *.suffix patterns, CIDR networks or * that workers may register from"})
    worker_timeout: float = field(default=300.0, metadata={
        "help": "seconds of silence from a worker's stream before the request fails"})
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    auth_token: str | None = field(default=None, metadata={"help": AUTH_TOKEN_HELP})

    def __post_init__(self) -> None:
        self.auth_token = resolve_token(self.auth_token)
        if self.dispatch_method not in DISPATCH_METHODS:
            raise ValueError(f"unknown dispatch method {self.dispatch_method!r}; valid: {', '.join(DISPATCH_METHODS)}")
        if self.heart_beat_expiration <= 0:
            raise ValueError(f"heart_beat_expiration must be > 0, got {self.heart_beat_expiration}")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.workers = Gauge("llava_controller_workers", "registered workers", registry=self.registry)
        self.requests = Counter(
            "llava_controller_requests", "proxied generate requests by outcome", ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "llava_controller_workers_dropped", "workers dropped, by reason", ["reason"], registry=self.registry
        )


class Registry:
    """The worker table and the dispatch policy (pure state; no I/O)."""

    def __init__(self, config: ControllerConfig, metrics: Metrics, rng: random.Random | None = None):
        self.config = config
        self.metrics = metrics
        self.allowlist = AddressAllowlist.parse(config.allowed_worker_hosts)
        self.workers: dict[str, WorkerInfo] = {}
        self.rng = rng or random.Random()

    def add(self, url: str, status: WorkerStatus, check_heart_beat: bool) -> None:
        adapters = getattr(status, "adapters", None)
        self.workers[url] = WorkerInfo(
            model_names=list(status.model_names), speed=float(status.speed), queue_length=int(status.queue_length),
            check_heart_beat=check_heart_beat, last_heart_beat=time.monotonic(),
            adapters={str(k): str(v) for k, v in adapters.items()} if isinstance(adapters, dict) else None,
        )
        self.metrics.workers.set(len(self.workers))
        logger.info("registered worker %s serving %s", url, status.model_names)

    def drop(self, url: str, reason: str) -> None:
        if self.workers.pop(url, None) is not None:
            self.metrics.workers.set(len(self.workers))
            self.metrics.dropped.labels(reason).inc()
            logger.warning("dropped worker %s: %s", url, reason)

    def heart_beat(self, url: str, queue_length: int) -> bool:
        info = self.workers.get(url)
        if info is None:
            return False
        info.queue_length = queue_length
        info.last_heart_beat = time.monotonic()
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        stale = [
            url for url, w in self.workers.items()
            if w.check_heart_beat and now - w.last_heart_beat > self.config.heart_beat_expiration
        ]
        for url in stale:
            self.drop(url, "heart beat expired")
        return stale

    def models(self) -> list[str]:
        return sorted({m for w in self.workers.values() for m in w.model_names})

    def adapters(self) -> dict[str, str]:
        return {name: base for w in self.workers.values() for name, base in (w.adapters or {}).items()}

    def base_models(self) -> list[str]:
        return sorted({m for w in self.workers.values() for m in w.model_names if m not in (w.adapters or {})})

    def candidates(self, model: str) -> list[str]:
        return [url for url, w in self.workers.items() if model in w.model_names]

    def choose(self, model: str, exclude: set[str] = frozenset(), prefer: str | None = None) -> str | None:
        """A worker URL for `model` by the dispatch policy (`prefer` first when it serves the model: the worker
        holding the images a request sends by id); its queue is bumped (the heartbeat corrects it)."""
        urls = [u for u in self.candidates(model) if u not in exclude]
        if not urls:
            return None
        if prefer in urls:
            url = prefer
        elif self.config.dispatch_method == "lottery":
            url = self.rng.choices(urls, weights=[max(self.workers[u].speed, 1e-6) for u in urls])[0]
        else:
            url = min(urls, key=lambda u: self.workers[u].queue_length / max(self.workers[u].speed, 1e-6))
        self.workers[url].queue_length += 1
        return url

    def release(self, url: str) -> None:
        info = self.workers.get(url)
        if info is not None and info.queue_length > 0:
            info.queue_length -= 1

    def status(self) -> WorkerStatus:
        return WorkerStatus(
            model_names=self.models(),
            speed=sum(w.speed for w in self.workers.values()),
            queue_length=sum(w.queue_length for w in self.workers.values()),
        )


@dataclass
class ControllerState:
    config: ControllerConfig
    registry: Registry
    metrics: Metrics
    client: httpx.AsyncClient
    tasks: list[asyncio.Task] = field(default_factory=list)
    # which worker encoded each image id its replies reported (LRU), so requests sending ids go back to it
    image_owners: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def remember_images(self, url: str, chunk: dict) -> None:
        usage = chunk.get("usage") if chunk.get("finish_reason") else None
        for image_id in (usage or {}).get("image_ids") or ():
            self.image_owners[image_id] = url
            self.image_owners.move_to_end(image_id)
        while len(self.image_owners) > MAX_IMAGE_OWNERS:
            self.image_owners.popitem(last=False)

    def owner_of(self, payload: dict) -> str | None:
        images = payload.get("images")
        for value in images if isinstance(images, list) else ():
            try:
                image_id = image_ref(value)
            except ServeError:
                continue  # the worker answers a malformed id with a 400 naming it
            if image_id in self.image_owners:
                return self.image_owners[image_id]
        return None


# ----------------------------------------------------------------------------------------------- worker I/O


async def fetch_worker_status(client: httpx.AsyncClient, url: str) -> WorkerStatus:
    try:
        r = await client.post(url + "/worker_get_status", timeout=5.0)
        r.raise_for_status()
        return WorkerStatus.model_validate(r.json())
    except (httpx.HTTPError, ValueError) as e:
        raise ServeError(ErrorCode.WORKER_UNREACHABLE, f"cannot get the status of worker {url}: {e!r}") from None


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    base_model: str | None = None


class UnloadAdapterRequest(BaseModel):
    lora_name: str


async def call_workers(state: ControllerState, urls: list[str], endpoint: str, body: dict) -> dict:
    """POST `body` to each worker; every one's new status is registered. Raises the first worker's error."""
    done = []
    for url in urls:
        try:
            r = await state.client.post(url + endpoint, json=body, timeout=300.0)
        except httpx.HTTPError as e:
            raise ServeError(ErrorCode.WORKER_UNREACHABLE, f"worker {url}: {type(e).__name__}: {e} "
                             f"(done on: {done or 'none'})") from None
        if r.status_code != 200:
            try:
                err = ServeError.from_chunk(r.json())
            except (ValueError, AttributeError, KeyError, TypeError):
                err = ServeError(ErrorCode.INTERNAL, f"HTTP {r.status_code}: {r.text[:500]}")
            raise ServeError(err.code, f"worker {url}: {err.message} (done on: {done or 'none'})")
        state.registry.add(url, WorkerStatus.model_validate(r.json()["status"]),
                           state.registry.workers[url].check_heart_beat if url in state.registry.workers else True)
        done.append(url)
    return {"workers": done}


async def load_adapter(state: ControllerState, req: LoadAdapterRequest) -> dict:
    bases = state.registry.base_models()
    base = req.base_model
    if base is None:
        if len(bases) != 1:
            raise ServeError(ErrorCode.INVALID_PARAMS, f"several base models are registered ({', '.join(bases)}): "
                             "say which one the adapter is for with base_model")
        base = bases[0]
    workers = state.registry.workers
    urls = [u for u in state.registry.candidates(base) if workers[u].adapters is not None
            and base not in workers[u].adapters]
    if not urls:
        serving = state.registry.candidates(base)
        raise ServeError(ErrorCode.UNKNOWN_MODEL, f"no worker that can load adapters serves base model {base!r}" + (
            f" ({len(serving)} worker(s) serve it but cannot load adapters: upstream-backed or original workers)"
            if serving else f"; base models: {', '.join(bases) or 'none'}"))
    body = {"lora_name": req.lora_name, "lora_path": req.lora_path}
    return {"lora_name": req.lora_name, "base_model": base, **await call_workers(state, urls, "/load_lora_adapter", body)}


async def unload_adapter(state: ControllerState, req: UnloadAdapterRequest) -> dict:
    urls = [u for u, w in state.registry.workers.items() if req.lora_name in (w.adapters or {})]
    if not urls:
        raise ServeError(ErrorCode.UNKNOWN_MODEL, f"no worker holds adapter {req.lora_name!r}; adapters: "
                         f"{', '.join(sorted(state.registry.adapters())) or 'none'}")
    return {"lora_name": req.lora_name,
            **await call_workers(state, urls, "/unload_lora_adapter", {"lora_name": req.lora_name})}


async def expiry_loop(state: ControllerState) -> None:
    period = state.config.heart_beat_expiration / 4
    while True:
        await asyncio.sleep(period)
        state.registry.expire()


async def open_upstream(state: ControllerState, endpoint: str, body: bytes, model: str,
                        prefer: str | None = None) -> tuple[str, httpx.Response]:
    """Send the request to a worker for `model`; unreachable workers are dropped and the next one is tried."""
    tried: set[str] = set()
    while True:
        url = state.registry.choose(model, exclude=tried, prefer=prefer)
        if url is None:
            if not tried:
                raise ServeError(
                    ErrorCode.UNKNOWN_MODEL,
                    f"no worker serves model {model!r}; "
                    f"available models: {', '.join(state.registry.models()) or 'none'}",
                )
            raise ServeError(
                ErrorCode.NO_WORKER, f"no live worker for model {model!r}: every worker tried was unreachable and "
                f"has been dropped ({', '.join(sorted(tried))})",
            )
        tried.add(url)
        request = state.client.build_request(
            "POST", url + endpoint, content=body, headers={"content-type": "application/json"},
        )
        try:
            return url, await state.client.send(request, stream=True)
        except httpx.TransportError as e:
            state.registry.release(url)
            state.registry.drop(url, f"unreachable ({type(e).__name__})")


async def relay(state: ControllerState, url: str, upstream: httpx.Response, endpoint: str) -> AsyncIterator[bytes]:
    """Re-frame the worker's stream; if the worker dies mid-stream, end with an error chunk and drop it."""
    outcome = "ok"
    try:
        async for chunk in aiter_chunks(upstream.aiter_raw(), raise_errors=False):
            if isinstance(chunk, dict) and chunk.get("error_code", 0):
                outcome = "worker_error"
            elif isinstance(chunk, dict):
                state.remember_images(url, chunk)
            yield encode_chunk(chunk)
    except ServeError as e:  # cut inside a chunk, or a malformed one
        outcome = "worker_died"
        state.registry.drop(url, f"broke its stream ({e.message})")
        yield encode_chunk(ServeError(ErrorCode.WORKER_UNREACHABLE, f"worker {url}: {e.message}").to_chunk())
    except httpx.TransportError as e:
        outcome = "worker_died"
        state.registry.drop(url, f"failed mid-stream ({type(e).__name__})")
        err = ServeError(ErrorCode.WORKER_UNREACHABLE, f"worker {url} failed mid-stream ({type(e).__name__}: {e})")
        yield encode_chunk(err.to_chunk())
    except (GeneratorExit, asyncio.CancelledError):
        outcome = "client_left"  # closing the upstream (finally) makes the worker cancel the generation
        raise
    finally:
        state.metrics.requests.labels(endpoint, outcome).inc()
        state.registry.release(url)
        await upstream.aclose()


async def proxy(state: ControllerState, request: Request, endpoint: str) -> Response:
    try:
        body = await read_body(request, state.config.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServeError(ErrorCode.INVALID_JSON, f"request body is not valid JSON: {e}") from None
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not model:
            raise ServeError(ErrorCode.INVALID_PARAMS, "invalid request: model: a model name (string) is required")
        url, upstream = await open_upstream(state, endpoint, body, model, prefer=state.owner_of(payload))
    except ServeError as e:
        state.metrics.requests.labels(endpoint, e.code.name.lower()).inc()
        return error_response(e, framed=True)
    if upstream.status_code != 200:
        # an error the worker found before streaming: pass its status and framed body through
        content = await upstream.aread()
        await upstream.aclose()
        state.registry.release(url)
        state.metrics.requests.labels(endpoint, f"http_{upstream.status_code}").inc()
        return Response(content, status_code=upstream.status_code, media_type=STREAM_MEDIA_TYPE,
                        headers={WORKER_HEADER: url})
    return StreamingResponse(relay(state, url, upstream, endpoint), media_type=STREAM_MEDIA_TYPE,
                             headers={WORKER_HEADER: url})


# ----------------------------------------------------------------------------------------------- app


def create_app(config: ControllerConfig | None = None) -> FastAPI:
    config = config or ControllerConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = Metrics()
        timeout = httpx.Timeout(connect=5.0, read=config.worker_timeout, write=30.0, pool=30.0)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=auth_headers(config.auth_token))
        state = ControllerState(config, Registry(config, metrics), metrics, client)
        state.tasks.append(asyncio.create_task(expiry_loop(state)))
        app.state.controller = state
        yield
        for t in state.tasks:
            t.cancel()
        await client.aclose()

    app = FastAPI(title="llava controller", lifespan=lifespan)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(exc, framed=False)

    def st(request: Request) -> ControllerState:
        return request.app.state.controller

    @app.post("/register_worker")
    async def register_worker(request: Request):
        s = st(request)
        check_token(request, s.config.auth_token, "worker registration")
        req = await parse_body(request, RegisterWorkerRequest)
        url = s.registry.allowlist.check_url(req.worker_name)
        status = req.worker_status or await fetch_worker_status(s.client, url)
        s.registry.add(url, status, req.check_heart_beat)
        return None

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request):
        check_token(request, st(request).config.auth_token, "heartbeat")
        req = await parse_body(request, HeartBeatRequest)
        return {"exist": st(request).registry.heart_beat(req.worker_name.rstrip("/"), req.queue_length)}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers(request: Request):
        s = st(request)
        for url, info in list(s.registry.workers.items()):
            try:
                status = await fetch_worker_status(s.client, url)
            except ServeError as e:
                s.registry.drop(url, e.message)
                continue
            s.registry.add(url, status, info.check_heart_beat)
        return None

    @app.post("/list_models")
    async def list_models(request: Request):
        reg = st(request).registry
        return {"models": reg.models(), "adapters": reg.adapters()}

    def admin(request: Request, what: str) -> ControllerState:
        s = st(request)
        if not s.config.auth_token:
            raise ServeError(ErrorCode.UNAUTHORIZED, f"{what} through the controller is off: start it (and the "
                             "workers) with --auth-token or $LLAVA_AUTH_TOKEN, and send that token")
        check_token(request, s.config.auth_token, what)
        return s

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        s = admin(request, "loading an adapter")
        return await load_adapter(s, await parse_body(request, LoadAdapterRequest))

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        s = admin(request, "unloading an adapter")
        return await unload_adapter(s, await parse_body(request, UnloadAdapterRequest))

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request):
        req = await parse_body(request, GetWorkerAddressRequest)
        return {"address": st(request).registry.choose(req.model) or ""}

    @app.post("/worker_get_status")
    async def worker_get_status(request: Request):
        return st(request).registry.status().model_dump()

    @app.post("/list_workers")
    async def list_workers(request: Request):
        return {"workers": {u: w.to_dict() for u, w in st(request).registry.workers.items()}}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        return await proxy(st(request), request, "/worker_generate_stream")

    @app.post("/worker_generate_messages")
    async def worker_generate_messages(request: Request):
        return await proxy(st(request), request, "/worker_generate_messages")

    @app.get("/health")
    async def health(request: Request):
        reg = st(request).registry
        return {"status": "ok", "workers": len(reg.workers), "models": reg.models()}

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(generate_latest(st(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def build_parser() -> argparse.ArgumentParser:
    return server_parser("LLaVA controller: worker registry + dispatch", 21001, ControllerConfig)


def main(argv: list[str] | None = None) -> None:
    run_server(build_parser(), ControllerConfig, create_app, argv)


if __name__ == "__main__":
    main()
