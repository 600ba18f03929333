"""Small helpers shared by the servers: stream framing, request parsing with stable errors, the worker-URL
allowlist, and per-app Prometheus registries.

Promises:
- `encode_chunk` / `FrameSplitter` implement the NUL-delimited JSON framing of `serve.protocol`; the splitter
  accepts bytes cut anywhere and yields only complete chunks.
- `parse_body(request, Model, max_bytes)` returns a validated pydantic model or raises `ServeError` with
  BODY_TOO_LARGE, INVALID_JSON or INVALID_PARAMS and a message naming the field.
- `AddressAllowlist` decides which URLs a controller may register (and so proxy to): http(s) only, host matched
  against exact names, `*.suffix` patterns or IP networks. The default allows loopback only.
- The cluster token (`--auth-token` or $LLAVA_AUTH_TOKEN, `resolve_token`): when set, workers send it to register
  and heartbeat, the controller sends it on every call to a worker, and each side refuses requests without it
  (`check_token`, constant-time comparison) with a message naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from llava.image_data import ImageError, decode_base64
from serve.protocol import ErrorCode, ServeError

DEFAULT_ALLOWED_HOSTS = "127.0.0.1,localhost,::1"
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
FRAME_DELIMITER = b"\0"
STREAM_MEDIA_TYPE = "application/octet-stream"

M = TypeVar("M", bound=BaseModel)
# Idle keep-alive connections are closed after this long: well above clients' pool expiry (httpx: 5 s, the same as
# uvicorn's default, so a pooled POST could meet a connection the server was closing and fail with a ReadError).
KEEP_ALIVE_SECONDS = 75
AUTH_TOKEN_ENV = "LLAVA_AUTH_TOKEN"
AUTH_TOKEN_HELP = (f"shared secret of the controller, its workers and the API server (default: ${AUTH_TOKEN_ENV}); "
                   "when set, nothing without it can register a worker or call one")


# ----------------------------------------------------------------------------------------------- cluster token


def resolve_token(token: str | None) -> str | None:
    """The cluster token: the one given, else $LLAVA_AUTH_TOKEN, else None (no authentication)."""
    return token if token else (os.environ.get(AUTH_TOKEN_ENV) or None)


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


def require_token_middleware(app, token: str | None) -> None:
    """Every request to a worker `app` but /health must carry the cluster token (when one is set); refusals are
    framed on the generate endpoints, as LLaVA's clients read them."""

    @app.middleware("http")
    async def cluster_token(request: Request, call_next):
        if request.url.path != "/health":
            try:
                check_token(request, token, f"{request.url.path} on this worker")
            except ServeError as e:
                return error_response(e, framed=request.url.path.startswith("/worker_generate"))
        return await call_next(request)


def check_token(request: Request, token: str | None, what: str) -> None:
    """Refuse `what` (e.g. "worker registration") unless the request carries the cluster token (when one is set)."""
    if token and not hmac.compare_digest(bearer(request).encode(), token.encode()):
        sent = "a different token" if bearer(request) else "no token"
        raise ServeError(ErrorCode.UNAUTHORIZED,
                         f"{what} refused: the request carried {sent}; this cluster requires its shared token "
                         f"(--auth-token or ${AUTH_TOKEN_ENV}, sent as Authorization: Bearer <token>)")


# ----------------------------------------------------------------------------------------------- framing


def encode_chunk(chunk: dict[str, Any]) -> bytes:
    return json.dumps(chunk).encode() + FRAME_DELIMITER


