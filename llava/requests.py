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
    from llava.images import ProcessedImage, ProcessedVideo

FinishReason = Literal["stop", "length", "cancelled", "error"]


# ------------------------------------------------------------------------------------------------------ errors


class EngineError(Exception):
    """Base class of the engine's own errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be run as given (empty/invalid ids, image count mismatch, bad pixel tensor)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt alone fills the model's context; the counts are attributes and in the message.

    `items`: (kind "image" / "video", tokens, frames or None) per image and video in prompt order; `frames_that_fit`:
    for a prompt with videos, the most frames of its longest video with which it would fit (0: none)."""

    def __init__(self, prompt_tokens: int, image_tokens: int, num_images: int, context_length: int,
                 items: Sequence[tuple[str, int, int | None]] = (), frames_that_fit: int | None = None):
        self.prompt_tokens, self.image_tokens, self.context_length = prompt_tokens, image_tokens, context_length
        self.items, self.frames_that_fit = list(items), frames_that_fit
        detail = f"{image_tokens} of them image tokens from {num_images} image(s), {prompt_tokens - image_tokens} text"
        if self.items:
            seen = {"image": 0, "video": 0}
            parts = []
            for kind, tokens, frames in self.items:
                seen[kind] += 1
                parts.append(f"{kind} {seen[kind]}: {tokens}" + (f" ({frames} frames)" if frames else ""))
            videos = seen["video"]
            detail = (f"{image_tokens} of them {'image/video' if videos else 'image'} tokens from {seen['image']} image(s)"
                      + (f" and {videos} video(s)" if videos else "") + f" [{', '.join(parts)}], "
                      f"{prompt_tokens - image_tokens} text")
        advice = "shorten the conversation or send fewer/smaller images"
        if frames_that_fit is not None:
            advice = (f"the video would fit with at most {frames_that_fit} frames" if frames_that_fit > 0 else
                      "it does not fit even with one frame of the video") + "; " + advice
        super().__init__(
            f"prompt has {prompt_tokens} tokens ({detail}) but the model's context is {context_length} tokens, "
            f"leaving no room to generate; {advice}"
        )


def frames_that_fit(context_length: int, prompt_tokens: int, video_tokens: int, tokens_per_frame: int,
                    fixed_tokens: int = 0) -> int:
    """The most frames of a video (of `video_tokens` now, `fixed_tokens` of them not per frame, e.g. a newline) with
    which a prompt of `prompt_tokens` would leave one position to generate in the context."""
    room = context_length - 1 - (prompt_tokens - video_tokens) - fixed_tokens
    return max(0, min((video_tokens - fixed_tokens) // tokens_per_frame - 1, room // tokens_per_frame))


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
    videos: Sequence[ProcessedVideo] = ()  # models with a video token: each `<video>` run, in prompt order
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
    cpu_threads: int | None = None  # torch CPU threads of the last step (--num-threads auto: its last decision)


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
    return check_media(ids, images, (), image_token_id, None, anyres)[1]


def check_media(ids: list[int], images, videos, image_token_id: int, video_token_id: int | None,
                anyres: bool) -> tuple[list, list[ImageRun]]:
    """Images and videos in prompt order, with each one's run of `<image>` / `<video>` tokens (image i takes the
    next num_tokens image positions, video j the next num_tokens video positions)."""
    if videos and video_token_id is None:
        raise InvalidRequestError(f"{len(videos)} video(s) sent, but this model has no video token: send the frames "
                                  "as images")
    runs = _runs(ids, images, image_token_id, "image")
    for im, run in zip(images, runs):
        if getattr(im, "features", None) is None:
            _check_pixels(im, run.index, anyres)
        elif im.features.dim() != 2 or im.features.shape[0] != run.num_tokens:
            raise InvalidRequestError(f"image {run.index}: features must be [num_tokens={run.num_tokens}, hidden], "
                                      f"got {tuple(im.features.shape)}")
    vruns = _runs(ids, videos, video_token_id, "video") if video_token_id is not None else []
    for v, run in zip(videos, vruns):
        pv = getattr(v, "pixel_values", None)
        frames = len(getattr(v, "frame_keys", ()))
        if not isinstance(pv, torch.Tensor) or pv.dim() != 4 or pv.shape[0] != frames or not frames:
            shape = tuple(pv.shape) if isinstance(pv, torch.Tensor) else type(pv).__name__
            raise InvalidRequestError(f"video {run.index}: pixel_values must be [n_frames={frames}, 3, S, S], got {shape}")
        if v.num_tokens != frames * v.tokens_per_frame + 1:
            raise InvalidRequestError(f"video {run.index}: {v.num_tokens} tokens for {frames} frames of "
                                      f"{v.tokens_per_frame} (+1 newline = {frames * v.tokens_per_frame + 1})")
    pairs = sorted(zip([*images, *videos], [r.run for r in runs + vruns]), key=lambda p: p[1].start)
    return [p[0] for p in pairs], [p[1] for p in pairs]


@dataclass
class _Run:
    run: ImageRun
    index: int

    @property
    def num_tokens(self) -> int:
        return self.run.num_tokens


def _runs(ids: list[int], items, token_id: int, kind: str) -> list[_Run]:
    positions = [p for p, t in enumerate(ids) if t == token_id]
    counts = [getattr(it, "num_tokens", None) for it in items]
    if any(not isinstance(c, int) or c < 1 for c in counts):
        raise InvalidRequestError(f"every {kind} needs num_tokens >= 1, got {counts}")
    if sum(counts) != len(positions):
        raise InvalidRequestError(
            f"the prompt has {len(positions)} {kind} tokens (id {token_id}) but its {len(items)} "
            f"{kind}(s) need {sum(counts)} ({counts}); render the prompt with each {kind}'s num_tokens"
        )
    runs, k = [], 0
    for it, c in zip(items, counts):
        start = positions[k]
        if positions[k + c - 1] != start + c - 1:
            raise InvalidRequestError(f"the {c} {kind} tokens of {kind} {len(runs)} are not contiguous in the prompt")
        runs.append(_Run(ImageRun(str(it.key), start, c), len(runs)))
        k += c
    return runs


def _check_pixels(im, index: int, anyres: bool) -> None:
    pv = getattr(im, "pixel_values", None)
    want = 4 if anyres else 3
    if not isinstance(pv, torch.Tensor) or pv.dim() != want:
        shape = tuple(pv.shape) if isinstance(pv, torch.Tensor) else type(pv).__name__
        layout = "[n_views, 3, S, S] (anyres)" if anyres else "[3, S, S]"
        raise InvalidRequestError(f"image {index}: pixel_values must be a {layout} tensor for this model, got {shape}")
