"""llava.chat.ChatSession: the conversation object shared by the CLI and the web UI."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from llava.chat import ChatSession, ChatStateError, image_bytes
from llava.images import ImageError
from llava.templates import ImageCountError, TemplateError, render, render_text
from llava.testing import make_tiny_tokenizer


def png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, "PNG")
    return buf.getvalue()


def test_multi_turn_with_images_renders_like_the_renderer(tmp_path):
    red_file = tmp_path / "red.png"
    red_file.write_bytes(png())
    s = ChatSession()
    s.add_user("What is this?", [str(red_file)])
    assert s.awaiting_reply and s.images == [png()]
    s.add_assistant("A red square.")
    s.add_user("And this one?", [Image.new("RGB", (8, 8), (0, 0, 255))])
    assert s.num_turns == 2 and len(s.images) == 2
    assert s.to_messages() == [
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "<image>\nAnd this one?"},
    ]
    assert Image.open(io.BytesIO(s.images[1])).getpixel((0, 0)) == (0, 0, 255)
    text = s.prompt_text("chatml_direct")
    assert text == render_text(s.to_messages(), "chatml_direct", add_generation_prompt=True)
    assert text.count("<image>") == 2 and text.endswith("<|im_start|>assistant\n")
    tok = make_tiny_tokenizer()
    ids = render(s.to_messages(), "chatml_direct", tok, image_token_counts=[3, 5], add_generation_prompt=True).input_ids
    assert ids.count(tok.image_token_id) == 8


def test_explicit_markers_and_system_prompt():
    s = ChatSession(system="Be brief.")
    s.add_user("Compare <image> with <image>.", [png(), png((0, 255, 0))])
    assert s.to_messages()[0] == {"role": "system", "content": "Be brief."}
    assert s.to_messages()[1]["content"] == "Compare <image> with <image>."
    assert "Be brief." in s.prompt_text("vicuna_v1")
    with pytest.raises(ImageCountError, match="2 <image> marker"):
        ChatSession().add_user("<image> <image>", [png()])


def test_bad_input_leaves_the_session_unchanged(tmp_path):
    s = ChatSession()
    with pytest.raises(ImageError):
        s.add_user("hi", [b"not an image"])
    with pytest.raises(ImageError, match="no such image file|base64"):
        s.add_user("hi", [str(tmp_path / "missing.png")])
    with pytest.raises(ChatStateError):
        s.add_user("   ")
    with pytest.raises(ChatStateError):
        s.add_assistant("reply without a question")
    assert s.messages == [] and s.images == []
    s.add_user("hi")
    with pytest.raises(ChatStateError, match="already from the user"):
        s.add_user("again")


def test_pop_clear_and_regenerate():
    s = ChatSession()
    s.add_user("first", [png()])
    s.add_assistant("one")
    s.add_user("second", [png((0, 0, 255)), png((0, 255, 0))])
    text, imgs = s.pop_user()  # generation failed: back to the state before the message
    assert text == "<image>\n<image>\nsecond" and len(imgs) == 2 and s.images == [png()]
    assert s.pop_assistant() == "one" and s.awaiting_reply
    s.add_assistant("echoed <image> marker")  # must not create a phantom image slot
    assert s.messages[-1]["content"].count("<image>") == 0
    with pytest.raises(TemplateError):
        s.prompt_text("chatml_direct")  # not awaiting a reply
    s.clear()
    assert s.messages == [] and s.images == [] and s.num_turns == 0


def test_image_bytes_keeps_file_encoding_and_validates(tmp_path):
    jpg = tmp_path / "x.jpg"
    Image.new("RGB", (10, 10), (1, 2, 3)).save(jpg, "JPEG")
    assert image_bytes(str(jpg)) == jpg.read_bytes()
    with pytest.raises(ImageError, match="too many pixels"):
        image_bytes(png(), max_pixels=100)
