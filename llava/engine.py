"""The generation engine: continuous batching of LLaVA requests with images, chunked prefill, an image-feature
cache, prefix reuse and cancellation. No HTTP here; workers and the CLI wrap it.

Promises:
- `Engine.submit(GenerationRequest)` is thread-safe, validates the request on the caller's thread (bad sampling
  values, image/token count mismatches and over-long prompts raise there) and returns a `RequestHandle` (sync and
  async iterator of `GenerationEvent`s, `.cancel()`, `.result()`).
- A background scheduler (`start()`) runs steps. A step admits queued requests (bounded by `max_batch_size` and by
  the tokens the batch may cache), prefills up to `max_prefill_tokens_per_step` prompt positions of the admitted
  requests in one forward (a long prompt is split over several steps, so running streams keep getting a token every
  step), then advances every running request by one token. Finished or cancelled requests leave at once.
- Newcomers' images that are not cached are encoded together, once per `ProcessedImage.key` (LRU bounded in bytes),
  and scattered into the prompt's `<image>` positions; a feature/token count mismatch fails that request with a
  message naming both. Any number of images per request; on a model with a video token (LLaVA-OneVision) videos
  too (`GenerationRequest.videos`): each frame's pooled features are cached by the frame's key, and a video's
  `<video>` run is its frames' features then the model's newline.
- A new request whose ids and images extend those of a finished request (kept in an LRU bounded in tokens) or of a
  request still running starts from that request's KV and prefills only the rest. Greedy output with reuse equals
  output without (exactly in float32; within the quantized kernels' rounding otherwise).
- The LLM runs in `LlamaRunner` (Llama / Mistral / Qwen2 on the model's own weights, few ops per layer) or, for
  other models, in `TransformersRunner`; `stats().runner` says which and why.
- An exception inside a step fails only the requests it touched (finish_reason "error" with the message); the
  engine keeps running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from llava.config import RUNNERS, EngineConfig
from llava.hardware import ThreadGovernor
from llava.hf_runner import TransformersRunner
from llava.images import ProcessedImage, ProcessedVideo
from llava.kvcache import ImageFeatureCache, ImageRun, PrefixCache, common_prefix, images_agree
from llava.requests import (
    CacheStats, EngineError, EngineShutDownError, EngineStats, FinishReason, GenerationEvent, GenerationRequest,
    GenerationResult, ImageFeatureMismatchError, InvalidRequestError, PromptTooLongError, RequestHandle,
    UnknownAdapterError, UnsupportedModelError, check_ids, check_media, frames_that_fit,
)
from llava.runner import Chunk, LlamaRunner
from llava.sampling import (
    IncrementalDetokenizer, InvalidSamplingParamsError, RowSampler, SamplingParams, StopStringMatcher,
    TokenLogprob, choose_next_tokens, make_generator, token_logprobs,
)
from llava.structured import ConstraintError, Guide

__all__ = [
    "Engine", "EngineConfig", "EngineError", "EngineStats", "EngineShutDownError", "GenerationEvent",
    "GenerationRequest", "GenerationResult", "ImageFeatureMismatchError", "InvalidRequestError",
    "InvalidSamplingParamsError", "PromptTooLongError", "RequestHandle", "SamplingParams", "UnknownAdapterError",
    "UnsupportedModelError",
]

logger = logging.getLogger(__name__)

# When nothing is decoding, a step may prefill this many times the per-step budget (16 newcomers with images:
# p95 time to first token 1.54 s -> see bench/results; the budget only exists to bound running streams' latency).
IDLE_PREFILL_FACTOR = 4


@dataclass(eq=False)
class _Sequence:
    """A request the scheduler has accepted: its state while queued, prefilling or decoding."""

    handle: RequestHandle
    request: GenerationRequest
    prompt: list[int]  # the request's ids, validated
    images: list  # the request's images and videos, in prompt order (one per image run)
    max_new_tokens: int
    reserve: int  # tokens this request may hold at most (prompt + max_new_tokens)
    image_runs: list[ImageRun]
    stop_ids: frozenset[int]
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    submitted_at: float
    prefilled: int = 0  # prompt positions whose KV exist
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asked for them
    matcher: object | None = None  # llguidance's state when the output is constrained (llava.structured)
    adapter: object | None = None  # the request's LoRA adapter (llava.adapters.LoraAdapter), None: the base
    cached_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    final: tuple[int, str, TokenLogprob | None] | None = None  # the finishing token and its text, published once its row is released

    @property
    def fed_ids(self) -> list[int]:
        """Ids whose KV exist: the prompt and every generated token but the last (not fed back yet)."""
        return self.prompt + self.generated[:-1]


def _namespace(seq: _Sequence) -> str:
    """Prefix-cache entries are shared only between requests computed with the same weights."""
    return "" if seq.adapter is None else seq.adapter.uid


class Engine:
    """Continuous-batching generation over a transformers Llava / LlavaNext / LlavaOnevision model (see the module
    docstring).

    eos_token_ids: ids that end a reply (the template's, see `llava.templates.stop_token_ids`). The batching and
    cache settings are an `EngineConfig` (`config=`) or its fields as keyword arguments. context_length defaults to
    the LLM's max_position_embeddings. Use it with `start()` (background scheduler) or drive it by hand with
    `step()` / `run_until_idle()`.
    """

    def __init__(self, model, tokenizer, *, eos_token_ids: Sequence[int], config: EngineConfig | None = None,
                 context_length: int | None = None, **settings):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(settings) - known
        if unknown:
            raise TypeError(f"unknown engine settings {sorted(unknown)}; valid: {sorted(known)}")
        self.config = replace(config or EngineConfig(), **settings)
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.max_batch_size = self.config.max_batch_size
        self._bind_model(model, context_length)
        self._image_cache = ImageFeatureCache(self.config.image_cache_bytes)
        self._prefix_cache = PrefixCache(self.config.prefix_cache_tokens, min_match=max(1, self.config.min_prefix_tokens))
        self._running: list[_Sequence] = []  # decoding, in no particular order
        self._prefilling: list[_Sequence] = []  # admitted, prompt not complete (FIFO)
        self._queue: deque[_Sequence] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._shut_down = False
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0}
        self._adapters: dict = {}  # name -> LoraAdapter, requests may name them (any thread, under _lock)
        self._threads = ThreadGovernor() if self.config.cpu_threads == "auto" and self.device.type == "cpu" else None
        self._cpu_threads: int | None = None  # torch threads of the last step (set where the model runs)

    def _bind_model(self, model, context_length: int | None) -> None:
        text_config = model.config.get_text_config(decoder=True)
        self._mm = model.model  # the Llava(Next)Model: vision tower, projector, get_image_features
        self._embed = model.get_input_embeddings()
        self.device = self._embed.weight.device
        self.dtype = self._embed.weight.dtype  # quantized models keep float embeddings: their dtype computes
        vision_params = [p for p in self._mm.vision_tower.parameters() if p.is_floating_point()]
        self._vision_dtype = vision_params[0].dtype if vision_params else self.dtype
        self._anyres = hasattr(self._mm, "pack_image_features")
        self._onevision = hasattr(self._mm, "apply_pooling")  # base views + newline; pooled video frames
        self.image_token_id = int(model.config.image_token_id)
        video_id = getattr(model.config, "video_token_id", None)
        self.video_token_id = None if video_id is None else int(video_id)
        self.context_length = int(context_length or text_config.max_position_embeddings)
        # lm_head may be padded past the tokenizer's vocabulary; those ids (and <image>) are never generated
        head = model.get_output_embeddings()
        lm_out = getattr(head, "out_features", None) or text_config.vocab_size
        vocab_limit = min(len(self.tokenizer), lm_out)
        self._guide_vocab = max(len(self.tokenizer), lm_out)
        self._guide: Guide | None = None  # llguidance's token table, built for the first constrained request
        self._guide_lock = threading.Lock()
        choice = self.config.runner
        reason = LlamaRunner.unsupported_reason(model)
        if choice == "llama" and reason:
            raise UnsupportedModelError(f"runner 'llama' cannot run this model: {reason}")
        if choice != "transformers" and reason is None:
            self._runner = LlamaRunner(model, vocab_limit=vocab_limit, image_token_id=self.image_token_id,
                                       max_rows=self.max_batch_size, context_length=self.context_length)
            self.runner_name = "llama (the engine's own forward over transformers' weights)"
            if self._runner.quantized and self._runner.fused:
                r = self._runner
                self.runner_name += f"; quantized kernels for prefills up to {r.kernel_prefill_rows} rows"
                if r.released_dense_bytes:
                    self.runner_name += (f" (dense prefill copies released, {r.released_dense_bytes / 2**20:.0f} MiB:"
                                         " not faster here)")
        else:
            self._runner = TransformersRunner(model, vocab_limit=vocab_limit, image_token_id=self.image_token_id)
            why = "asked for" if choice == "transformers" else reason
            self.runner_name = f"transformers ({why})"
        logger.info("engine LLM runner: %s", self.runner_name)

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
        for seq in [*self._running, *self._prefilling, *self._queue]:
            self._release(seq)
            self._finish(seq, "cancelled", error="engine shut down")
        self._running.clear()
        self._prefilling.clear()
        self._queue.clear()

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

    def cached_image(self, key: str) -> ProcessedImage | None:
        """An image this engine has encoded, by its key (`ProcessedImage.key`), while its features are still in the
        image cache: a request may then carry the returned object instead of the image (any thread). The features
        are held by the object, so a later eviction cannot fail the request."""
        feats = self._image_cache.peek(key)
        if feats is None:
            return None
        return ProcessedImage(None, (0, 0), int(feats.shape[0]), key, features=feats)

    # -- LoRA adapters

    def load_adapter(self, adapter) -> None:
        """Make a LoRA adapter (`llava.adapters.read_adapter`) available to requests as `adapter.name` (any
        thread); a name already loaded is replaced for new requests, running ones finish on the old weights."""
        if not getattr(self._runner, "supports_adapters", False):
            raise UnsupportedModelError(f"LoRA adapters per request need the llama runner; this engine runs "
                                        f"{self.runner_name}")
        with self._lock:
            self._adapters[adapter.name] = adapter
            self._lock.notify_all()

    def unload_adapter(self, name: str) -> bool:
        """Stop accepting requests for adapter `name` (any thread); its running requests finish first. False if
        it was not loaded."""
        with self._lock:
            return self._adapters.pop(name, None) is not None

    @property
    def adapter_names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def _sync_adapters(self, extra: Sequence = ()) -> None:
        """Give the runner the loaded adapters plus those still used by admitted requests and `extra` (scheduler
        thread): an unloaded adapter's weights go once its last request is done."""
        if not getattr(self._runner, "supports_adapters", False):
            return
        with self._lock:
            wanted = list(self._adapters.values())
        for adapter in [*(s.adapter for s in [*self._running, *self._prefilling]), *extra]:
            if adapter is not None and adapter not in wanted:
                wanted.append(adapter)
        current = self._runner.adapters
        if len(current) != len(wanted) or any(a is not b for a, b in zip(current, wanted)):
            self._runner.set_adapters(wanted)

    @property
    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    def stats(self) -> EngineStats:
        """A snapshot of counters (read without stopping the scheduler, so fields may be one step apart)."""
        ic, pc = self._image_cache, self._prefix_cache
        return EngineStats(
            queued=self.queue_length,
            running=len(self._running),
            prefilling=len(self._prefilling),
            batch_tokens=self._runner.num_tokens,
            batch_bytes=self._runner.nbytes,
            image_cache=CacheStats(ic.counters.hits, ic.counters.misses, ic.counters.evictions, len(ic), ic.nbytes),
            prefix_cache=CacheStats(
                pc.counters.hits, pc.counters.misses, pc.counters.evictions, len(pc), pc.nbytes,
                tokens=pc.num_tokens, reused_tokens=pc.reused_tokens,
            ),
            runner=self.runner_name,
            cpu_threads=self._cpu_threads if self.device.type == "cpu" else None,
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
        adapter = None
        if request.adapter is not None:
            with self._lock:
                adapter = self._adapters.get(request.adapter)
                if adapter is None:
                    raise UnknownAdapterError(f"unknown adapter {request.adapter!r}; loaded: {sorted(self._adapters)}")
        ids = check_ids(request.input_ids, self._embed.num_embeddings)
        media, image_runs = check_media(ids, request.images, request.videos, self.image_token_id,
                                        self.video_token_id, self._anyres)
        n = len(ids)
        if n >= self.context_length:
            raise self._too_long(n, media, image_runs)
        params = request.sampling
        max_new = min(params.max_new_tokens, self.context_length - n)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        matcher = None
        if params.constraint is not None:
            try:
                matcher = self._guide_for_constraints().matcher(params.constraint)
            except ConstraintError as e:
                raise InvalidRequestError(f"constraint: {e}") from None
        return _Sequence(
            adapter=adapter,
            matcher=matcher,
            handle=RequestHandle(request.request_id, self._wake),
            request=request,
            prompt=ids,
            images=media,
            max_new_tokens=max_new,
            reserve=n + max_new,
            image_runs=image_runs,
            stop_ids=frozenset(stop_ids),
            sampler=RowSampler(params, make_generator(params), seen=set(ids) - {self.image_token_id, self.video_token_id}),
            detok=IncrementalDetokenizer(self.tokenizer),
            stops=StopStringMatcher(params.stop),
            submitted_at=time.perf_counter(),
        )

    def _too_long(self, n: int, media: list, runs: list[ImageRun]) -> PromptTooLongError:
        """The error naming each image's and video's tokens and, with videos, how many frames of the longest would
        fit (the prompt must leave one position to generate)."""
        items = [("video" if isinstance(m, ProcessedVideo) else "image", r.num_tokens,
                  m.num_frames if isinstance(m, ProcessedVideo) else None) for m, r in zip(media, runs)]
        videos = [m for m in media if isinstance(m, ProcessedVideo)]
        fit = None
        if videos:
            longest = max(videos, key=lambda v: v.num_tokens)
            fit = frames_that_fit(self.context_length, n, longest.num_tokens, longest.tokens_per_frame, 1)
        return PromptTooLongError(n, sum(r.num_tokens for r in runs), len(runs), self.context_length, items, fit)

    def _guide_for_constraints(self) -> Guide:
        with self._guide_lock:  # not the scheduler's lock: building the token table takes about a second
            if self._guide is None:
                self._guide = Guide(self.tokenizer, self._guide_vocab, self.eos_token_ids)
            return self._guide

    def _choose(self, logits: torch.Tensor, seqs: list[_Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """The next token of each row (constrained rows masked first) and, where asked, its log-probabilities (of
        the model's own distribution, before any mask)."""
        samplers = [s.sampler for s in seqs]
        if self.video_token_id is not None:  # like <image> (masked by the runners), never generated
            logits[:, self.video_token_id] = float("-inf")
        raw = logits
        if any(s.matcher is not None for s in seqs):
            if any(s.sampler.params.logprobs is not None for s in seqs):
                raw = logits.clone()
            self._guide.mask(logits, [s.matcher for s in seqs])
        tokens = choose_next_tokens(logits, samplers)
        for seq, token in zip(seqs, tokens):
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
        return tokens, token_logprobs(raw, tokens, samplers)

    # ----------------------------------------------------------------------------------------------- scheduler

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self._queue or self._running or self._prefilling)
                if self._stopping:
                    return
            try:
                self._step()
            except Exception as exc:  # a bug outside the per-request guards: fail what is in flight, keep serving
                logger.exception("engine step failed")
                self._fail_all(exc)

    @torch.inference_mode()
    def _step(self) -> bool:
        # in the thread that runs the model: OpenMP's thread count is per calling thread
        self._cpu_threads = self._threads.apply() if self._threads is not None else torch.get_num_threads()
        self._drop_cancelled()
        self._sync_adapters()
        admitted = self._admit()
        chunks = self._plan_prefill()
        if chunks:
            self._prefill(chunks)
        if self._running:
            try:
                self._decode()
            except Exception as exc:
                logger.exception("decode step failed")
                self._fail(list(self._running), exc)
        return bool(admitted or chunks or self._running or self._prefilling or self._queue)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s in self._queue if s.handle.cancel_requested]
            for s in gone:
                self._queue.remove(s)
        for s in gone:
            self._finish(s, "cancelled")
        for group in (self._running, self._prefilling):
            gone = [s for s in group if s.handle.cancel_requested]
            for s in gone:
                group.remove(s)
                self._release(s)  # free the row first, so whoever waits on the final event sees the memory released
                self._finish(s, "cancelled")

    def _admit(self) -> list[_Sequence]:
        """Pop queued requests (FIFO) while the batch and the cached-token budget allow; give each a KV row."""
        admitted: list[_Sequence] = []
        active = self._running + self._prefilling
        reserved = sum(s.reserve for s in active)
        with self._lock:
            while self._queue and len(active) + len(admitted) < self.max_batch_size:
                seq = self._queue[0]
                # a request larger than the whole budget still runs, alone
                if (active or admitted) and reserved + seq.reserve > self.config.max_cached_tokens:
                    break
                self._queue.popleft()
                admitted.append(seq)
                reserved += seq.reserve
        for seq in admitted:
            try:
                if seq.adapter is not None and seq.adapter not in self._runner.adapters:
                    self._sync_adapters([seq.adapter])  # loaded after this step began, or unloaded since submitted
                self._runner.reserve(seq, seq.reserve, adapter=seq.adapter)
                self._reuse_prefix(seq)
            except Exception as exc:
                logger.exception("admitting request %s failed", seq.request.request_id)
                self._release(seq)
                self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                continue
            self._prefilling.append(seq)
        return admitted

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Start `seq` from the longest cached or running prefix of its ids (same images at image positions)."""
        ids = seq.prompt
        best_running, best_len = None, 0
        for other in self._running:
            if other.adapter is not seq.adapter:  # an adapter changes every layer's keys and values
                continue
            n = common_prefix(other.fed_ids, ids)
            n = images_agree(min(n, len(ids) - 1), other.image_runs, seq.image_runs)
            if n > best_len:
                best_running, best_len = other, n
        if best_len < self._prefix_cache.min_match or self.config.prefix_cache_tokens <= 0:
            best_running, best_len = None, 0
        match = self._prefix_cache.lookup(ids, seq.image_runs, longer_than=best_len, count=False,
                                          namespace=_namespace(seq))
        if match is not None:
            self._runner.seed(seq, match.entry.kv, match.length)
            start = match.length
        elif best_running is not None:
            self._runner.seed(seq, self._runner.export(best_running, best_len), best_len)
            start = best_len
        else:
            start = 0
        self._prefix_cache.record(start)
        seq.prefilled = seq.cached_tokens = start

    def _plan_prefill(self) -> list[tuple[_Sequence, int, int]]:
        """(seq, start, end) prompt spans to compute this step: FIFO, within the per-step token budget (x4 while
        nothing decodes; the first request always gets some, so a prompt longer than the budget still progresses)."""
        budget = self.config.max_prefill_tokens_per_step
        if not self._running:  # no stream's inter-token latency to protect: larger products are more efficient
            budget *= IDLE_PREFILL_FACTOR
        plan = []
        for seq in self._prefilling:
            if budget <= 0:
                break
            start = seq.prefilled
            end = min(len(seq.prompt), start + budget)
            plan.append((seq, start, end))
            budget -= end - start
        return plan

    # ---------------------------------------------------------------------------------------------- model work

    def _prefill(self, plan: list[tuple[_Sequence, int, int]]) -> None:
        """Compute the planned prompt spans in one forward; the prompts that are complete choose a first token."""
        try:
            features = self._image_features(plan)
        except Exception as exc:
            logger.exception("image encoding failed")
            self._fail([seq for seq, _, _ in plan], exc)
            return
        chunks, seqs = [], []
        for seq, start, end in plan:
            try:
                embeds = self._embed_span(seq, start, end, features)
            except Exception as exc:
                logger.exception("preparing the prompt of request %s failed", seq.request.request_id)
                self._fail([seq], exc)
                continue
            chunks.append(Chunk(seq, embeds, start, end == len(seq.prompt)))
            seqs.append((seq, end))
        if not chunks:
            return
        try:
            logits = self._runner.prefill(chunks)
        except Exception as exc:
            logger.exception("prefill failed")
            self._fail([seq for seq, _ in seqs], exc)
            return
        for seq, end in seqs:
            seq.prefilled = end
            if seq not in logits:
                continue
            self._prefilling.remove(seq)
            (token,), (logprob,) = self._choose(logits[seq].unsqueeze(0), [seq])
            self._advance(seq, token, logprob)
            if seq.finish_reason is None:
                self._running.append(seq)
            else:  # done after one token
                self._retire(seq)

    def _decode(self) -> None:
        """One token for every running request."""
        seqs = list(self._running)
        logits = self._runner.decode(seqs, [s.generated[-1] for s in seqs])  # [B, V]
        tokens, logprobs = self._choose(logits, seqs)
        for seq, token, lp in zip(seqs, tokens, logprobs):
            self._advance(seq, token, lp)
        for seq in seqs:
            if seq.finish_reason is not None:
                self._running.remove(seq)
                self._retire(seq)

    def _image_features(self, plan) -> dict[str, torch.Tensor]:
        """Features of the images and videos inside the planned spans, by key: cached ones looked up, the others
        encoded together (one vision forward per pixel shape; video frames in one forward) and cached."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, object] = {}
        videos: dict[str, ProcessedVideo] = {}
        frames: dict[str, torch.Tensor | None] = {}  # frame key -> cached features, None: to encode
        for seq, start, end in plan:
            for im, run in zip(seq.images, seq.image_runs):
                if run.start >= end or run.start + run.num_tokens <= start or run.key in found or run.key in todo:
                    continue
                if isinstance(im, ProcessedVideo):
                    videos[run.key] = im
                    for fk in im.frame_keys:
                        if fk not in frames:
                            frames[fk] = self._image_cache.get(fk)
                    continue
                if im.features is not None:  # sent by id: its features were looked up when it was submitted
                    found[run.key] = im.features.to(self.device, self.dtype)
                    continue
                feats = self._image_cache.get(run.key)
                if feats is None:
                    todo[run.key] = im
                else:
                    found[run.key] = feats
        groups: dict[tuple, list] = {}
        for key, im in todo.items():
            groups.setdefault(tuple(im.pixel_values.shape), []).append((key, im))
        for group in groups.values():
            for (key, _), feats in zip(group, self._vision_forward([im for _, im in group])):
                found[key] = feats
                self._image_cache.put(key, feats)
        if videos:
            self._video_features(videos, frames, found)
        return found

    def _video_features(self, videos: dict[str, ProcessedVideo], frames: dict, found: dict) -> None:
        """Encode the frames not cached (one forward), cache them, and assemble each video's run into `found`."""
        pixels: dict[str, torch.Tensor] = {}
        for v in videos.values():
            for fk, pv in zip(v.frame_keys, v.pixel_values):
                if frames[fk] is None:
                    pixels.setdefault(fk, pv)
        if pixels:
            pv = torch.stack(list(pixels.values())).to(self.device, self._vision_dtype)
            pooled = self._mm.apply_pooling(self._project(pv)).to(self.dtype)  # [F, tokens_per_frame, hidden]
            for fk, feats in zip(pixels, pooled):
                frames[fk] = feats
                self._image_cache.put(fk, feats)
        newline = self._mm.image_newline.to(self.dtype)[None]
        for key, v in videos.items():
            found[key] = torch.cat([frames[fk] for fk in v.frame_keys] + [newline])

    def _project(self, pv: torch.Tensor) -> torch.Tensor:
        """Projected features of base views pv [n, 3, S, S] -> [n, tokens, hidden]: the configured vision layer(s)
        and select strategy, then the projector (as the model's get_image_features before any packing)."""
        cfg = self.model.config
        hidden = self._mm.vision_tower(pv, output_hidden_states=True, return_dict=True).hidden_states
        layer = cfg.vision_feature_layer
        hs = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            hs = hs[:, 1:]
        return self._mm.multi_modal_projector(hs)

    def _vision_forward(self, images: list) -> list[torch.Tensor]:
        """Projected features [num_tokens, hidden] of images sharing one pixel shape, in one forward."""
        pv = torch.stack([im.pixel_values for im in images]).to(self.device, self._vision_dtype)
        if self._onevision and pv.shape[1] == 1:  # one of several images: the base view, then the newline
            newline = self._mm.image_newline[None]
            return [torch.cat([f, newline]).to(self.dtype) for f in self._project(pv[:, 0])]
        if self._anyres:  # pv [n, n_views, 3, S, S]
            sizes = torch.tensor([list(im.image_size) for im in images], device=self.device)
            out = self._mm.get_image_features(pixel_values=pv, image_sizes=sizes, return_dict=True)
        else:  # pv [n, 3, S, S]
            out = self._mm.get_image_features(pixel_values=pv, return_dict=True)
        feats = out.pooler_output
        return [f.to(self.dtype) for f in feats]

    def _embed_span(self, seq: _Sequence, start: int, end: int, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings of ids[start:end] [q, hidden] with image features scattered into `<image>` positions."""
        ids = torch.tensor(seq.prompt[start:end], device=self.device)
        embeds = self._embed(ids)
        parts = []
        for run in seq.image_runs:
            lo, hi = max(start, run.start), min(end, run.start + run.num_tokens)
            if lo >= hi:
                continue
            feats = features[run.key]
            if feats.shape[0] != run.num_tokens:
                raise ImageFeatureMismatchError(
                    f"image/video {run.key!r} was given {run.num_tokens} prompt tokens but the vision encoder + "
                    f"projector produce {feats.shape[0]} features for it; its num_tokens does not match this model"
                )
            parts.append(feats[lo - run.start : hi - run.start])
        is_image = ids == self.image_token_id
        if self.video_token_id is not None:
            is_image |= ids == self.video_token_id
        n_image = int(is_image.sum())
        if n_image:
            feats = torch.cat(parts) if parts else embeds.new_zeros(0, embeds.shape[-1])
            if feats.shape[0] != n_image:
                raise ImageFeatureMismatchError(
                    f"{n_image} image tokens to fill but {feats.shape[0]} feature rows from the images"
                )
            embeds[is_image] = feats.to(embeds.dtype)
        return embeds

    # ------------------------------------------------------------------------------------------- bookkeeping

    def _advance(self, seq: _Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a new token: stop checks, text delta, event. A finishing token's event waits in `seq.final`
        until the request's row is released (`_retire`)."""
        seq.generated.append(token)
        self._counts["generated_tokens"] += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        stop_token = token in seq.stop_ids
        # a constrained output ends when its grammar is complete and cannot continue
        grammar_done = seq.matcher is not None and not stop_token and seq.matcher.is_stopped()
        if stop_token:
            logprob = None  # an end-of-sequence / stop token is not part of the output (OpenAI lists no logprob)
        elif logprob is not None:
            seq.logprobs.append(logprob)
        if grammar_done and seq.matcher.is_error():
            logger.warning("request %s: constraint failed: %s", seq.request.request_id, seq.matcher.get_error())
        ending = stop_token or grammar_done or len(seq.generated) >= seq.max_new_tokens
        delta = "" if stop_token else seq.detok.push(token)
        if ending:  # an output cut mid-character ends with U+FFFD rather than silently losing bytes
            delta += seq.detok.flush()
        text, hit = seq.stops.feed(delta)
        reason: FinishReason | None = "stop" if hit or stop_token or grammar_done else "length" if ending else None
        if reason is not None and not hit:
            text += seq.stops.flush()
        seq.text.append(text)
        if reason is None:
            seq.handle._push(GenerationEvent(seq.request.request_id, token, text, logprob=logprob))
        else:
            seq.finish_reason = reason
            seq.final = (token, text, logprob)

    def _retire(self, seq: _Sequence) -> None:
        """A finished request: offer its KV to the prefix cache, free its row, publish the final event."""
        ids = seq.fed_ids
        if self._prefix_cache.would_keep(len(ids)):
            try:
                self._prefix_cache.insert(ids, seq.image_runs, self._runner.export(seq, len(ids)),
                                          namespace=_namespace(seq))
            except Exception:
                logger.exception("keeping the KV of request %s failed", seq.request.request_id)
        self._release(seq)
        token, text, logprob = seq.final
        self._finish(seq, seq.finish_reason, token=token, text=text, logprob=logprob)

    def _release(self, seq: _Sequence) -> None:
        if self._runner.has(seq):
            self._runner.release(seq)

    def _finish(self, seq: _Sequence, reason: FinishReason, *, token: int | None = None, text: str = "",
                error: str | None = None, logprob: TokenLogprob | None = None) -> None:
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
            logprobs=list(seq.logprobs) if seq.request.sampling.logprobs is not None else None,
        )
        seq.handle._push(GenerationEvent(seq.request.request_id, token, text, True, reason, error, logprob), result)

    def _fail(self, seqs: list[_Sequence], exc: Exception) -> None:
        for seq in seqs:
            for group in (self._running, self._prefilling):
                if seq in group:
                    group.remove(seq)
            try:
                self._release(seq)
            except Exception:
                logger.exception("freeing the row of request %s failed", seq.request.request_id)
            self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")

    def _fail_all(self, exc: Exception) -> None:
        self._fail([*self._running, *self._prefilling], exc)
