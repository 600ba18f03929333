"""Video files as clients send them (mp4 / webm / mkv / mov / avi bytes), decoded into uniformly sampled RGB frames.

Promises:
- `probe_video(data)` checks the container, stream and limits without decoding (front ends validate with it);
  `decode_video(data, max_frames)` returns `DecodedVideo` (PIL frames, duration, how many frames the file has) or
  raises `VideoError` naming the cause: not a video (or an image / audio-only file), empty (no frame decodes),
  broken (the decoder fails), over the byte / duration / frame-size limits of `VideoLimits`. Limits are checked
  from the container's header and packet index before any frame is decoded.
- Frames are sampled uniformly over the whole video: frame i of n is the decoded frame at index
  round(i * (N - 1) / (n - 1)) of the N the file holds (LLaVA-OneVision's `np.linspace` sampling); a video with
  fewer than `max_frames` frames gives all of them.
- Decoding uses PyAV (the optional extra `llava[video]`); without it `VideoUnavailableError` says how to install it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llava.image_data import decode_base64, decode_data_uri

MAX_VIDEO_BYTES = 20 * 2**20  # base64 of it stays under the servers' 32 MiB request body limit
MAX_VIDEO_SECONDS = 600.0
MAX_FRAMES = 64  # frames taken from one video at most, whatever a request asks
MAX_FRAME_PIXELS = 3840 * 2160
MAX_PACKETS = 200_000  # frames indexed in one file (about 55 min at 60 fps): bounds the time spent indexing
# Containers accepted (FFmpeg demuxer names); image sequences, audio-only and exotic demuxers are refused.
VIDEO_FORMATS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})


class VideoError(ValueError):
    """A video cannot be used; the message names the cause."""


class VideoUnavailableError(VideoError):
    """PyAV is not installed: video input is an optional extra."""


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = MAX_VIDEO_BYTES  # encoded bytes of one video
    max_seconds: float = MAX_VIDEO_SECONDS  # its duration
    max_frames: int = MAX_FRAMES  # frames sampled from it at most
    max_pixels: int = MAX_FRAME_PIXELS  # pixels of one frame


@dataclass
class DecodedVideo:
    frames: list[Image.Image]  # RGB, in time order
    duration: float  # seconds (0 when the container does not say)
    total_frames: int  # frames in the file


def video_bytes(src: bytes | str, max_bytes: int) -> bytes:
    """Bytes of a video given as bytes, a `data:` URI or base64 (never a path or URL: see the callers for those)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, str) and src.startswith("data:"):
        data = decode_data_uri(src, max_bytes)
    elif isinstance(src, str):
        data = decode_base64(src, max_bytes, what="video (not a data: URI or base64)")
    else:
        raise VideoError(f"cannot read a video from {type(src).__name__}; pass bytes, a data: URI or base64")
    if len(data) > max_bytes:
        raise VideoError(f"video too large: {len(data)} bytes exceeds the limit of {max_bytes}")
    return data


def _av():
    try:
        import av
    except ImportError:
        raise VideoUnavailableError("video input needs PyAV, which is not installed on this server: "
                                    "pip install 'llava[video]' (or pip install av)") from None
    return av


def probe_video(data: bytes, limits: VideoLimits = VideoLimits()) -> float:
    """Check a video file's container, stream and limits from its header, decoding nothing; its duration (s)."""
    av = _av()
    with _open(av, data, limits) as container:
        return _check(container, limits)


def decode_video(data: bytes, max_frames: int, limits: VideoLimits = VideoLimits()) -> DecodedVideo:
    """Up to `max_frames` frames (capped by limits.max_frames) sampled uniformly from a video file's bytes."""
    av = _av()
    n_wanted = max(1, min(int(max_frames), limits.max_frames))
    with _open(av, data, limits) as container:
        duration = _check(container, limits)
        total = _count_packets(av, container, container.streams.video[0])
    if total == 0:
        raise VideoError("video is empty: its video stream has no frames")
    wanted = sorted(set(np.linspace(0, total - 1, min(n_wanted, total)).round().astype(int).tolist()))
    with av.open(io.BytesIO(data), mode="r") as container:  # from the start again, now knowing what to keep
        frames = _decode_at(av, container, container.streams.video[0], wanted)
    if not frames:
        raise VideoError("video is empty or broken: no frame could be decoded")
    return DecodedVideo(frames, duration, total)


def _open(av, data: bytes, limits: VideoLimits):
    if not data:
        raise VideoError("video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise VideoError(f"video too large: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as e:
        raise VideoError(f"not a readable video (unknown container, or a truncated / corrupt file): {e}") from None


def _check(container, limits: VideoLimits) -> float:
    """Format, video stream, frame size and duration against the limits; the duration."""
    if not set(container.format.name.split(",")) & VIDEO_FORMATS:
        raise VideoError(f"not a video: container format {container.format.name!r}; accepted: "
                         f"{', '.join(sorted(VIDEO_FORMATS))}")
    if not container.streams.video:
        raise VideoError(f"no video stream in the {container.format.name} file (audio only?)")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_pixels:
        raise VideoError(f"video frames too large: {width}x{height} = {width * height} pixels > {limits.max_pixels}")
    duration = _duration(container, stream)
    if duration > limits.max_seconds:
        raise VideoError(f"video too long: {duration:.1f} s exceeds the limit of {limits.max_seconds:g} s")
    return duration


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return 0.0


def _count_packets(av, container, stream) -> int:
    """Frames of the stream, counted from its packets without decoding (one packet per frame for the codecs of
    these containers); container metadata is not trusted for it (webm rarely has it)."""
    n = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                n += 1
                if n > MAX_PACKETS:
                    raise VideoError(f"video has more than {MAX_PACKETS} frames")
    except av.error.FFmpegError as e:
        raise VideoError(f"video data broken (while reading packets): {e}") from None
    return n


def _decode_at(av, container, stream, wanted: list[int]) -> list[Image.Image]:
    """The decoded frames at the indices `wanted` (sorted); if the stream ends early, its last frame fills in."""
    frames: list[Image.Image] = []
    targets = iter(wanted)
    target = next(targets)
    last = None
    try:
        for i, frame in enumerate(container.decode(stream)):
            last = frame
            if i == target:
                frames.append(frame.to_image())
                target = next(targets, None)
                if target is None:
                    return frames
    except av.error.FFmpegError as e:
        if not frames and last is None:
            raise VideoError(f"video data broken (no frame decodes): {e}") from None
    if last is not None:  # fewer frames decoded than packets: fill in with the last one
        frames += [last.to_image()] * (len(wanted) - len(frames))
    return frames
