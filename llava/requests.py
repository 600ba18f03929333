"""What callers of the engine hold: requests, streamed events, results, the handle to follow or cancel a request,
the engine's errors and its statistics. No scheduling here (see `llava.engine`).

Promises:
- `RequestHandle` is both a sync and an async iterator of `GenerationEvent`s (any number of times), with
  `.cancel()` and `.result(timeout)`; the engine pushes events from its own thread.
- Every error the engine raises at submit is an `EngineError`; request errors are also `ValueError`s.
"""

from __future__ import annotations

import asyncio
import numbers
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from llava.kvcache import ImageRun
from llava.sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from llava.images import ProcessedImage

FinishReason = Literal["stop", "length", "cancelled", "error"]


# ------------------------------------------------------------------------------------------------------ errors


class EngineError(Exception):
    """Base class of the engine's own errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be run as given (empty/invalid ids, image count mismatch, bad pixel tensor)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt alone fills the model's context; the counts are attributes and in the message."""

    def __init__(self, prompt_tokens: int, image_tokens: int, num_images: int, context_length: int):
        self.prompt_tokens, self.image_tokens, self.context_length = prompt_tokens, image_tokens, context_length
        super().__init__(
            f"prompt has {prompt_tokens} tokens ({image_tokens} of them image tokens from {num_images} image(s), "
            f"{prompt_tokens - image_tokens} text) but the model's context is {context_length} tokens, leaving no "
            f"room to generate; shorten the conversation or send fewer/smaller images"
        )


class ImageFeatureMismatchError(EngineError):
    """The vision encoder produced a different number of feature rows than the prompt has image tokens."""


class EngineShutDownError(EngineError, RuntimeError):
    """submit() after shutdown()."""


class UnknownAdapterError(InvalidRequestError):
    """The request names a LoRA adapter the engine does not have loaded."""


class UnsupportedModelError(EngineError, ValueError):
    """The model's cache layout cannot be batched by this engine (e.g. sliding-window attention)."""


# ------------------------------------------------------------------------------------------- requests / events


@dataclass
class GenerationRequest:
    """Rendered token ids (each image's `<image>` token already repeated `num_tokens` times), the images in
    prompt order, and how to decode."""

    input_ids: list[int]
    images: Sequence[ProcessedImage] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    adapter: str | None = None  # a LoRA adapter loaded in the engine (`Engine.load_adapter`), None: the base


@dataclass(frozen=True)
class GenerationEvent:
    """One step of one request. `text` is the new text (possibly empty: a token may complete no character, or be
    held back as a possible stop-string start). The last event has finished=True and a finish_reason."""

    request_id: str
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprob: TokenLogprob | None = None  # of token_id, when the request asked for log-probabilities


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str  # generated text, stop string trimmed
    token_ids: list[int]  # generated ids, including a final EOS/stop id if one ended generation
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int  # prompt positions reused from the prefix cache (not recomputed)
    time_to_first_token: float | None  # seconds from submit to the first token
    latency: float  # seconds from submit to finish
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """Follow one request: iterate events (sync or async, any number of times), cancel it, or wait for it."""

    def __init__(self, request_id: str, wake_engine):
        self.request_id = request_id
        self._wake_engine = wake_engine
        self._events: list[GenerationEvent] = []
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._result: GenerationResult | None = None
        self._cancel_requested = False

    # -- consumer side

    def cancel(self) -> None:
        """Ask the engine to stop this request; it leaves the batch at the next step boundary."""
        with self._cond:
            if self._result is not None:
                return
            self._cancel_requested = True
        self._wake_engine()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    @property
    def done(self) -> bool:
        return self._result is not None

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes (TimeoutError after `timeout` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            return self._result

    def __iter__(self) -> Iterator[GenerationEvent]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: i < len(self._events))
                ev = self._events[i]
            i += 1
            yield ev
            if ev.finished:
                return

    async def _next_event(self, i: int) -> GenerationEvent:
        while True:
            with self._cond:
                if i < len(self._events):
                    return self._events[i]
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                self._async_waiters.append((loop, fut))
            await fut

    async def _aiter(self) -> AsyncIterator[GenerationEvent]:
        i = 0
        while True:
            ev = await self._next_event(i)
            i += 1
            yield ev
            if ev.finished:
                return

    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        return self._aiter()

    # -- engine side

    def _push(self, event: GenerationEvent, result: GenerationResult | None = None) -> None:
        with self._cond:
            self._events.append(event)
            if result is not None:
                self._result = result
            waiters, self._async_waiters = self._async_waiters, []
            self._cond.notify_all()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:
                # the consumer's event loop is closed: nobody awaits this future any more
                continue


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


