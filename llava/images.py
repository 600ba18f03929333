"""Image loading with safety limits, and LLaVA image processing.

Promises:
- `load_image` returns a fully decoded RGB `PIL.Image.Image` or raises `ImageError` naming the cause (not an image,
  truncated/corrupt, too many bytes, too many pixels, unsupported mode). Only raster formats that need no external
  program are opened, and the pixel count is checked from the header before any pixel is decoded; PIL's global
  `MAX_IMAGE_PIXELS` is left alone.
- `preprocess` turns an image into the vision encoder's input for one `ImageProcessing` and says exactly how many
  `<image>` tokens it needs (`num_image_tokens`), so the prompt can be expanded before the features exist.
  anyres matches transformers' LlavaNext (its image processor produces the views; our count is checked against
  `LlavaNextProcessor` and `LlavaNextForConditionalGeneration` in tests). `anyres_max` is LLaVA-OneVision's
  anyres_max_N (pixels from transformers' `LlavaOnevisionImageProcessorPil`; features downsized to about N tiles);
  with several images in one request each image is one base view (`preprocess(..., multi=True)`), as there.
- `preprocess_video` turns decoded frames into a `ProcessedVideo` for models with a video token (LLaVA-OneVision:
  each frame resized to the base view, its features pooled 2x2, one newline after the last frame).
- `content_hash` / `ProcessedImage.key` identify decoded pixels (+ processing), so equal images share a cache entry
  whatever file format carried them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import struct
import urllib.parse
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil
from transformers.image_processing_utils import select_best_resolution as _hf_select_best_resolution

from llava.config import MODES  # noqa: F401  (re-exported; image modes are named once, in llava.config)
from llava.image_data import (  # noqa: F401  (re-exported)
    MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageError, check_bytes, decode_base64, decode_data_uri,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Mode = Literal["pad", "resize", "crop", "anyres"]

# Raster formats PIL decodes itself. EPS (runs ghostscript), PDF-like and exotic plugins are refused on purpose.
SAFE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "AVIF")
# PIL modes `convert("RGB")` maps faithfully; 16-bit/32-bit integer and float modes would be clipped.
CONVERTIBLE_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)


class ProcessingConfigError(ValueError):
    """An `ImageProcessing` is inconsistent (bad mode, size not a multiple of the patch, bad pinpoints...)."""


# ---------------------------------------------------------------------------------------------------------------
# Processing configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageProcessing:
    """How an image becomes encoder input. Stored in checkpoints via `to_dict`; `key()` names it in caches."""

    mode: Mode = "pad"
    size: int = 336  # square side fed to the vision encoder
    patch_size: int = 14
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    num_prefix_tokens: int = 1  # CLS tokens the encoder emits (CLIP/DINOv2: 1, SigLIP: 0)
    keep_cls: bool = False  # vision_feature_select_strategy "full" (True) vs "default" (False: drop CLS)
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # anyres only, (h, w) pairs
    # LLaVA-OneVision's anyres_max_N (anyres only): tile features above ~N tiles are downsized, a newline ends each
    # row; several images in one request are one padded base view each (+ a newline)
    anyres_max: int | None = None
    # 2: the model reads each image's patch grid twice, row after row and then column after column (a `_rowcol`
    # projector, llava/projector.py), so an image takes twice the grid's tokens
    reading_orders: int = 1

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise ProcessingConfigError(f"unknown mode {self.mode!r}; valid modes: {', '.join(get_args(Mode))}")
        # the patch grid is size // patch_size per side, as the encoder's strided conv floors it (SigLIP: 384 / 14)
        if self.patch_size <= 0 or self.size < self.patch_size:
            raise ProcessingConfigError(
                f"size {self.size} must be at least patch_size {self.patch_size} (and patch_size positive)"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ProcessingConfigError(f"mean/std need 3 channels and std > 0, got {self.mean} / {self.std}")
        if self.num_prefix_tokens < 0:
            raise ProcessingConfigError(f"num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}")
        if self.mode == "anyres":
            self._check_anyres()
        elif self.grid_pinpoints is not None or self.anyres_max is not None:
            raise ProcessingConfigError(f"grid_pinpoints / anyres_max are only used by mode 'anyres', not {self.mode!r}")
        if self.reading_orders not in (1, 2):
            raise ProcessingConfigError(f"reading_orders must be 1 or 2, got {self.reading_orders}")
        if self.reading_orders == 2 and (self.mode == "anyres" or self.keep_cls):
            raise ProcessingConfigError("reading_orders 2 needs one square patch grid per image: not with mode 'anyres' "
                                        "or a kept CLS token")
        if self.anyres_max is not None and self.anyres_max < 1:
            raise ProcessingConfigError(f"anyres_max must be >= 1, got {self.anyres_max}")

    def _check_anyres(self) -> None:
        if not self.grid_pinpoints:
            raise ProcessingConfigError("mode 'anyres' needs grid_pinpoints, e.g. ((336, 672), (672, 336))")
        bad = [p for p in self.grid_pinpoints if len(p) != 2 or min(p) <= 0 or p[0] % self.size or p[1] % self.size]
        if bad:
            raise ProcessingConfigError(f"grid_pinpoints must be (h, w) multiples of size {self.size}; bad: {bad}")
        if self.keep_cls:
            # LlavaNext reshapes each tile's features into a (size/patch)^2 grid, which a kept CLS token breaks.
            raise ProcessingConfigError("mode 'anyres' cannot keep CLS tokens (LlavaNext needs strategy 'default')")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["anyres_max"] is None:
            del d["anyres_max"]  # absent in checkpoints and cache keys written before it existed
        if d["reading_orders"] == 1:
            del d["reading_orders"]  # likewise
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["grid_pinpoints"] = None if self.grid_pinpoints is None else [list(p) for p in self.grid_pinpoints]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessing:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ProcessingConfigError(f"unknown ImageProcessing keys {unknown}; valid keys: {sorted(valid)}")
        d = dict(d)
        for name in ("mean", "std"):
            if name in d:
                d[name] = tuple(float(x) for x in d[name])
        if d.get("grid_pinpoints") is not None:
            d["grid_pinpoints"] = tuple((int(h), int(w)) for h, w in d["grid_pinpoints"])
        return cls(**d)

    def key(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return f"{self.mode}{self.size}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor | None  # float32 [3, S, S]; anyres: [n_views, 3, S, S], global view, then tiles
    image_size: tuple[int, int]  # original (height, width), LlavaNext's image_sizes
    num_tokens: int  # exactly how many <image> tokens this image needs
    key: str  # content hash of the decoded pixels + processing key (URL-safe: hex, letters, digits, '.', '-')
    # projected features [num_tokens, hidden] when already known (an image sent by id, see Engine.cached_image):
    # the engine uses them instead of running the vision tower, and pixel_values may be None
    features: torch.Tensor | None = None


@dataclass
class ProcessedVideo:
    """Frames of one video for a model with a video token (LLaVA-OneVision). Each frame's features are cached by
    its own key; the video's run of `<video>` tokens is the frames' pooled features in order, then one newline."""

    pixel_values: torch.Tensor  # float32 [n_frames, 3, S, S]
    frame_keys: tuple[str, ...]  # per frame: content hash + processing (URL-safe)
    tokens_per_frame: int
    num_tokens: int  # n_frames * tokens_per_frame + 1 (the newline)
    key: str  # hash of the frame keys

    @property
    def num_frames(self) -> int:
        return len(self.frame_keys)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_image(
    src: bytes | str | os.PathLike | Image.Image,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode `src` fully into RGB. `str` may be a file path, a `data:` URI or base64 image data.

    Transparency is composited onto white (as transformers' processors do). Note PIL still refuses images above
    2 * PIL.Image.MAX_IMAGE_PIXELS on its own, so `max_pixels` beyond that has no effect.
    """
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels)
        return _to_rgb(_fully_load(src))
    return _decode(_read_bytes(src, max_bytes), max_pixels)