class FrameSplitter:
    """Feed raw bytes, get back the complete JSON chunks they finish."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict]:
        self._buffer += data
        *frames, self._buffer = self._buffer.split(FRAME_DELIMITER)
        return [json.loads(f) for f in frames if f.strip()]

    @property
    def pending(self) -> bytes:
        """Bytes of an unfinished chunk (non-empty when a stream was cut off)."""
        return self._buffer


def _checked(splitter: FrameSplitter, data: bytes, raise_errors: bool) -> list[dict]:
    try:
        chunks = splitter.feed(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServeError(ErrorCode.WORKER_UNREACHABLE, f"the stream carried a malformed chunk: {e}") from None
    if raise_errors:
        for chunk in chunks:
            if not isinstance(chunk, dict):
                raise ServeError(ErrorCode.WORKER_UNREACHABLE, f"the stream carried a non-object chunk: {chunk!r:.100}")
            if chunk.get("error_code", 0):
                raise ServeError.from_chunk(chunk)
    return chunks


def _cut(splitter: FrameSplitter) -> None:
    if splitter.pending.strip():
        raise ServeError(ErrorCode.WORKER_UNREACHABLE,
                         f"the stream ended in the middle of a chunk: {splitter.pending[:200]!r}")


def iter_chunks(byte_chunks: Iterable[bytes], *, raise_errors: bool = True) -> Iterator[dict]:
    """The one reader of the NUL-framed chunk stream (sync). An error chunk raises its ServeError (unless
    raise_errors=False: a relay passes them on); a stream cut inside a chunk or a malformed chunk raises
    WORKER_UNREACHABLE."""
    splitter = FrameSplitter()
    for data in byte_chunks:
        yield from _checked(splitter, data, raise_errors)
    _cut(splitter)


async def aiter_chunks(byte_chunks: AsyncIterable[bytes], *, raise_errors: bool = True) -> AsyncIterator[dict]:
    """`iter_chunks` for async byte streams (httpx `aiter_raw`)."""
    splitter = FrameSplitter()
    async for data in byte_chunks:
        for chunk in _checked(splitter, data, raise_errors):
            yield chunk
    _cut(splitter)


def error_response(err: ServeError, *, framed: bool) -> Response:
    """The HTTP answer for an error found before streaming started."""
    if framed:
        return Response(encode_chunk(err.to_chunk()), status_code=err.status, media_type=STREAM_MEDIA_TYPE)
    return JSONResponse({"error": err.to_dict(), "error_code": int(err.code)}, status_code=err.status)


# ----------------------------------------------------------------------------------------------- parsing


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ServeError(ErrorCode.BODY_TOO_LARGE, f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    body = b""
    async for part in request.stream():  # chunked uploads have no content-length: count as we read
        body += part
        if len(body) > max_bytes:
            raise ServeError(ErrorCode.BODY_TOO_LARGE, f"request body exceeds the limit of {max_bytes} bytes")
    return body


def describe_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ServeError(ErrorCode.INVALID_PARAMS, f"invalid request: {describe_validation_error(e)}") from None


def unencodable_text(data: Any, path: str = "") -> str | None:
    """The path of the first string that UTF-8 cannot encode (a lone surrogate such as "\\ud800", which JSON
    allows), or None."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return path or "(body)"
        return None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        bad = unencodable_text(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key))
        if bad:
            return bad
    return None


def check_text(data: Any) -> None:
    """ServeError(INVALID_PARAMS) naming the field whose text is not valid Unicode."""
    bad = unencodable_text(data)
    if bad:
        raise ServeError(ErrorCode.INVALID_PARAMS,
                         f"invalid request: field {bad!r} holds an unpaired UTF-16 surrogate (e.g. \\ud800), which is not "
                         f"valid Unicode text; send well-formed strings")


async def parse_body(request: Request, model: type[M], max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                     on_unknown: Callable[[set[str]], None] | None = None) -> M:
    """The request body as `model`: 413 past max_bytes, 400 for invalid JSON, text that is not valid Unicode, or a
    wrong field type or value (named). Fields the model does not know are passed to `on_unknown` (LLaVA's clients
    send extra ones, e.g. `echo`) when the model allows extras."""
    body = await read_body(request, max_bytes)
    try:
        data = json.loads(body) if body.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServeError(ErrorCode.INVALID_JSON, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ServeError(ErrorCode.INVALID_JSON, f"request body must be a JSON object, got {type(data).__name__}")
    check_text(data)
    parsed = validate(model, data)
    extra = getattr(parsed, "model_extra", None)
    if extra:
        for name in extra:  # a misspelt known field is an error, not silently ignored
            close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.8)
            if close:
                raise ServeError(ErrorCode.INVALID_PARAMS,
                                 f"invalid request: unknown field {name!r} (did you mean {close[0]!r}?)")
        if on_unknown is not None:
            on_unknown(set(extra))
    return parsed


# ----------------------------------------------------------------------------------------------- allowlist


