"""The generation engine: continuous batching of LLaVA requests with images, an image-feature cache, prefix
reuse and cancellation. No HTTP here; workers and the CLI wrap it.

Promises:
- `Engine.submit(GenerationRequest)` is thread-safe, validates the request on the caller's thread (bad sampling
  values, image/token count mismatches and over-long prompts raise there) and returns a `RequestHandle` that is
  both a sync and an async iterator of `GenerationEvent`s, with `.cancel()` and `.result()`.
- A background scheduler (`start()`) runs steps; at each step boundary queued requests join the running batch
  (bounded by `max_batch_size` and by the tokens the batch may cache), newcomers are prefilled one by one, then
  one decode step advances every running request. Finished or cancelled requests leave at once and their rows
  are freed. Greedy output does not depend on what else is in the batch.
- Image features are computed once per `ProcessedImage.key` (LRU bounded in bytes) and scattered into the
  prompt's `<image>` positions; a feature/token count mismatch fails that request with a message naming both.
- The KV of finished requests is kept (LRU bounded in tokens); a request whose ids and images extend a cached
  sequence prefills only the new suffix. Greedy output with reuse equals output without.
- An exception inside a step fails only the requests it touched (finish_reason "error" with the message); the
  engine keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import numbers
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from llava.kvcache import BatchKV, ImageFeatureCache, ImageRun, PrefixCache, SequenceKV, new_cache, sequence_kv
from llava.sampling import (
    IncrementalDetokenizer,
    InvalidSamplingParamsError,
    RowSampler,
    SamplingParams,
    StopStringMatcher,
    choose_next_tokens,
    make_generator,
)

if TYPE_CHECKING:
    from llava.images import ProcessedImage

__all__ = [
    "Engine", "EngineError", "EngineStats", "EngineShutDownError", "GenerationEvent", "GenerationRequest",
    "GenerationResult", "ImageFeatureMismatchError", "InvalidRequestError", "InvalidSamplingParamsError",
    "PromptTooLongError", "RequestHandle", "SamplingParams", "UnsupportedModelError",
]

logger = logging.getLogger(__name__)

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

    async def aresult(self) -> GenerationResult:
        async for _ in self:
            pass
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
    running: int
    batch_tokens: int  # real (unpadded) positions held by the running batch
    batch_bytes: int  # bytes of the running batch's KV buffers
    completed: int
    cancelled: int
    failed: int
    generated_tokens: int
    image_cache: CacheStats
    prefix_cache: CacheStats


# ------------------------------------------------------------------------------------------------- sequences


@dataclass
class _Sequence:
    """A request the scheduler has accepted: its decoding state while queued or running."""

    handle: RequestHandle
    request: GenerationRequest
    prompt: list[int]  # the request's ids, validated
    images: list  # the request's images, in prompt order
    max_new_tokens: int
    reserve: int  # tokens this request may hold in the batch at most (prompt + max_new_tokens)
    image_runs: list[ImageRun]
    stop_ids: frozenset[int]
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    cached_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    final: tuple[int, str] | None = None  # the finishing token and its text, published after the batch update

    @property
    def fed_ids(self) -> list[int]:
        """Ids whose KV exist: the prompt and every generated token but the last (not fed back yet)."""
        return self.prompt + self.generated[:-1]


class Engine:
    """Continuous-batching generation over a transformers Llava / LlavaNext model (see the module docstring).

    eos_token_ids: ids that end a reply (the template's, see `llava.templates.stop_token_ids`).
    max_batch_size: running requests decoded together. max_cached_tokens: bound on the batch's KV, counted as
    each running request's prompt + max_new_tokens (a single larger request still runs, alone).
    image_cache_bytes / prefix_cache_tokens: LRU budgets (0 disables a cache); min_prefix_tokens: shortest
    prefix worth reusing. max_prefill_tokens_per_step: newcomers' prompt tokens prefilled before the next decode
    step (at least one request always joins). context_length: defaults to the LLM's max_position_embeddings.
    Use it with `start()` (background scheduler) or drive it by hand with `step()` / `run_until_idle()`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 16,
        max_cached_tokens: int = 32768,
        image_cache_bytes: int = 256 * 2**20,
        prefix_cache_tokens: int = 16384,
        min_prefix_tokens: int = 16,
        max_prefill_tokens_per_step: int = 2048,
        context_length: int | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_cached_tokens < 1:
            raise ValueError(f"max_cached_tokens must be >= 1, got {max_cached_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_cached_tokens = max_cached_tokens
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self._bind_model(model, context_length)
        self._image_cache = ImageFeatureCache(image_cache_bytes)
        self._prefix_cache = PrefixCache(prefix_cache_tokens, min_match=max(1, min_prefix_tokens))
        self._batch = BatchKV(self._num_layers, self.device)
        self._running: list[_Sequence] = []
        self._joining: list[_Sequence] = []  # admitted this step, not yet in the batch
        self._queue: deque[_Sequence] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._shut_down = False
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0}

    def _bind_model(self, model, context_length: int | None) -> None:
        text_config = model.config.get_text_config(decoder=True)
        probe = DynamicCache(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            kinds = sorted({type(layer).__name__ for layer in probe.layers})
            raise UnsupportedModelError(
                f"the engine batches plain full-attention KV caches; this model's cache has layers {kinds}"
            )
        self._num_layers = text_config.num_hidden_layers
        self._llm = model.model.language_model
        self._mm = model.model  # the Llava(Next)Model: vision tower, projector, get_image_features
        self._lm_head = model.get_output_embeddings()
        self._embed = model.get_input_embeddings()
        # quantized models keep float embeddings: their dtype is the compute dtype
        self.dtype = self._embed.weight.dtype
        self.device = self._embed.weight.device
        vision_params = [p for p in self._mm.vision_tower.parameters() if p.is_floating_point()]
        self._vision_dtype = vision_params[0].dtype if vision_params else self.dtype
        self._anyres = hasattr(self._mm, "pack_image_features")
        self.image_token_id = int(model.config.image_token_id)
        self.context_length = int(context_length or text_config.max_position_embeddings)
        # lm_head may be padded past the tokenizer's vocabulary; those ids (and <image>) are never generated
        lm_out = getattr(self._lm_head, "out_features", None) or text_config.vocab_size
        self._vocab_limit = min(len(self.tokenizer), lm_out)

    # ---------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> Engine:
        """Run the scheduler on a background thread."""
        with self._lock:
            if self._shut_down:
                raise EngineShutDownError("the engine was shut down; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llava-engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the scheduler; queued and running requests finish as "cancelled"."""
        with self._lock:
            self._stopping = self._shut_down = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for seq in [*self._running, *self._queue]:
            self._finish(seq, "cancelled", error="engine shut down")
        self._running.clear()
        self._queue.clear()
        self._batch = BatchKV(self._num_layers, self.device)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --------------------------------------------------------------------------------------------- public API

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and enqueue a request (any thread). Raises InvalidRequestError / PromptTooLongError."""
        seq = self._make_sequence(request)
        with self._lock:
            if self._shut_down:
                raise EngineShutDownError("the engine was shut down; create a new one")
            self._queue.append(seq)
            self._lock.notify_all()
        return seq.handle

    @property
    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def stats(self) -> EngineStats:
        """A snapshot of counters (read without stopping the scheduler, so fields may be one step apart)."""
        ic, pc = self._image_cache, self._prefix_cache
        return EngineStats(
            queued=self.queue_length,
            running=len(self._running),
            batch_tokens=self._batch.num_tokens,
            batch_bytes=self._batch.nbytes,
            image_cache=CacheStats(ic.counters.hits, ic.counters.misses, ic.counters.evictions, len(ic), ic.nbytes),
            prefix_cache=CacheStats(
                pc.counters.hits, pc.counters.misses, pc.counters.evictions, len(pc), pc.nbytes,
                tokens=pc.num_tokens, reused_tokens=pc.reused_tokens,
            ),
            **self._counts,
        )

    def step(self) -> bool:
        """Run one scheduler step on the calling thread (only for an engine that was not start()ed).
        Returns False when there was nothing to do."""
        if self._thread is not None:
            raise EngineError("step() is for engines driven by hand; this one runs its own scheduler thread")
        return self._step()

    def run_until_idle(self) -> None:
        """Drive an un-started engine until the queue and the batch are empty."""
        while self.step():
            pass

    # ---------------------------------------------------------------------------------------------- validation

    def _make_sequence(self, request: GenerationRequest) -> _Sequence:
        if not isinstance(request.sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be a SamplingParams, got {type(request.sampling).__name__}")
        ids = self._check_ids(request.input_ids)
        image_runs = self._check_images(ids, request.images)
        n = len(ids)
        if n >= self.context_length:
            image_tokens = sum(r.num_tokens for r in image_runs)
            raise PromptTooLongError(n, image_tokens, len(image_runs), self.context_length)
        params = request.sampling
        max_new = min(params.max_new_tokens, self.context_length - n)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        return _Sequence(
            handle=RequestHandle(request.request_id, self._wake),
            request=request,
            prompt=ids,
            images=list(request.images),
            max_new_tokens=max_new,
            reserve=n + max_new,
            image_runs=image_runs,
            stop_ids=frozenset(stop_ids),
            sampler=RowSampler(params, make_generator(params), seen=set(ids) - {self.image_token_id}),
            detok=IncrementalDetokenizer(self.tokenizer),
            stops=StopStringMatcher(params.stop),
            submitted_at=time.perf_counter(),
        )

    def _check_ids(self, input_ids) -> list[int]:
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.flatten().tolist()
        ids = list(input_ids)
        if not ids:
            raise InvalidRequestError("input_ids is empty")
        vocab = self._embed.num_embeddings
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab]
        if bad:
            raise InvalidRequestError(f"input_ids must be ints in [0, {vocab}); got e.g. {bad[:5]}")
        return [int(i) for i in ids]

    def _check_images(self, ids: list[int], images) -> list[ImageRun]:
        """Each image's run of `<image>` tokens in the prompt (image i takes the next num_tokens image positions)."""
        positions = [p for p, t in enumerate(ids) if t == self.image_token_id]
        counts = [getattr(im, "num_tokens", None) for im in images]
        if any(not isinstance(c, int) or c < 1 for c in counts):
            raise InvalidRequestError(f"every image needs num_tokens >= 1, got {counts}")
        if sum(counts) != len(positions):
            raise InvalidRequestError(
                f"the prompt has {len(positions)} image tokens (id {self.image_token_id}) but its {len(images)} "
                f"image(s) need {sum(counts)} ({counts}); render the prompt with each image's num_tokens"
            )
        runs, k = [], 0
        for im, c in zip(images, counts):
            start = positions[k]
            if positions[k + c - 1] != start + c - 1:
                raise InvalidRequestError(f"the {c} image tokens of image {len(runs)} are not contiguous in the prompt")
            self._check_pixels(im, len(runs))
            runs.append(ImageRun(str(im.key), start, c))
            k += c
        return runs

    def _check_pixels(self, im, index: int) -> None:
        pv = getattr(im, "pixel_values", None)
        want = 4 if self._anyres else 3
        if not isinstance(pv, torch.Tensor) or pv.dim() != want:
            shape = tuple(pv.shape) if isinstance(pv, torch.Tensor) else type(pv).__name__
            layout = "[n_views, 3, S, S] (anyres)" if self._anyres else "[3, S, S]"
            raise InvalidRequestError(
                f"image {index}: pixel_values must be a {layout} tensor for this model, got {shape}"
            )

    # ----------------------------------------------------------------------------------------------- scheduler

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self._queue or self._running)
                if self._stopping:
                    return
            try:
                self._step()
            except Exception as exc:  # a bug outside the per-request guards: fail what is in flight, keep serving
                logger.exception("engine step failed")
                self._fail_running(exc)

    @torch.inference_mode()
    def _step(self) -> bool:
        self._drop_cancelled()
        newcomers = self._joining = self._admit()
        joined: list[tuple[_Sequence, Cache]] = []
        for seq in newcomers:
            try:
                cache = self._prefill(seq)
            except Exception as exc:
                logger.exception("prefill of request %s failed", seq.request.request_id)
                self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                continue
            if seq.finish_reason is None:
                joined.append((seq, cache))
            else:  # done after one token
                self._remember(seq, lambda cache=cache: sequence_kv(cache))
                self._publish_final(seq)
        if joined:
            # views into the prefill caches: add_rows copies them into the batch buffers
            self._batch.add_rows([[(layer.keys, layer.values) for layer in c.layers] for _, c in joined])
            self._running.extend(seq for seq, _ in joined)
        self._joining = []
        if self._running:
            try:
                self._decode()
            except Exception as exc:
                logger.exception("decode step failed")
                self._fail_running(exc)
        return bool(newcomers or self._running or self._queue)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s in self._queue if s.handle.cancel_requested]
            for s in gone:
                self._queue.remove(s)
        for s in gone:
            self._finish(s, "cancelled")
        keep = [i for i, s in enumerate(self._running) if not s.handle.cancel_requested]
        if len(keep) < len(self._running):
            gone = [s for s in self._running if s.handle.cancel_requested]
            # free the rows first, so whoever waits on the final event sees the memory released
            self._batch.keep_rows(keep)
            self._running = [self._running[i] for i in keep]
            for s in gone:
                self._finish(s, "cancelled")

    def _admit(self) -> list[_Sequence]:
        """Pop queued requests (FIFO) while the batch, the cached-token budget and the prefill budget allow."""
        admitted: list[_Sequence] = []
        reserved = sum(s.reserve for s in self._running)
        prefill = 0
        with self._lock:
            while self._queue and len(self._running) + len(admitted) < self.max_batch_size:
                seq = self._queue[0]
                busy = bool(self._running or admitted)
                # a request larger than the whole budget still runs, alone
                if busy and reserved + seq.reserve > self.max_cached_tokens:
                    break
                if admitted and prefill + len(seq.prompt) > self.max_prefill_tokens_per_step:
                    break
                self._queue.popleft()
                admitted.append(seq)
                reserved += seq.reserve
                prefill += len(seq.prompt)
        return admitted

    # ---------------------------------------------------------------------------------------------- model work

    def _prefill(self, seq: _Sequence) -> Cache:
        """Compute the prompt's KV (reusing a cached prefix when one matches) and choose the first token."""
        ids = seq.prompt
        match = self._prefix_cache.lookup(ids, seq.image_runs)
        start = match.length if match else 0
        cache = new_cache(self._num_layers, match.entry.kv if match else None, start)
        seq.cached_tokens = start
        embeds = self._embed_prompt(seq, start)  # [1, n - start, hidden]
        position_ids = torch.arange(start, len(ids), device=self.device).unsqueeze(0)
        logits = self._forward(embeds, cache, None, position_ids)  # [1, V]
        token = choose_next_tokens(logits, [seq.sampler])[0]
        self._advance(seq, token)
        return cache

    def _decode(self) -> None:
        """One token for every running request."""
        seqs = self._running
        last = torch.tensor([[s.generated[-1]] for s in seqs], device=self.device)  # [B, 1]
        mask, position_ids = self._batch.step_inputs()
        logits = self._forward(self._embed(last), self._batch.cache, mask, position_ids)  # [B, V]
        self._batch.after_step()
        tokens = choose_next_tokens(logits, [s.sampler for s in seqs])
        keep, done = [], []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            self._advance(seq, token)
            if seq.finish_reason is None:
                keep.append(i)
            else:
                self._remember(seq, lambda i=i: self._batch.row_kv(i))
                done.append(seq)
        if done:
            self._batch.keep_rows(keep)
            self._running = [seqs[i] for i in keep]
            for seq in done:
                self._publish_final(seq)

    def _forward(self, embeds, cache, attention_mask, position_ids) -> torch.Tensor:
        """Run the LLM on embeds [B, q, hidden] and return float32 logits [B, V] of each row's last position."""
        out = self._llm(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        logits = self._lm_head(out.last_hidden_state[:, -1]).float()
        logits[:, self._vocab_limit :] = float("-inf")
        logits[:, self.image_token_id] = float("-inf")
        return logits

    def _embed_prompt(self, seq: _Sequence, start: int) -> torch.Tensor:
        """Token embeddings of ids[start:] [1, q, hidden] with image features scattered into `<image>` positions."""
        ids = torch.tensor(seq.prompt[start:], device=self.device).unsqueeze(0)
        embeds = self._embed(ids)
        is_image = ids[0] == self.image_token_id  # [q]
        n_image = int(is_image.sum())
        if n_image:
            feats = self._image_rows(seq, start)  # [n_image, hidden]
            if feats.shape[0] != n_image:
                raise ImageFeatureMismatchError(
                    f"{n_image} image tokens to fill but {feats.shape[0]} feature rows from the images"
                )
            embeds[0, is_image] = feats.to(embeds.dtype)
        return embeds

    def _image_rows(self, seq: _Sequence, start: int) -> torch.Tensor:
        """Feature rows for the image positions at or after `start`, in prompt order."""
        parts = []
        for im, run in zip(seq.images, seq.image_runs):
            if run.start + run.num_tokens <= start:
                continue  # entirely inside the reused prefix
            feats = self._image_features(im)
            if feats.shape[0] != run.num_tokens:
                raise ImageFeatureMismatchError(
                    f"image {run.key!r} was given {run.num_tokens} prompt tokens but the vision encoder + projector "
                    f"produce {feats.shape[0]} features for it; its num_tokens does not match this model"
                )
            parts.append(feats[max(0, start - run.start) :])
        return torch.cat(parts)

    def _image_features(self, im) -> torch.Tensor:
        """Projected features [num_tokens, hidden] of one image, from the cache or the vision tower."""
        feats = self._image_cache.get(im.key)
        if feats is None:
            pv = im.pixel_values.to(self.device, self._vision_dtype).unsqueeze(0)
            if self._anyres:  # pv [1, n_views, 3, S, S]
                sizes = torch.tensor([list(im.image_size)], device=self.device)
                out = self._mm.get_image_features(pixel_values=pv, image_sizes=sizes, return_dict=True)
            else:  # pv [1, 3, S, S]
                out = self._mm.get_image_features(pixel_values=pv, return_dict=True)
            feats = out.pooler_output[0].to(self.dtype)
            self._image_cache.put(im.key, feats)
        return feats

    # ------------------------------------------------------------------------------------------- bookkeeping

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Record a new token: stop checks, text delta, event. A finishing token's event waits in
        `seq.final` until the batch has been updated (`_publish_final`)."""
        seq.generated.append(token)
        self._counts["generated_tokens"] += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        stop_token = token in seq.stop_ids
        ending = stop_token or len(seq.generated) >= seq.max_new_tokens
        delta = "" if stop_token else seq.detok.push(token)
        if ending:  # an output cut mid-character ends with U+FFFD rather than silently losing bytes
            delta += seq.detok.flush()
        text, hit = seq.stops.feed(delta)
        reason: FinishReason | None = "stop" if hit or stop_token else "length" if ending else None
        if reason is not None and not hit:
            text += seq.stops.flush()
        seq.text.append(text)
        if reason is None:
            seq.handle._push(GenerationEvent(seq.request.request_id, token, text))
        else:
            seq.finish_reason = reason
            seq.final = (token, text)

    def _publish_final(self, seq: _Sequence) -> None:
        token, text = seq.final
        self._finish(seq, seq.finish_reason, token=token, text=text)

    def _finish(self, seq: _Sequence, reason: FinishReason, *, token: int | None = None, text: str = "",
                error: str | None = None) -> None:
        if seq.handle.done:
            return
        seq.finish_reason = reason
        key = {"stop": "completed", "length": "completed", "cancelled": "cancelled", "error": "failed"}[reason]
        self._counts[key] += 1
        now = time.perf_counter()
        result = GenerationResult(
            request_id=seq.request.request_id,
            text="".join(seq.text),
            token_ids=list(seq.generated),
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            cached_tokens=seq.cached_tokens,
            time_to_first_token=None if seq.first_token_at is None else seq.first_token_at - seq.submitted_at,
            latency=now - seq.submitted_at,
            error=error,
        )
        seq.handle._push(GenerationEvent(seq.request.request_id, token, text, True, reason, error), result)

    def _remember(self, seq: _Sequence, get_kv: Callable[[], SequenceKV]) -> None:
        """Offer a finished request's KV (prompt + generated tokens fed so far) to the prefix cache.
        Cancelled and failed requests are not kept: their memory is freed at once."""
        ids = seq.fed_ids
        if seq.finish_reason in ("stop", "length") and self._prefix_cache.would_keep(len(ids)):
            self._prefix_cache.insert(ids, seq.image_runs, get_kv())

    def _fail_running(self, exc: Exception) -> None:
        for seq in [*self._running, *self._joining]:
            self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        self._running, self._joining = [], []
        self._batch = BatchKV(self._num_layers, self.device)
