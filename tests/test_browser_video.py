"""Two images and a short video in one conversation of the web chat, in a real browser (headless Debian Chromium +
Playwright, as tests/test_browser.py): they reach the worker (its usage counts both images' and every frame's
tokens), the images show in the chat and the video as a player, the token costs are shown, and the reply streams
back. A tiny random plain llava serves it, so the video's frames are read as images."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import tiny_onevision as tiny
from conftest import REPO, Stack
from test_browser import CHROMIUM_ARGS, LAST_BOT_DONE, chromium_path, require_browser, set_parameter

# ~95 s on 2 busy cores (controller, worker and web UI start as processes): over make test's budget
pytestmark = [pytest.mark.browser, pytest.mark.slow]
pytest.importorskip("av")

FRAMES = 6
QUESTION = "What changes between the pictures and the clip?"


@pytest.fixture
def tiny_stack(tmp_path):
    require_browser()
    from llava.testing import make_tiny_llava

    s = Stack(make_tiny_llava(tmp_path / "tiny"), tmp_path, "tiny")
    try:
        s.wait_ready(timeout=180)
        yield s
    finally:
        s.close()


def _files(tmp_path):
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        p = tmp_path / f"picture-{i}.png"
        Image.new("RGB", (40, 30), color).save(p)
        paths.append(p)
    clip = tmp_path / "clip.webm"
    clip.write_bytes(tiny.encode_video(FRAMES, "webm", "libvpx"))  # fewer frames than the default 16: all are used
    return paths, clip


def test_two_images_and_a_video_in_one_conversation(tiny_stack, tmp_path):
    from llava.loading import load_model

    (first, second), clip = _files(tmp_path)
    per_image = load_model(str(tmp_path / "tiny" / "model")).process_images([Image.open(first)])[0].num_tokens
    sync_playwright = require_browser()
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), headless=True, executable_path=chromium_path(), args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = ctx.new_page()
            page.goto(tiny_stack.url, wait_until="domcontentloaded")
            page.wait_for_function("m => document.querySelector('#model-selector input')?.value === m", arg="tiny",
                                   timeout=60_000)
            set_parameter(page, "max-tokens", 16)
            page.set_input_files("#chat-input input[type=file]", [str(first), str(second), str(clip)])
            page.wait_for_function(  # the uploads' thumbnails: two pictures and the clip's icon
                "() => document.querySelectorAll('#chat-input .thumbnail-item').length === 3 && "
                "document.querySelectorAll('#chat-input img').length === 2", timeout=30_000)
            box = page.locator("#chat-input textarea")
            box.fill(QUESTION)
            box.press("Enter")
            page.locator("#llava-chatbot .message.bot").last.wait_for(timeout=30_000)
            page.wait_for_selector("#regenerate-btn:not([disabled])", timeout=120_000)
            page.wait_for_function(LAST_BOT_DONE, timeout=10_000)
            page.locator("#llava-chatbot video").first.wait_for(timeout=10_000)  # the clip as a player
            assert page.locator("#llava-chatbot img").count() >= 2  # both pictures in the chat
            reply = page.locator("#llava-chatbot .message.bot").last.inner_text().strip()
            page.wait_for_function("() => document.querySelector('#token-costs')?.innerText.includes('tokens')",
                                   timeout=10_000)
            costs = page.locator("#token-costs").inner_text()
            (REPO / "test-artifacts").mkdir(exist_ok=True)
            page.screenshot(path=str(REPO / "test-artifacts" / "browser-video.png"), full_page=True)
        finally:
            ctx.close()
    assert reply and "Error" not in reply
    (chat,) = [e for e in tiny_stack.log_events() if e["type"] == "chat"]
    assert chat["messages"][0]["content"] == f"<image>\n<image>\n<video>\n{QUESTION}"
    assert len(chat["images"]) == 2 and len(chat["videos"]) == 1 and chat["finish_reason"] in ("stop", "length")
    visual = 2 * per_image + FRAMES * per_image  # a plain llava reads each frame as one image
    assert chat["usage"]["image_tokens"] == visual
    assert f"{visual} of them" in costs or f"video 1: {FRAMES} frames, {FRAMES * per_image} tokens" in costs