@dataclass(frozen=True)
class AddressAllowlist:
    """Hosts a URL may point at: exact names, `*.suffix` wildcards, IP networks (CIDR). `*` allows every host."""

    names: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    allow_all: bool = False

    @classmethod
    def parse(cls, spec: str) -> AddressAllowlist:
        names, suffixes, networks, allow_all = set(), [], [], False
        for item in (s.strip().lower() for s in spec.split(",")):
            if not item:
                continue
            if item == "*":
                allow_all = True
            elif item.startswith("*."):
                suffixes.append(item[1:])
            else:
                try:
                    networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    names.add(item)
        return cls(frozenset(names), tuple(suffixes), tuple(networks), allow_all)

    def check_url(self, url: str) -> str:
        """The URL without a trailing slash, or ServeError(WORKER_NOT_ALLOWED) naming why it is refused."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ServeError(ErrorCode.WORKER_NOT_ALLOWED, f"worker address {url!r} must be an http(s) URL with a host")
        if parsed.username or parsed.password or parsed.query or parsed.fragment:
            raise ServeError(
                ErrorCode.WORKER_NOT_ALLOWED,
                f"worker address {url!r} must not carry credentials, a query or a fragment",
            )
        if not self.allows_host(parsed.hostname):
            raise ServeError(
                ErrorCode.WORKER_NOT_ALLOWED,
                f"worker host {parsed.hostname!r} is not in the controller's allowlist; start the controller with "
                f"--allowed-worker-hosts to add it",
            )
        return url.rstrip("/")

    def allows_host(self, host: str) -> bool:
        host = host.lower().strip("[]")
        if self.allow_all or host in self.names or any(host.endswith(s) for s in self.suffixes):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


# ----------------------------------------------------------------------------------------------- images


def decode_image_payload(payload: str, index: int, max_bytes: int) -> bytes:
    """Bytes of a base64 string or `data:` URI sent by a client. Never a file path or URL: a remote client must not
    make the server read its own files or fetch addresses (see `fetch_image_url` for the opt-in URL path)."""
    if not isinstance(payload, str) or not payload:
        raise ServeError(ErrorCode.BAD_IMAGE, f"image {index}: expected a non-empty base64 string or data: URI")
    text = payload
    if payload.startswith("data:"):
        header, comma, text = payload[5:].partition(",")
        if not comma or not header.endswith(";base64"):
            raise ServeError(
                ErrorCode.BAD_IMAGE, f"image {index}: a data: URI must be base64 (data:image/png;base64,...)"
            )
    try:
        return decode_base64(text, max_bytes, "the payload")
    except ImageError as e:
        raise ServeError(ErrorCode.BAD_IMAGE, f"image {index}: {e}") from None


def fetch_image_url(url: str, *, max_bytes: int, timeout: float) -> bytes:
    """Download an http(s) image with a byte cap and an overall deadline; ServeError(BAD_IMAGE) naming the cause."""
    import httpx  # only the URL path needs it

    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ServeError(ErrorCode.BAD_IMAGE, f"image URL {url!r}: only http(s) URLs can be fetched")
    deadline = time.monotonic() + timeout
    data = b""
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=False) as r:
            if r.status_code != 200:
                raise ServeError(ErrorCode.BAD_IMAGE, f"image URL {url!r} answered HTTP {r.status_code}")
            for part in r.iter_bytes():
                data += part
                if len(data) > max_bytes:
                    raise ServeError(ErrorCode.BAD_IMAGE, f"image URL {url!r}: more than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ServeError(ErrorCode.BAD_IMAGE, f"image URL {url!r}: download took longer than {timeout} s")
    except httpx.HTTPError as e:
        reason = f"{type(e).__name__}: {e}"
        raise ServeError(ErrorCode.BAD_IMAGE, f"image URL {url!r} could not be fetched: {reason}") from None
    return data


# ----------------------------------------------------------------------------------------------- misc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (tests and launchers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logging.getLogger(name)


# ------------------------------------------------------------------------------------- model and engine options

PRECISION_HELP = (
    "--dtype auto picks what this machine computes fastest (bf16 on CUDA and on CPUs with native bf16, else "
    "float32); --quantization auto serves on CPU the int8/int4 precision the checkpoint records as passing its "
    "quality gate (the default model: int4), else none"
)


def add_precision_args(p: argparse.ArgumentParser) -> None:
    """--dtype, --quantization and LLaVA's --load-8bit / --load-4bit (bitsandbytes), shared by worker and CLI."""
    g = p.add_argument_group("precision", PRECISION_HELP)
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: auto)")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4", "8bit", "4bit"],
                   help="weight quantization of the LLM: int8/int4 on CPU (llava.quant), 8bit/4bit bitsandbytes "
                        "(default: auto)")
    q.add_argument("--load-8bit", action="store_const", const="8bit", dest="quantization",
                   help="bitsandbytes 8-bit (as LLaVA's flag)")
    q.add_argument("--load-4bit", action="store_const", const="4bit", dest="quantization",
                   help="bitsandbytes 4-bit NF4 (as LLaVA's flag)")


