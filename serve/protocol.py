"""Wire formats shared by the controller, the model workers, the OpenAI server and the CLI.

Promises:
- `ErrorCode` is the one table of stable error codes. Each code has a fixed HTTP status and a snake_case name; codes
  0-3 keep the original LLaVA meanings (0 ok, 1 internal, 2 no worker for the model, 3 controller could not reach
  the worker), codes >= 40 are ours. A code never changes meaning; new causes get new codes.
- `ServeError` carries a code and a message naming the real cause; `to_chunk()` renders it in the LLaVA stream
  format `{"text": message, "error_code": N, "error": {"code": name, "message": ...}}`.
- The pydantic models below are the JSON bodies of the controller and worker endpoints. Field names follow the
  original LLaVA where it had them (worker_name, check_heart_beat, worker_status, model_names, speed,
  queue_length, model, prompt, images, temperature, top_p, max_new_tokens, stop).

Stream framing (worker and controller `/worker_generate_stream`, `/worker_generate_messages`): a sequence of
UTF-8 JSON objects, each followed by one NUL byte (b"\\0"). Every chunk has `text` and `error_code`; the last chunk
of a successful stream has a non-null `finish_reason` and `usage`. An error after the stream started arrives as a
final chunk with `error_code != 0`. With `logprobs: k` each chunk also carries `logprobs`: OpenAI's entries for
the tokens whose text it brings. The final `usage` lists `image_ids`: a later request to the same worker may send
`llava-image://<id>` in `images` instead of the image (served from its feature cache; the controller routes it to
the worker that encoded it; an id it no longer holds is a 404 `unknown_image`). An error found before generation starts is answered with the fitting HTTP 4xx/5xx
status and a body that is one such framed error chunk (so LLaVA clients, which ignore the status, still see it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


DEFAULT_CONTROLLER_URL = "http://127.0.0.1:21001"  # LLaVA's controller port, on loopback
IMAGE_REF_SCHEME = "llava-image://"  # an image sent by the id a previous reply's usage.image_ids gave
IMAGE_ID = re.compile(r"[0-9a-f]{64}\.[A-Za-z0-9_-]{1,80}")  # ProcessedImage.key: content hash . processing


def image_ref(value: object) -> str | None:
    """The id inside `llava-image://<id>`, None for anything else; a malformed id is a 400 naming it."""
    if not isinstance(value, str) or not value.startswith(IMAGE_REF_SCHEME):
        return None
    image_id = value[len(IMAGE_REF_SCHEME):]
    if not IMAGE_ID.fullmatch(image_id):
        raise ServeError(ErrorCode.BAD_IMAGE, f"malformed image id {image_id[:100]!r} in {IMAGE_REF_SCHEME}<id>: "
                                              "use an id from a previous reply's usage.image_ids")
    return image_id


class ErrorCode(IntEnum):
    """Stable error codes. HTTP status: `ERROR_STATUS[code]`."""

    OK = 0
    INTERNAL = 1  # a bug or an unexpected failure on the server
    NO_WORKER = 2  # no live worker serves the requested model
    WORKER_UNREACHABLE = 3  # the controller could not reach the worker, or it died mid-stream
    INVALID_JSON = 40  # the body is not JSON
    INVALID_PARAMS = 41  # a field is missing, of the wrong type, or out of range (incl. sampling params)
    BAD_IMAGE = 42  # not an image, truncated, too large, too many pixels (decompression bomb), bad base64/URL
    IMAGE_COUNT_MISMATCH = 43  # number of <image> markers != number of images
    PROMPT_TOO_LONG = 44  # prompt tokens (incl. image tokens) do not leave room in the context
    EMPTY_PROMPT = 45  # the prompt / last user message has no text and no image
    BODY_TOO_LARGE = 46  # request body over the server's limit
    UNKNOWN_MODEL = 47  # the model name is not served here
    UNAUTHORIZED = 48  # missing or wrong API key
    WORKER_NOT_ALLOWED = 49  # a worker URL outside the controller's allowlist tried to register
    OUT_OF_MEMORY = 50  # the device ran out of memory for this request
    OVERLOADED = 51  # the worker's queue is full (limit-model-concurrency)
    GENERATION_FAILED = 52  # the engine failed while generating
    TOO_MANY_IMAGES = 53  # more images in one request than the server allows (--max-images)
    UNKNOWN_IMAGE = 54  # an image sent by id that this worker has not encoded, or no longer holds
    BAD_VIDEO = 55  # not a video, empty, broken, over the byte / duration / frame limits, or no video decoder here


ERROR_STATUS: dict[ErrorCode, int] = {
    ErrorCode.OK: 200,
    ErrorCode.INTERNAL: 500,
    ErrorCode.NO_WORKER: 503,
    ErrorCode.WORKER_UNREACHABLE: 502,
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.BAD_IMAGE: 400,
    ErrorCode.IMAGE_COUNT_MISMATCH: 400,
    ErrorCode.PROMPT_TOO_LONG: 400,
    ErrorCode.EMPTY_PROMPT: 400,
    ErrorCode.BODY_TOO_LARGE: 413,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.WORKER_NOT_ALLOWED: 403,
    ErrorCode.OUT_OF_MEMORY: 507,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.GENERATION_FAILED: 500,
    ErrorCode.UNKNOWN_IMAGE: 404,
    ErrorCode.TOO_MANY_IMAGES: 400,
    ErrorCode.BAD_VIDEO: 400,
}


class ServeError(Exception):
    """An error to send to a client: stable code + a message naming the real cause."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.code]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.name.lower(), "message": self.message}

    def to_chunk(self, text: str | None = None) -> dict[str, Any]:
        """The LLaVA stream chunk for this error (LLaVA clients show `text`)."""
        return {"text": self.message if text is None else text, "error_code": int(self.code), "error": self.to_dict()}

    @classmethod
    def from_chunk(cls, chunk: dict) -> ServeError:
        """Rebuild the error a worker/controller sent (unknown codes become INTERNAL with the original message)."""
        try:
            code = ErrorCode(int(chunk.get("error_code", 1)))
        except ValueError:
            code = ErrorCode.INTERNAL
        err = chunk.get("error") or {}
        return cls(code, err.get("message") or str(chunk.get("text", "")))


