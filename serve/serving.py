"""The HTTP-free serving model: a loaded model + its engine, turning protocol requests (templated prompt with
`<image>` markers, or messages) into engine submissions, with every failure a `ServeError` naming its cause.
The model worker wraps it in HTTP; the CLI uses it in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from llava.adapters import AdapterError, read_adapter
from llava.config import EngineConfig, LoadOptions
from llava.engine import (
    Engine, GenerationRequest, InvalidRequestError, PromptTooLongError, RequestHandle, UnknownAdapterError,
    UnsupportedModelError,
)
from llava.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageError, ProcessedImage, ProcessedVideo, load_image
from llava.loading import LoadedModel, LoadError, frames_as_images, load_model
from llava.requests import frames_that_fit
from llava.video import MAX_FRAMES, MAX_VIDEO_BYTES, MAX_VIDEO_SECONDS, VideoError, VideoLimits, decode_video, video_bytes
from llava.sampling import InvalidSamplingParamsError, SamplingParams, TokenLogprob, token_bytes
from llava.structured import Constraint, ConstraintError
from llava.templates import (
    IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, ImageCountError, TemplateError, media_order, normalize_messages, stop_token_ids,
)
from serve.protocol import ErrorCode, GenerateStreamRequest, SamplingFields, ServeError

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ImageLimits:
    max_images: int = field(default=8, metadata={"help": "images in one request"})
    max_bytes: int = field(default=MAX_IMAGE_BYTES, metadata={"flag": "--max-image-bytes", "help": "encoded bytes of one image"})
    max_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata={"flag": "--max-image-pixels", "help": "decoded pixels of one image"})
    max_videos: int = field(default=2, metadata={"help": "videos in one request"})
    max_video_bytes: int = field(default=MAX_VIDEO_BYTES, metadata={"help": "encoded bytes of one video"})
    max_video_seconds: float = field(default=MAX_VIDEO_SECONDS, metadata={"help": "duration of one video"})
    max_frames: int = field(default=MAX_FRAMES, metadata={"help": "frames sampled from one video at most"})

    @property
    def video(self) -> VideoLimits:
        return VideoLimits(self.max_video_bytes, self.max_video_seconds, self.max_frames)


@dataclass
class Prepared:
    """A request ready for the engine."""

    input_ids: list[int]
    images: list[ProcessedImage]  # with the frames of videos on a model that reads frames as images
    sampling: SamplingParams
    adapter: str | None = None  # a LoRA adapter loaded on this model, None: the base
    videos: list[ProcessedVideo] = field(default_factory=list)  # models with a video token
    media: list[tuple[str, int, int | None]] = field(default_factory=list)  # (image|video, tokens, frames) in order

    @property
    def image_tokens(self) -> int:
        """Tokens of the images and of the videos' frames."""
        return sum(im.num_tokens for im in self.images) + sum(v.num_tokens for v in self.videos)


def check_marker_count(markers: int, images: Sequence, where: str, marker: str = IMAGE_PLACEHOLDER) -> None:
    """One image per `<image>` marker, as LLaVA's worker requires (and one video per `<video>`)."""
    if markers != len(images):
        have = "has" if where == "the prompt" else "have"
        what = "image" if marker == IMAGE_PLACEHOLDER else "video"
        raise ServeError(ErrorCode.IMAGE_COUNT_MISMATCH,
                         f"{where} {have} {markers} {marker} marker(s) but {len(images)} {what}(s) were sent")


def media_summary(order: Sequence[str], images: Sequence, videos: Sequence) -> list[tuple[str, int, int | None]]:
    """(kind, tokens, frames) of each image and video in prompt order (a video's frames may be images)."""
    its, itv = iter(images), iter(videos)
    out = []
    for kind in order:
        if kind == "image":
            out.append(("image", next(its).num_tokens, None))
        else:
            v = next(itv)
            frames = v if isinstance(v, list) else None
            out.append(("video", sum(f.num_tokens for f in frames) if frames else v.num_tokens,
                        len(frames) if frames else v.num_frames))
    return out


def is_out_of_memory(message: str) -> bool:
    return "out of memory" in message.lower() or "OutOfMemoryError" in message