# ----------------------------------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    tokens: int = 0  # prefix cache only: cached positions
    reused_tokens: int = 0  # prefix cache only: prompt positions not recomputed thanks to it


@dataclass(frozen=True)
class EngineStats:
    queued: int
    running: int  # decoding
    prefilling: int  # admitted, prompt not fully computed yet (chunked prefill)
    batch_tokens: int  # real (unpadded) positions held by the running batch
    batch_bytes: int  # bytes of the running batch's KV buffers
    completed: int
    cancelled: int
    failed: int
    generated_tokens: int
    image_cache: CacheStats
    prefix_cache: CacheStats
    runner: str = ""  # which forward computes the LLM ("llama" or "transformers") and why


# ------------------------------------------------------------------------------------------------- validation


def check_ids(input_ids, vocab_size: int) -> list[int]:
    """The prompt's ids as a list of ints in [0, vocab_size); InvalidRequestError otherwise."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.flatten().tolist()
    ids = list(input_ids)
    if not ids:
        raise InvalidRequestError("input_ids is empty")
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab_size]
    if bad:
        raise InvalidRequestError(f"input_ids must be ints in [0, {vocab_size}); got e.g. {bad[:5]}")
    return [int(i) for i in ids]


def check_images(ids: list[int], images, image_token_id: int, anyres: bool) -> list[ImageRun]:
    """Each image's run of `<image>` tokens in the prompt (image i takes the next num_tokens image positions)."""
    positions = [p for p, t in enumerate(ids) if t == image_token_id]
    counts = [getattr(im, "num_tokens", None) for im in images]
    if any(not isinstance(c, int) or c < 1 for c in counts):
        raise InvalidRequestError(f"every image needs num_tokens >= 1, got {counts}")
    if sum(counts) != len(positions):
        raise InvalidRequestError(
            f"the prompt has {len(positions)} image tokens (id {image_token_id}) but its {len(images)} "
            f"image(s) need {sum(counts)} ({counts}); render the prompt with each image's num_tokens"
        )
    runs, k = [], 0
    for im, c in zip(images, counts):
        start = positions[k]
        if positions[k + c - 1] != start + c - 1:
            raise InvalidRequestError(f"the {c} image tokens of image {len(runs)} are not contiguous in the prompt")
        if getattr(im, "features", None) is None:
            _check_pixels(im, len(runs), anyres)
        elif im.features.dim() != 2 or im.features.shape[0] != c:
            raise InvalidRequestError(f"image {len(runs)}: features must be [num_tokens={c}, hidden], "
                                      f"got {tuple(im.features.shape)}")
        runs.append(ImageRun(str(im.key), start, c))
        k += c
    return runs


def _check_pixels(im, index: int, anyres: bool) -> None:
    pv = getattr(im, "pixel_values", None)
    want = 4 if anyres else 3
    if not isinstance(pv, torch.Tensor) or pv.dim() != want:
        shape = tuple(pv.shape) if isinstance(pv, torch.Tensor) else type(pv).__name__
        layout = "[n_views, 3, S, S] (anyres)" if anyres else "[3, S, S]"
        raise InvalidRequestError(f"image {index}: pixel_values must be a {layout} tensor for this model, got {shape}")