def _read_bytes(src: bytes | str | os.PathLike, max_bytes: int) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, str) and src.startswith("data:"):
        data = decode_data_uri(src, max_bytes)
    elif isinstance(src, os.PathLike) or (isinstance(src, str) and os.path.isfile(src)):
        data = _read_file(os.fspath(src), max_bytes)
    elif isinstance(src, str):
        data = decode_base64(src, max_bytes, what="string (not an existing file, a data: URI or base64)")
    else:
        raise ImageError(f"cannot load an image from {type(src).__name__}; pass bytes, a path, a str or a PIL image")
    check_bytes(len(data), max_bytes)
    return data


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError(
            f"image has too many pixels: {w}x{h} = {w * h} > max_pixels {max_pixels} (possible decompression bomb)"
        )


def _read_file(path: str, max_bytes: int) -> bytes:
    if not os.path.isfile(path):
        raise ImageError(f"no such image file: {path}")
    check_bytes(os.path.getsize(path), max_bytes)  # before reading it into memory
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def _open_formats() -> list[str]:
    Image.init()  # registers PIL's plugins (idempotent); some safe formats may be missing from this build
    return [f for f in SAFE_FORMATS if f in Image.OPEN]


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    formats = _open_formats()
    try:
        image = Image.open(io.BytesIO(data), formats=formats)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageError(f"image has too many pixels (possible decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image (or not one of {', '.join(formats)}); {len(data)} bytes") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise ImageError(f"corrupt image header: {e}") from None
    _check_pixels(image.size, max_pixels)
    return _to_rgb(_fully_load(image))