# ----------------------------------------------------------------------------------------------- controller


class WorkerStatus(BaseModel):
    """What `/worker_get_status` answers (worker and controller alike, so controllers can nest)."""

    model_config = ConfigDict(extra="allow")

    model_names: list[str]
    speed: float = 1.0
    queue_length: int = 0


class RegisterWorkerRequest(BaseModel):
    worker_name: str  # the worker's base URL, e.g. http://127.0.0.1:21002
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None


class HeartBeatRequest(BaseModel):
    worker_name: str
    queue_length: int = 0


class GetWorkerAddressRequest(BaseModel):
    model: str


# ----------------------------------------------------------------------------------------------- generation


class StructuredOutput(BaseModel):
    """What the output must match: {"type": "json_schema", "value": {schema}} | {"type": "json_object"} |
    {"type": "regex", "value": "pattern"} | {"type": "choice", "value": ["a", "b"]} | {"type": "grammar",
    "value": "lark grammar"}."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    value: Any = None


GREEDY_BELOW = 0.001  # LLaVA: sampling only when temperature > 0.001


class SamplingFields(BaseModel):
    """Sampling fields of both generate endpoints. LLaVA defaults: temperature 1.0 (greedy when <= 0.001).
    Unknown fields are accepted and ignored, as the original worker does (its clients send e.g. `echo`); the
    worker logs each unknown name once. Known fields of a wrong type or value are still 400s naming the field."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: str | list[str] | None = None
    image_mode: Literal["pad", "resize", "crop", "anyres", "default"] | None = None
    # k: each chunk carries `logprobs`, OpenAI's entries {token, logprob, bytes, top_logprobs (k)} of its tokens
    logprobs: int | None = None
    structured: StructuredOutput | None = None  # the output must match it (llava.structured)

    def sampling_temperature(self) -> float:
        """The temperature to sample at: 0 (greedy) for temperature <= 0.001, as LLaVA's worker."""
        return 0.0 if 0 <= self.temperature <= GREEDY_BELOW else self.temperature


class VideoFields(BaseModel):
    """Videos of both generate endpoints: base64 (or data: URIs) of mp4 / webm / mkv / mov / avi files, one per
    `<video>` marker in order; `max_frames` sampled uniformly from each (default: the model's, capped by the
    worker's --max-frames)."""

    videos: list[str] = Field(default_factory=list)
    max_frames: int | None = Field(None, ge=1)


class GenerateStreamRequest(SamplingFields, VideoFields):
    """LLaVA's `/worker_generate_stream`: `prompt` is already templated and holds one `<image>` per image (and one
    `<video>` per video)."""

    prompt: str
    images: list[str] = Field(default_factory=list)  # base64 (or data: URIs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str  # `<image>` markers say where the images go, in order


class GenerateMessagesRequest(SamplingFields, VideoFields):
    """`/worker_generate_messages`: the worker renders `messages` with its model's own template."""

    messages: list[ChatMessage]
    images: list[str] = Field(default_factory=list)  # base64 (or data: URIs), one per `<image>` marker, in order


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # includes image_tokens
    completion_tokens: int
    image_tokens: int
    image_ids: tuple[str, ...] = ()  # each image's id: send `llava-image://<id>` later instead of the image
    # (kind "image" | "video", tokens, frames or None) of each image and video in prompt order (`Prepared.media`)
    media: tuple[tuple[str, int, int | None], ...] = ()

    def to_dict(self) -> dict:
        d = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "image_tokens": self.image_tokens,  # images' and videos' tokens
            "image_ids": list(self.image_ids),
        }
        if self.media:
            d["media"] = [{"type": kind, "tokens": tokens, **({"frames": frames} if frames else {})}
                          for kind, tokens, frames in self.media]
        return d
