"""The web chat in a real browser: headless Debian Chromium driven by Playwright uploads an easy-VQA image, asks
"What color is the shape?" and reads the streamed answer.

Needs `apt-get install -y chromium chromium-driver` and the `playwright` package (never `playwright install`: it
downloads a browser). Skipped with that hint when either is missing. The fast test uses a tiny random model (checks
that a streamed reply appears); the slow one uses the embedded default model and checks the colour it names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DEMO, REPO, Stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
ARTIFACTS = REPO / "test-artifacts"
QUESTION = "What color is the shape?"

pytestmark = pytest.mark.browser


def chromium_path() -> str | None:
    return CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")


def require_browser():
    if chromium_path() is None:
        pytest.skip("Debian chromium not found at /usr/bin/chromium; enable the browser tests with "
                    "`apt-get update && apt-get install -y chromium chromium-driver` (never `playwright install`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed; `pip install playwright` and "
                    "`apt-get install -y chromium chromium-driver` (never `playwright install`)")
    return sync_playwright


def easyvqa_image(color: str | None = None) -> tuple[Path, dict]:
    manifest = json.loads((DEMO / "manifest.json").read_text())
    name, info = next((n, i) for n, i in manifest.items() if "color" in i and (color is None or i["color"] == color))
    return DEMO / name, info


LAST_BOT_DONE = (  # gradio shows "Loading content" in a bubble until its text arrives
    "() => { const b = [...document.querySelectorAll('#llava-chatbot .message.bot')].pop();"
    " return b && b.innerText.trim() && !b.innerText.includes('Loading content'); }"
)


def set_parameter(page, elem_id: str, value: float) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    if not field.is_visible():
        page.get_by_text("Parameters").click()  # the accordion starts closed
    field.fill(str(value))
    field.press("Enter")


def chat_in_browser(url: str, model: str, image: Path, tmp: Path, screenshot: Path, timeout_ms: int,
                    then=None, max_tokens: int | None = None, greedy: bool = False) -> str:
    """Open the page, attach `image`, ask QUESTION, wait for the streamed reply to finish; return its text.
    `then(page)`, if given, runs afterwards on the same page."""
    sync_playwright = require_browser()
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp / "profile"), headless=True, executable_path=chromium_path(), args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        page = ctx.new_page()
        try:
            page.goto(url, wait_until="domcontentloaded")
            # gradio keeps a connection open, so wait for elements, never for network idle
            page.wait_for_function(
                "m => document.querySelector('#model-selector input')?.value === m", arg=model, timeout=60_000)
            if max_tokens is not None:
                set_parameter(page, "max-tokens", max_tokens)
            if greedy:  # a random model sampled may end a reply at its first token
                set_parameter(page, "temperature", 0)
            page.set_input_files("#chat-input input[type=file]", str(image))
            page.locator("#chat-input img").first.wait_for(timeout=30_000)  # the upload's thumbnail
            box = page.locator("#chat-input textarea")
            box.fill(QUESTION)
            box.press("Enter")
            bot = page.locator("#llava-chatbot .message.bot").last
            bot.wait_for(timeout=30_000)
            # finished when Regenerate is enabled again (it is disabled while a reply streams)
            page.wait_for_selector("#regenerate-btn:not([disabled])", timeout=timeout_ms)
            page.wait_for_function(LAST_BOT_DONE, timeout=10_000)
            page.locator("#llava-chatbot img").first.wait_for(timeout=10_000)  # the image shows in the chat
            reply = bot.inner_text().strip()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            if then is not None:
                then(page)
            return reply
        except Exception:
            # what the page showed when it went wrong, next to the passing runs' screenshots
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot.with_name(screenshot.stem + "-failed.png")), full_page=True)
            raise
        finally:
            ctx.close()


@pytest.fixture
def browser_available():
    """Skips (with how to enable it) before any server is started."""
    return require_browser()


@pytest.fixture
def tiny_stack(tmp_path):
    from llava.testing import make_tiny_llava

    s = Stack(make_tiny_llava(tmp_path / "tiny"), tmp_path, "tiny")
    try:
        s.wait_ready(timeout=180)
        yield s
    finally:
        s.close()


def stop_mid_reply(page) -> str:
    """Ask a follow-up, press Stop as soon as some text has streamed; return the reply shown afterwards."""
    set_parameter(page, "max-tokens", 300)  # the tiny model's context is 512 tokens
    box = page.locator("#chat-input textarea")
    box.fill("Describe it in detail.")
    box.press("Enter")
    page.wait_for_function(
        "() => document.querySelectorAll('#llava-chatbot .message.bot').length === 2", timeout=30_000)
    page.wait_for_function(LAST_BOT_DONE, timeout=30_000)
    page.click("#stop-btn")
    # generous: on a loaded 2-core machine the cancelled event and the Stop handler queue behind other work
    page.wait_for_selector("#regenerate-btn:not([disabled])", timeout=90_000)
    page.wait_for_function(LAST_BOT_DONE, timeout=30_000)
    return page.locator("#llava-chatbot .message.bot").last.inner_text().strip()


def test_browser_chat_streams_a_reply(browser_available, tiny_stack, tmp_path):
    image, _ = easyvqa_image()
    after_stop: list[str] = []
    reply = chat_in_browser(tiny_stack.url, "tiny", image, tmp_path, ARTIFACTS / "browser-chat-tiny.png", 60_000,
                            then=lambda page: after_stop.append(stop_mid_reply(page)), max_tokens=64,
                            greedy=True)
    assert reply and "Error" not in reply
    chats = [e for e in tiny_stack.log_events() if e["type"] == "chat"]
    assert len(chats) == 2 and chats[0]["messages"][0]["content"] == f"<image>\n{QUESTION}"
    assert chats[0]["messages"][1]["role"] == "assistant" and chats[0]["messages"][1]["content"]
    assert chats[0]["finish_reason"] in ("stop", "length")
    assert chats[0]["params"]["temperature"] == 0 and chats[0]["params"]["max_new_tokens"] == 64
    # Stop keeps the streamed text as the reply (or the reply had already finished: the race is the model's)
    second = chats[1]
    assert second["finish_reason"] in ("stopped", "stop", "length")
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user", "assistant"]
    kept = second["messages"][-1]["content"]
    assert kept and after_stop and after_stop[0] and "Loading content" not in after_stop[0]


def test_browser_chat_default_model_names_the_colour(tmp_path):
    require_browser()
    s = Stack(Path("default"), tmp_path, "default")
    try:
        s.wait_ready(timeout=900)
        image, info = easyvqa_image("blue")
        reply = chat_in_browser(s.url, "default", image, tmp_path, ARTIFACTS / "browser-chat.png", 120_000)
    finally:
        s.close()
    assert info["color"] in reply.lower(), f"expected {info['color']!r} in the reply {reply!r}"