def _fully_load(image: Image.Image) -> Image.Image:
    """Decode every pixel now, so truncated files fail here rather than deep inside preprocessing."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"image data truncated or corrupt ({image.format or 'unknown format'}): {e}") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageError(
            f"unsupported image mode {image.mode!r} (16/32-bit or float pixels); convert to 8-bit RGB first"
        )
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def content_hash(image: Image.Image) -> str:
    """sha256 over mode, size and raw pixels: equal for equal pixels whatever file format carried them."""
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Processing
# ---------------------------------------------------------------------------------------------------------------


def select_best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The (h, w) pinpoint that keeps most of the image's resolution, then wastes least (LLaVA-NeXT's rule).

    Delegates to transformers' own function, which the LlavaNext processor and model both use.
    """
    if not pinpoints:
        raise ProcessingConfigError("select_best_resolution needs at least one pinpoint")
    h, w = _hf_select_best_resolution(tuple(image_size), [tuple(p) for p in pinpoints])
    return int(h), int(w)


def num_image_tokens(proc: ImageProcessing, image_size: tuple[int, int], multi: bool = False) -> int:
    """How many `<image>` tokens an image of original (height, width) `image_size` needs under `proc`; `multi`:
    one of several images in a request (OneVision gives each one base view + a newline)."""
    side = proc.size // proc.patch_size
    base = side * side * proc.reading_orders + (proc.num_prefix_tokens if proc.keep_cls else 0)
    if proc.mode != "anyres":
        return base
    if multi and proc.anyres_max is not None:
        return base + 1
    best_h, best_w = select_best_resolution(image_size, proc.grid_pinpoints)
    # Feature grid of all tiles together, in patches; then the padded border is cut away ("spatial_unpad").
    rows, cols = _unpadded_grid(image_size, side * best_h // proc.size, side * best_w // proc.size)
    if proc.anyres_max is not None:  # OneVision: a grid of more than ~anyres_max tiles is downsized (bilinear)
        ratio = math.sqrt(rows * cols / (proc.anyres_max * side * side))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return base + rows * cols + rows  # + one image_newline per row


def video_frame_tokens(proc: ImageProcessing) -> int:
    """Feature tokens of one video frame on a model with a video token: the base grid pooled 2x2 (rounded up)."""
    pooled = math.ceil(proc.size // proc.patch_size / 2)
    return pooled * pooled


def _unpadded_grid(image_size: tuple[int, int], grid_h: int, grid_w: int) -> tuple[int, int]:
    """Rows/cols of the tile feature grid left after removing the padding (same arithmetic as LlavaNext)."""
    h, w = image_size
    if w / h > grid_w / grid_h:  # image wider than the grid: it was padded top and bottom
        new_h = int(round(h * (grid_w / w), 7))
        return grid_h - 2 * ((grid_h - new_h) // 2), grid_w
    new_w = int(round(w * (grid_h / h), 7))
    return grid_h, grid_w - 2 * ((grid_w - new_w) // 2)


def preprocess(image: Image.Image, proc: ImageProcessing, multi: bool = False) -> ProcessedImage:
    """Encoder input for `image` (normally from `load_image`) under `proc`, with its token count and cache key.
    `multi`: the image is one of several in its request (OneVision: one padded base view, [1, 3, S, S])."""
    image = _to_rgb(image)
    multi = multi and proc.anyres_max is not None
    if multi:
        pixel_values = _normalize(_pad(image, proc.size, proc), proc)[None]
    elif proc.mode == "anyres":
        pixel_values = _anyres(image, proc)
    else:
        pixel_values = _normalize(_SQUARE_MODES[proc.mode](image, proc.size, proc), proc)
    size = (image.height, image.width)
    return ProcessedImage(
        pixel_values=pixel_values,
        image_size=size,
        num_tokens=num_image_tokens(proc, size, multi),
        key=f"{content_hash(image)}.{proc.key()}" + ("-multi" if multi else ""),
    )


def preprocess_video(frames: list[Image.Image], proc: ImageProcessing) -> ProcessedVideo:
    """Frames (decoded, RGB) of one video for a model with a video token: each resized to the base view."""
    if not frames:
        raise ImageError("a video needs at least one frame")
    frames = [_to_rgb(f) for f in frames]
    pixel_values = torch.stack([_normalize(_resize(f, proc.size, proc), proc) for f in frames])
    keys = tuple(f"{content_hash(f)}.{proc.key()}-frame" for f in frames)
    per_frame = video_frame_tokens(proc)
    digest = hashlib.sha256("|".join(keys).encode()).hexdigest()
    return ProcessedVideo(pixel_values, keys, per_frame, len(frames) * per_frame + 1, f"{digest}.video")


def _pad(image: Image.Image, size: int, proc: ImageProcessing) -> Image.Image:
    """LLaVA's expand2square: centre on a square of the mean colour (truncated to int, as LLaVA does), resize."""
    w, h = image.size
    side = max(w, h)
    background = tuple(int(m * 255) for m in proc.mean)
    square = Image.new("RGB", (side, side), background)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square.resize((size, size), Image.Resampling.BICUBIC)


def _resize(image: Image.Image, size: int, proc: ImageProcessing) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BICUBIC)


def _crop(image: Image.Image, size: int, proc: ImageProcessing) -> Image.Image:
    """CLIP style: shortest side to `size` (long side truncated like transformers), then the centre square."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return resized.crop((left, top, left + size, top + size))


_SQUARE_MODES = {"pad": _pad, "resize": _resize, "crop": _crop}


def _normalize(image: Image.Image, proc: ImageProcessing) -> torch.Tensor:
    """uint8 HWC -> float32 CHW, rescaled by 1/255 and normalised (same float steps as transformers)."""
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(proc.mean, dtype=np.float32)) / np.asarray(proc.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _anyres(image: Image.Image, proc: ImageProcessing) -> torch.Tensor:
    processor = _onevision_processor(proc) if proc.anyres_max is not None else _anyres_processor(proc)
    out = processor(image, return_tensors="np")
    return torch.from_numpy(out["pixel_values"][0]).to(torch.float32)  # [n_views, 3, S, S]


@functools.lru_cache(maxsize=8)
def _anyres_processor(proc: ImageProcessing) -> LlavaNextImageProcessorPil:
    """transformers' LlavaNext processor configured from `proc`: resize+pad to the best pinpoint, cut tiles,
    global view first. Reusing it keeps our pixels identical to what LlavaNext checkpoints were trained on."""
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": proc.size},
        crop_size={"height": proc.size, "width": proc.size},
        image_grid_pinpoints=[list(p) for p in proc.grid_pinpoints],
        image_mean=list(proc.mean),
        image_std=list(proc.std),
        resample=Image.Resampling.BICUBIC,
    )


@functools.lru_cache(maxsize=8)
def _onevision_processor(proc: ImageProcessing) -> LlavaOnevisionImageProcessorPil:
    """transformers' LlavaOnevision processor from `proc`: base view resized to S x S, then the best pinpoint's tiles."""
    return LlavaOnevisionImageProcessorPil(
        size={"height": proc.size, "width": proc.size},
        image_grid_pinpoints=[list(p) for p in proc.grid_pinpoints],
        image_mean=list(proc.mean),
        image_std=list(proc.std),
        resample=Image.Resampling.BICUBIC,
    )
