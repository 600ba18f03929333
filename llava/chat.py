"""The one chat session shared by every front end (terminal CLI, web UI): messages + the images they refer to.

Promises:
- A `ChatSession` holds an optional system prompt, alternating user/assistant messages (content strings with one
  `<image>` marker per attached image, in order) and the images as validated encoded bytes, in marker order.
- `add_user(text, images)` validates each image with `llava.images.load_image` (so a bad file is refused before it
  enters the conversation, with the `ImageError` naming why) and places one `<image>` marker per image before the
  text, as LLaVA does ("<image>\\nQuestion"), unless the text already holds exactly that many markers.
- Videos work the same way (`<video>` markers, `videos` as encoded file bytes checked by `llava.video.probe_video`,
  which reads the header only: frames are decoded where the model runs).
- `to_messages()` is what renderers take (`llava.templates.render`, `LoadedModel.render`, the worker's
  /worker_generate_messages endpoint); `prompt_text(template)` is the templated text, rendered by
  `llava.templates.render_text` (nothing here formats turns itself).
- No HTTP and no UI types: front ends do I/O and display; this object only keeps state.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from llava.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, load_image
from llava.templates import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, ImageCountError, Template, TemplateError, render_text
from llava.video import MAX_VIDEO_BYTES, VideoError, probe_video

ImageSource = bytes | str | os.PathLike | Image.Image


class ChatStateError(ValueError):
    """An operation that the conversation's current state does not allow (e.g. two user turns in a row)."""


def image_bytes(src: ImageSource, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """Encoded bytes of a validated image: files/bytes/base64/data URIs keep their original encoding, PIL images
    become PNG. Raises `llava.images.ImageError` naming the cause."""
    image = load_image(src, max_bytes=max_bytes, max_pixels=max_pixels)  # validates (decodes fully) first
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)) and os.path.isfile(src):
        with open(src, "rb") as f:
            return f.read()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def video_bytes_of(src: bytes | str | os.PathLike, *, max_bytes: int = MAX_VIDEO_BYTES) -> bytes:
    """Bytes of a video file (path or bytes) whose header is valid; `llava.video.VideoError` naming the cause."""
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        if not os.path.isfile(src):
            raise VideoError(f"no such video file: {src}")
        if os.path.getsize(src) > max_bytes:
            raise VideoError(f"video too large: {os.path.getsize(src)} bytes exceeds the limit of {max_bytes}")
        with open(src, "rb") as f:
            data = f.read()
    probe_video(data)
    return data


@dataclass
class ChatSession:
    """A conversation: `messages` ({"role", "content"}) and `images` (encoded bytes, in `<image>` order)."""

    system: str | None = None  # None = the template's own system prompt
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    videos: list[bytes] = field(default_factory=list)  # encoded video files, in `<video>` order

    # -- building

    def add_user(self, text: str, images: Sequence[ImageSource] = (), videos: Sequence = ()) -> None:
        """Append a user turn with `images` and `videos` attached (markers placed before the text, images first,
        unless already in it)."""
        if self.messages and self.messages[-1]["role"] == "user":
            raise ChatStateError("the last message is already from the user; add the assistant's reply first")
        encoded = [image_bytes(im) for im in images]
        clips = [video_bytes_of(v) for v in videos]
        lead = ""
        for marker, items, what in ((IMAGE_PLACEHOLDER, encoded, "image"), (VIDEO_PLACEHOLDER, clips, "video")):
            markers = text.count(marker)
            if markers and markers != len(items):
                raise ImageCountError(
                    f"the text has {markers} {marker} marker(s) but {len(items)} {what}(s) were attached"
                )
            if not markers:
                lead += (marker + "\n") * len(items)
        text = lead + text
        if not text.strip():
            raise ChatStateError("a user message needs text, an image or a video")
        self.messages.append({"role": "user", "content": text})
        self.images.extend(encoded)
        self.videos.extend(clips)

    def add_assistant(self, text: str) -> None:
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ChatStateError("an assistant reply must follow a user message")
        if IMAGE_PLACEHOLDER in text or VIDEO_PLACEHOLDER in text:
            # a reply that echoes a marker would shift every later image (video) by one
            text = text.replace(IMAGE_PLACEHOLDER, "<img>").replace(VIDEO_PLACEHOLDER, "<vid>")
        self.messages.append({"role": "assistant", "content": text})

    def pop_user(self) -> tuple[str, list[bytes]]:
        """Remove the trailing user turn (e.g. generation failed) and return its text and images."""
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ChatStateError("the last message is not a user message")
        msg = self.messages.pop()
        n = msg["content"].count(IMAGE_PLACEHOLDER)
        taken = self.images[len(self.images) - n:] if n else []
        del self.images[len(self.images) - n:]
        del self.videos[len(self.videos) - msg["content"].count(VIDEO_PLACEHOLDER):]
        return msg["content"], taken

    def pop_assistant(self) -> str:
        """Remove the trailing assistant reply (regenerate)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ChatStateError("the last message is not an assistant reply")
        return self.messages.pop()["content"]

    def clear(self) -> None:
        """Forget messages and images (the system prompt stays)."""
        self.messages.clear()
        self.images.clear()
        self.videos.clear()

    # -- reading

    @property
    def awaiting_reply(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "user"

    @property
    def num_turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def to_messages(self) -> list[dict[str, str]]:
        """Messages for a renderer: a leading system message when one was set, then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(m) for m in self.messages]

    def prompt_text(self, template: Template | str) -> str:
        """The templated prompt up to the assistant's turn (with `<image>` markers, not expanded)."""
        if not self.awaiting_reply:
            raise TemplateError("prompt_text needs the conversation to end with a user message")
        return render_text(self.to_messages(), template, add_generation_prompt=True)