class ServingModel:
    """A loaded model + its engine; turns requests into engine submissions, with errors as `ServeError`s."""

    def __init__(self, loaded: LoadedModel, engine: Engine, names: Sequence[str], limits: ImageLimits = ImageLimits()):
        self.loaded = loaded
        self.engine = engine
        self.base_names = list(names)
        self.adapter_info: dict[str, dict] = {}  # loaded LoRA adapters: name -> {path, rank, targets, parameters}
        self.limits = limits
        self._token_bytes: dict[int, bytes] = {}  # token id -> its exact bytes (logprobs entries)

    @classmethod
    def load(cls, path: str, options: LoadOptions | None = None, *, names: Sequence[str] | None = None,
             max_batch_size: int = 16, limits: ImageLimits = ImageLimits(), engine_config: EngineConfig | None = None,
             **overrides) -> ServingModel:
        """Load `path` as `options` (keyword arguments override its fields) and build its engine."""
        loaded = load_model(path, options, **overrides)
        config = replace(engine_config or EngineConfig(), max_batch_size=max_batch_size)
        engine = Engine(
            loaded.model, loaded.tokenizer, eos_token_ids=stop_token_ids(loaded.template, loaded.tokenizer),
            config=config, context_length=loaded.context_length,
        )
        logger.info("serving %s: %s; runner %s", loaded.name, loaded.precision_reason, engine.runner_name)
        return cls(loaded, engine, names or [loaded.name], limits)

    @property
    def names(self) -> list[str]:
        """What requests may ask for: the base model's names, then the loaded adapters'."""
        return self.base_names + [n for n in self.engine.adapter_names if n not in self.base_names]

    # -- LoRA adapters

    def load_adapter(self, name: str, path: str) -> dict:
        """Read a LoRA adapter folder and serve it as model `name` (replacing an adapter of that name)."""
        if not name or name in self.base_names:
            raise ServeError(ErrorCode.INVALID_PARAMS, f"adapter name {name!r} is empty or the base model's name")
        try:
            adapter = read_adapter(path, self.loaded.model, name)
            self.engine.load_adapter(adapter)
        except (AdapterError, UnsupportedModelError) as e:
            raise ServeError(ErrorCode.INVALID_PARAMS, f"cannot load adapter {name!r}: {e}") from None
        self.adapter_info[name] = adapter.describe()
        logger.info("adapter %s loaded from %s: rank %d on %s (%d parameters)", name, path, adapter.rank,
                    ", ".join(adapter.targets), adapter.num_parameters)
        return self.adapter_info[name]

    def unload_adapter(self, name: str) -> None:
        if not self.engine.unload_adapter(name):
            raise ServeError(ErrorCode.UNKNOWN_MODEL, f"no adapter {name!r} is loaded; loaded: "
                             f"{', '.join(self.engine.adapter_names) or 'none'}")
        self.adapter_info.pop(name, None)
        logger.info("adapter %s unloaded", name)

    def adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None for the base); an unknown name is UNKNOWN_MODEL."""
        if model is None or model in self.base_names:
            return None
        if model in self.engine.adapter_names:
            return model
        raise ServeError(ErrorCode.UNKNOWN_MODEL, f"this worker serves {self.names}, not {model!r}")

    def warm_up(self) -> float:
        """Run one short request through the engine (kernels, buffers, first-call costs) before serving; seconds."""
        t0 = time.perf_counter()
        ids = self.loaded.render([{"role": "user", "content": "Hi"}]).input_ids
        self.engine.submit(GenerationRequest(ids, [], SamplingParams(max_new_tokens=2, ignore_eos=True))).result(300)
        return time.perf_counter() - t0

    # -- log-probabilities

    def logprob_entries(self, logprobs: Sequence[TokenLogprob]) -> list[dict]:
        """OpenAI's `logprobs.content` entries: token text, its UTF-8 bytes, logprob and the top alternatives."""
        def entry(token_id: int, logprob: float) -> dict:
            data = self._token_bytes.get(token_id)
            if data is None:  # once per token id: the tokenizer's pieces are looked up, not decoded per step
                data = self._token_bytes[token_id] = token_bytes(self.loaded.tokenizer, token_id)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                for lp in logprobs]

    # -- preparing

    def sampling(self, f: SamplingFields) -> SamplingParams:
        constraint = None
        if f.structured is not None:
            try:
                constraint = Constraint(f.structured.type, f.structured.value)
            except (ConstraintError, ValueError) as e:  # ValueError: a schema string that is not JSON
                raise ServeError(ErrorCode.INVALID_PARAMS, f"invalid request: structured: {e}") from None
        stops = [f.stop] if isinstance(f.stop, str) else list(f.stop or [])
        stops += [s for s in self.loaded.template.stop_strings if s not in stops]
        try:
            return SamplingParams(
                max_new_tokens=f.max_new_tokens,
                temperature=f.sampling_temperature(),
                top_p=f.top_p, top_k=f.top_k, repetition_penalty=f.repetition_penalty, seed=f.seed,
                stop=tuple(stops), logprobs=f.logprobs, constraint=constraint,
            )
        except InvalidSamplingParamsError as e:
            raise ServeError(ErrorCode.INVALID_PARAMS, str(e)) from None

    def process_images(self, images: Sequence[bytes | str], image_mode: str | None) -> list[ProcessedImage]:
        """Image bytes decoded and processed; a `str` is the id of an image this worker encoded before (its
        features come from the engine's cache, as that image was processed then)."""
        if len(images) > self.limits.max_images:
            raise ServeError(
                ErrorCode.TOO_MANY_IMAGES,
                f"{len(images)} images in one request; this worker allows at most {self.limits.max_images}",
            )
        out: list[ProcessedImage | None] = [None] * len(images)
        decoded = []
        for i, data in enumerate(images):
            if isinstance(data, str):
                out[i] = self.engine.cached_image(data)
                if out[i] is None:
                    raise ServeError(ErrorCode.UNKNOWN_IMAGE, f"image {i}: unknown image id {data}: this worker has "
                                     "not encoded it or no longer holds its features; send the image itself")
                continue
            try:
                decoded.append((i, load_image(data, max_bytes=self.limits.max_bytes,
                                              max_pixels=self.limits.max_pixels)))
            except ImageError as e:
                raise ServeError(ErrorCode.BAD_IMAGE, f"image {i}: {e}") from None
        try:
            processed = self.loaded.process_images([im for _, im in decoded], image_mode=image_mode)
        except LoadError as e:
            raise ServeError(ErrorCode.INVALID_PARAMS, str(e)) from None
        except ImageError as e:
            raise ServeError(ErrorCode.BAD_IMAGE, str(e)) from None
        for (i, _), im in zip(decoded, processed):
            out[i] = im
        return out

    def process_videos(self, videos: Sequence[str], max_frames: int | None) -> list:
        """Video payloads (base64 / data: URIs) decoded, sampled and processed: a `ProcessedVideo` each on a model
        with a video token, else each one's frames as images."""
        limits = self.limits.video
        if len(videos) > self.limits.max_videos:
            raise ServeError(ErrorCode.TOO_MANY_IMAGES, f"{len(videos)} videos in one request; this worker allows "
                                                        f"at most {self.limits.max_videos}")
        frames = min(max_frames or self.loaded.default_max_frames, limits.max_frames)
        out = []
        for i, payload in enumerate(videos):
            try:
                decoded = decode_video(video_bytes(payload, limits.max_bytes), frames, limits)
                out.append(self.loaded.process_video(decoded.frames))
            except (VideoError, ImageError) as e:
                raise ServeError(ErrorCode.BAD_VIDEO, f"video {i}: {e}") from None
        return out

    def tokenize_prompt(self, prompt: str, images: Sequence[ProcessedImage], videos: Sequence = ()) -> list[int]:
        """Ids of an already templated prompt, each `<image>` / `<video>` token repeated for its item's token
        count (`images` then holds the videos' frames on a model that reads frames as images)."""
        bos = self.loaded.template.bos
        text = prompt if not bos or prompt.startswith(bos) else bos + prompt
        if videos and self.loaded.video_token_id is None:  # each <video> becomes one <image> per frame
            pieces = text.split(VIDEO_PLACEHOLDER)
            text = pieces[0] + "".join(IMAGE_PLACEHOLDER * len(v) + p for v, p in zip(videos, pieces[1:]))
            videos = []
        ids = list(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        counts = {self.loaded.image_token_id: iter([im.num_tokens for im in images])}
        if self.loaded.video_token_id is not None:
            counts[self.loaded.video_token_id] = iter([v.num_tokens for v in videos])
        for token_id, items, what in ((self.loaded.image_token_id, images, "image"),
                                      (self.loaded.video_token_id, videos, "video")):
            found = sum(1 for t in ids if t == token_id) if token_id is not None else 0
            if found != len(items):
                marker = IMAGE_PLACEHOLDER if what == "image" else VIDEO_PLACEHOLDER
                raise ServeError(ErrorCode.IMAGE_COUNT_MISMATCH,
                                 f"the prompt has {found} {marker} token(s) but {len(items)} {what}(s) were sent")
        out: list[int] = []
        for t in ids:
            out += [t] * next(counts[t]) if t in counts else [t]
        return out

    def prepare_prompt(self, req: GenerateStreamRequest, images: Sequence[bytes | str]) -> Prepared:
        """The LLaVA raw-prompt path."""
        if not req.prompt.replace(IMAGE_PLACEHOLDER, "").strip() and not images:
            raise ServeError(ErrorCode.EMPTY_PROMPT, "the prompt is empty")
        check_marker_count(req.prompt.count(IMAGE_PLACEHOLDER), images, "the prompt")
        check_marker_count(req.prompt.count(VIDEO_PLACEHOLDER), req.videos, "the prompt", VIDEO_PLACEHOLDER)
        sampling = self.sampling(req)
        processed = self.process_images(images, req.image_mode)
        videos = self.process_videos(req.videos, req.max_frames)
        order = media_order(req.prompt)
        as_frames = videos and self.loaded.video_token_id is None
        ids = self.tokenize_prompt(req.prompt, frames_as_images(order, processed, videos) if as_frames else processed,
                                   videos)
        return self._prepared(ids, order, processed, videos, sampling)

    def _prepared(self, ids: list[int], order: list[str], images: list, videos: list, sampling) -> Prepared:
        media = media_summary(order, images, videos)
        if videos and self.loaded.video_token_id is None:
            images, videos = frames_as_images(order, images, videos), []
        return Prepared(ids, images, sampling, videos=videos, media=media)

    def prepare_messages(self, messages: list[dict], images: Sequence[bytes | str], fields: SamplingFields) -> Prepared:
        """The structured path: messages rendered with the model's own template."""
        try:
            normalize_messages(messages)
        except TemplateError as e:
            raise ServeError(ErrorCode.INVALID_PARAMS, f"invalid messages: {e}") from None
        if messages[-1]["role"] != "user":
            raise ServeError(ErrorCode.INVALID_PARAMS, "invalid messages: the last message must be from the user")
        if not messages[-1]["content"].strip():
            raise ServeError(ErrorCode.EMPTY_PROMPT, "the last user message is empty (no text and no image)")
        check_marker_count(sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages), images, "the messages")
        video_payloads = getattr(fields, "videos", [])
        check_marker_count(sum(m["content"].count(VIDEO_PLACEHOLDER) for m in messages), video_payloads,
                           "the messages", VIDEO_PLACEHOLDER)
        sampling = self.sampling(fields)
        processed = self.process_images(images, fields.image_mode)
        videos = self.process_videos(video_payloads, getattr(fields, "max_frames", None))
        try:
            prompt = self.loaded.prompt(messages, processed, videos, add_generation_prompt=True)
        except ImageCountError as e:
            raise ServeError(ErrorCode.IMAGE_COUNT_MISMATCH, str(e)) from None
        except TemplateError as e:
            raise ServeError(ErrorCode.INVALID_PARAMS, f"cannot render the messages: {e}") from None
        order = media_order("".join(m["content"] for m in messages))
        return self._prepared(prompt.input_ids, order, processed, videos, sampling)

    def submit(self, prepared: Prepared) -> RequestHandle:
        try:
            return self.engine.submit(GenerationRequest(prepared.input_ids, prepared.images, prepared.sampling,
                                                        adapter=prepared.adapter, videos=prepared.videos))
        except UnknownAdapterError as e:  # unloaded since the request was read
            raise ServeError(ErrorCode.UNKNOWN_MODEL, str(e)) from None
        except PromptTooLongError as e:
            raise ServeError(ErrorCode.PROMPT_TOO_LONG, str(self._too_long(prepared, e))) from None
        except InvalidRequestError as e:
            raise ServeError(ErrorCode.INVALID_PARAMS, str(e)) from None
        except torch.OutOfMemoryError as e:
            raise ServeError(ErrorCode.OUT_OF_MEMORY, f"out of memory while queueing the request: {e}") from None

    def _too_long(self, prepared: Prepared, e: PromptTooLongError) -> PromptTooLongError:
        """The engine's error, told per image and video when the model read a video's frames as images (the engine
        then only saw images), with how many frames of the longest video would fit."""
        videos = [m for m in prepared.media if m[0] == "video"]
        if not videos or e.frames_that_fit is not None:
            return e
        kind, tokens, frames = max(videos, key=lambda m: m[1])
        fit = frames_that_fit(e.context_length, e.prompt_tokens, tokens, tokens // frames)
        return PromptTooLongError(e.prompt_tokens, e.image_tokens, len(prepared.images), e.context_length,
                                  prepared.media, fit)