ENGINE_HELP = {
    "max_cached_tokens": "KV positions the running batch may reserve (prompt + max_new_tokens per request)",
    "image_cache_bytes": "bytes of projected image features kept for reuse (0 disables)",
    "prefix_cache_tokens": "KV positions of finished requests kept for prefix reuse (0 disables)",
    "min_prefix_tokens": "shortest shared prefix worth reusing",
    "max_prefill_tokens_per_step": "prompt positions computed between two decode steps (bounds running streams' "
                                   "inter-token latency; longer prompts are prefilled in chunks)",
    "runner": "LLM forward: auto | llama (the engine's own) | transformers",
    "cpu_threads": "fixed: torch's CPU threads as the process set them; auto: the CPUs other processes leave free, "
                   "re-decided every 2 s (beside a training job on 2 cores: 1 thread, else 2)",
}


def add_config_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the config dataclass `cls` (one source for names, defaults and help): `--field-name`
    (or metadata["flag"]), the field's type and default, metadata["help"] / ["choices"] / ["parse"] (a function
    from the flag's string); bools become --x / --no-x."""
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw: dict[str, Any] = {"dest": f.name, "default": default}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = f.metadata.get("parse", type(default) if default is not None else str)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.metadata.get("required"):
            kw["required"] = True
        shown = "" if default in (None, "") or isinstance(default, (frozenset, set)) else f" (default: {default})"
        kw["help"] = f.metadata.get("help", "") + shown
        p.add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), **kw)


def parse_lora_module(spec: str) -> tuple[str, str]:
    """`name=path` or vLLM's JSON form {"name": ..., "path": ...}."""
    if spec.lstrip().startswith("{"):
        try:
            d = json.loads(spec)
            return str(d["name"]), str(d["path"])
        except (ValueError, KeyError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"--lora-modules {spec!r}: JSON needs name and path ({e})") from None
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules {spec!r}: expected NAME=PATH")
    return name, path


def server_parser(description: str, port: int, config_cls) -> argparse.ArgumentParser:
    """A serve process's command line: --host (loopback by default), --port and one flag per `config_cls` field."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=port, help=f"(default: {port})")
    add_config_args(p, config_cls)
    return p


def run_server(parser: argparse.ArgumentParser, config_cls, create_app, argv: list[str] | None = None) -> None:
    """Parse a `server_parser` command line and serve `create_app(config)` with uvicorn."""
    import uvicorn

    args = parser.parse_args(argv)
    uvicorn.run(create_app(config_from_args(config_cls, args)), host=args.host, port=args.port, log_level="warning",
                timeout_keep_alive=KEEP_ALIVE_SECONDS)


def config_from_args(cls, args: argparse.Namespace, **fixed):
    """`cls` from the parsed flags of `add_config_args` (fields given in `fixed` override them)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**{**values, **fixed})
    except ValueError as e:
        raise SystemExit(f"invalid setting: {e}") from None


def add_engine_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ("max_batch_size",)) -> None:
    """One flag per `EngineConfig` field (defaults and help from the dataclass: one source for both)."""
    from llava.config import EngineConfig

    g = p.add_argument_group("engine", "batching and caches of the generation engine (llava.config.EngineConfig)")
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        g.add_argument(flag, dest="engine_" + f.name, type=type(f.default), default=f.default, metavar=f.name.upper(),
                       help=f"{ENGINE_HELP.get(f.name, '')} (default: {f.default})")


def engine_config_from_args(args: argparse.Namespace, **fixed):
    from llava.config import EngineConfig

    values = {k.removeprefix("engine_"): v for k, v in vars(args).items() if k.startswith("engine_")}
    try:
        return EngineConfig(**{**values, **fixed})
    except ValueError as e:
        raise SystemExit(f"invalid engine setting: {e}") from None
