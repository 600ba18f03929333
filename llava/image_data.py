"""Image bytes as clients send them: the limits on one image, base64 / data-URI decoding and `ImageError`.

Torch-free, so processes that only relay images (controller, OpenAI API server) import it cheaply;
`llava.images` decodes and processes the pixels.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

# Limits on one image a client sends: encoded bytes and decoded pixels (a decompression bomb is refused).
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000


class ImageError(ValueError):
    """An input image cannot be used; the message names the cause."""


def check_bytes(n: int, max_bytes: int) -> None:
    if n > max_bytes:
        raise ImageError(f"image too large: {n} bytes exceeds the limit of {max_bytes}")


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, comma, payload = uri[len("data:"):].partition(",")
    if not comma:
        raise ImageError("malformed data: URI (no comma before the data)")
    if header.endswith(";base64"):
        return decode_base64(payload, max_bytes, what="data: URI payload")
    check_bytes(len(payload) // 3, max_bytes)  # percent-encoding is at most 3 chars per byte
    return urllib.parse.unquote_to_bytes(payload)


def decode_base64(text: str, max_bytes: int, what: str) -> bytes:
    """Standard or URL-safe base64, line breaks and missing padding tolerated; ImageError naming `what` when it is
    not base64 or decodes to more than max_bytes (checked before decoding)."""
    text = "".join(text.split())  # line-wrapped base64 is common
    check_bytes(len(text) * 3 // 4, max_bytes)  # before allocating the decoded bytes
    altchars = b"-_" if ("-" in text or "_" in text) else None  # URL-safe alphabet
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"invalid base64 in {what}: {e}") from None
