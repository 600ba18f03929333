"""Video input: decoding with PyAV (uniform frame sampling, limits, errors naming the cause), the worker's `videos`
field on both paths, frames cached by content, the prompt-too-long error counting frames, the OpenAI `video_url`
part."""

from __future__ import annotations

import asyncio
import base64
import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_onevision as tiny
from llava.engine import Engine, GenerationRequest, PromptTooLongError, SamplingParams
from llava.images import ProcessedVideo
from llava.loading import load_model
from llava.templates import render_text, stop_token_ids
from llava.video import VideoError, VideoLimits, VideoUnavailableError, decode_video
from serve.openai_api_server import ChatCompletionRequest, OpenAIConfig, worker_payload
from serve.protocol import ErrorCode, GenerateMessagesRequest, GenerateStreamRequest, ServeError
from serve.serving import ImageLimits, ServingModel

av = pytest.importorskip("av")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _levels(frames) -> list[int]:
    """The index each frame shows (grey level / 8; lossy codecs move a level by up to ~4 of 8)."""
    levels = [np.asarray(f)[..., 0].mean() / 8 for f in frames]
    nearest = [int(round(x)) for x in levels]
    assert all(abs(x - n) < 0.6 for x, n in zip(levels, nearest)), levels
    return nearest


def _uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("fmt, codec", [("mp4", "mpeg4"), ("mp4", "libx264"), ("webm", "libvpx"), ("webm", "libvpx-vp9")])
def test_frames_are_sampled_uniformly(fmt, codec):
    video = decode_video(tiny.encode_video(30, fmt, codec), 8)
    assert video.total_frames == 30 and video.duration == pytest.approx(3.0, abs=0.15)
    want = np.linspace(0, 29, 8).round().astype(int).tolist()  # [0, 4, 8, 12, 17, 21, 25, 29]
    levels = [np.asarray(f)[..., 0].mean() / 8 for f in video.frames]
    assert np.allclose(levels, want, atol=0.6), levels
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in video.frames)


def test_short_video_gives_all_frames_and_limits_cap_the_count():
    assert _levels(decode_video(tiny.encode_video(5), 16).frames) == [0, 1, 2, 3, 4]
    assert len(decode_video(tiny.encode_video(30), 16, VideoLimits(max_frames=4)).frames) == 4


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, limits, words", [
    (b"", VideoLimits(), "empty"),
    (b"definitely not a video" * 20, VideoLimits(), "not a readable video"),
    ("png", VideoLimits(), "not a video: container format 'png_pipe'"),
    ("truncated", VideoLimits(), "not a readable video"),
    ("ok", VideoLimits(max_seconds=1), "too long: 3.0 s exceeds the limit of 1 s"),
    ("ok", VideoLimits(max_bytes=100), "too large"),
    ("ok", VideoLimits(max_pixels=1000), "frames too large: 64x48"),
])
def test_bad_videos_name_the_cause(data, limits, words):
    data = {"png": _png(), "truncated": tiny.encode_video()[:400], "ok": tiny.encode_video()}.get(data, data)
    with pytest.raises(VideoError, match=words):
        decode_video(data, 8, limits)


def test_without_pyav_the_error_says_how_to_install(monkeypatch):
    data = tiny.encode_video(3)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoUnavailableError, match=r"pip install 'llava\[video\]'"):
        decode_video(data, 2)


# ------------------------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    tok = tiny.tokenizer()
    path = tiny.save(tiny.onevision_model(tok), tok, tiny.onevision_image_processor(), tmp_path_factory.mktemp("ov"))
    lm = load_model(str(path), template="qwen_1_5", dtype="float32")
    engine = Engine(lm.model, lm.tokenizer, eos_token_ids=stop_token_ids(lm.template, lm.tokenizer))
    return ServingModel(lm, engine, ["ov"])


@pytest.fixture(scope="module")
def llava_small(tmp_path_factory):
    """A plain llava (frames read as images, 4 tokens each) with a context of 120 tokens."""
    from llava.testing import make_tiny_llava

    lm = load_model(str(make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")), dtype="float32")
    engine = Engine(lm.model, lm.tokenizer, eos_token_ids=stop_token_ids(lm.template, lm.tokenizer),
                    context_length=120)
    return ServingModel(lm, engine, ["tiny"], ImageLimits(max_frames=32))


def _run(serving, prepared) -> list[int]:
    handle = serving.submit(prepared)
    serving.engine.run_until_idle()
    result = handle.result(0)
    assert result.error is None, result.error
    return result.token_ids


def _png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


FIELDS = dict(temperature=0, max_new_tokens=5)


def test_onevision_images_and_a_video_both_paths_and_frames_cached(onevision):
    video = base64.b64encode(tiny.encode_video(30)).decode()
    images = [_png_b64((255, 0, 0)), _png_b64((0, 0, 255))]
    messages = [{"role": "user", "content": "<image>\n<video>\nwhat happens?\n<image>"}]
    req = GenerateMessagesRequest(messages=messages, images=images, videos=[video], max_frames=6, **FIELDS)
    prepared = onevision.prepare_messages(messages, [base64.b64decode(i) for i in images], req)
    (v,) = prepared.videos
    assert isinstance(v, ProcessedVideo) and v.num_frames == 6 and v.num_tokens == 6 * 4 + 1
    assert [m[0] for m in prepared.media] == ["image", "video", "image"] and prepared.media[1][2] == 6
    assert prepared.image_tokens == 2 * (tiny.BASE_TOKENS + 1) + 25  # several images: base views + newline each
    prompt = render_text(messages, onevision.loaded.template, add_generation_prompt=True)
    raw = onevision.prepare_prompt(GenerateStreamRequest(prompt=prompt, videos=[video], max_frames=6, **FIELDS),
                                   [base64.b64decode(i) for i in images])
    assert raw.input_ids == prepared.input_ids
    first = _run(onevision, prepared)
    hits = onevision.engine.stats().image_cache.hits
    assert _run(onevision, raw) == first  # same tokens from cached features (prefix cache aside)
    assert onevision.engine.stats().image_cache.hits >= hits  # nothing re-encoded
    # a shorter sample of the same file shares frames 0 and 29 with it: only the new frames are encoded
    misses = onevision.engine.stats().image_cache.misses
    again = GenerateMessagesRequest(messages=[{"role": "user", "content": "<video>\nagain"}], videos=[video],
                                    max_frames=2, **FIELDS)
    _run(onevision, onevision.prepare_messages(again.model_dump()["messages"], [], again))
    assert onevision.engine.stats().image_cache.misses == misses


def test_video_count_mismatch_and_bad_video_are_400s(onevision):
    messages = [{"role": "user", "content": "<video>\n<video>\nhi"}]
    one = base64.b64encode(tiny.encode_video(4)).decode()
    with pytest.raises(ServeError) as e:
        onevision.prepare_messages(messages, [], GenerateMessagesRequest(messages=messages, videos=[one], **FIELDS))
    assert e.value.code == ErrorCode.IMAGE_COUNT_MISMATCH and "2 <video> marker(s) but 1 video(s)" in e.value.message
    with pytest.raises(ServeError) as e:
        onevision.prepare_prompt(GenerateStreamRequest(prompt="<video> hi", videos=[], **FIELDS), [])
    assert e.value.code == ErrorCode.IMAGE_COUNT_MISMATCH
    bad = base64.b64encode(b"not a video at all" * 10).decode()
    msgs = [{"role": "user", "content": "<video>\nhi"}]
    with pytest.raises(ServeError) as e:
        onevision.prepare_messages(msgs, [], GenerateMessagesRequest(messages=msgs, videos=[bad], **FIELDS))
    assert e.value.code == ErrorCode.BAD_VIDEO and e.value.status == 400 and "video 0: not a readable video" in e.value.message


def test_onevision_too_long_says_how_many_frames_fit(onevision):
    lm = onevision.loaded
    frames = [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(300)]
    video = lm.process_video(frames)
    prompt = lm.prompt([{"role": "user", "content": "<video>\nhi"}], videos=[video])
    n = len(prompt.input_ids)
    with pytest.raises(PromptTooLongError) as e:
        onevision.engine.submit(GenerationRequest(prompt.input_ids, [], SamplingParams(), videos=prompt.videos))
    fit = e.value.frames_that_fit
    assert f"video 1: {video.num_tokens} (300 frames)" in str(e.value) and f"at most {fit} frames" in str(e.value)
    assert n - 4 * (300 - fit) < tiny.CONTEXT <= n - 4 * (300 - fit - 1)  # fit frames fit, one more would not


def test_frames_as_images_on_a_plain_llava(llava_small):
    video = base64.b64encode(tiny.encode_video(30)).decode()
    messages = [{"role": "user", "content": "<video>\nwhat?"}]
    req = GenerateMessagesRequest(messages=messages, videos=[video], max_frames=4, **FIELDS)
    prepared = llava_small.prepare_messages(messages, [], req)
    per = llava_small.loaded.process_images([Image.new("RGB", (8, 8))])[0].num_tokens
    assert not prepared.videos and len(prepared.images) == 4 and prepared.image_tokens == 4 * per
    assert prepared.media == [("video", 4 * per, 4)]
    prompt = render_text(messages, llava_small.loaded.template, add_generation_prompt=True)
    raw = llava_small.prepare_prompt(GenerateStreamRequest(prompt=prompt, videos=[video], max_frames=4, **FIELDS), [])
    assert raw.input_ids == prepared.input_ids
    assert _run(llava_small, prepared) == _run(llava_small, raw)
    # 32 frames do not fit in 120 tokens: the error names the video and how many frames would
    long = GenerateMessagesRequest(messages=messages, videos=[video], max_frames=32, **FIELDS)
    with pytest.raises(ServeError) as e:
        llava_small.submit(llava_small.prepare_messages(messages, [], long))
    assert e.value.code == ErrorCode.PROMPT_TOO_LONG
    assert f"video 1: {30 * per} (30 frames)" in e.value.message and "would fit with at most" in e.value.message


# ------------------------------------------------------------------------------------------------ OpenAI API


def test_openai_video_url_parts_reach_the_worker_payload():
    data = tiny.encode_video(3, "webm", "libvpx")
    req = ChatCompletionRequest(model="m", max_frames=8, messages=[
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": _uri(data, "video/webm")}},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}},
                                     {"type": "text", "text": "and now?"}]},
    ])
    payload = asyncio.run(worker_payload(OpenAIConfig(), req))
    assert payload["messages"][2]["content"] == "<video>\n<image>\nand now?"
    assert len(payload["images"]) == 2 and payload["videos"] == [_uri(data, "video/webm")] and payload["max_frames"] == 8
    GenerateMessagesRequest(**payload)  # the worker accepts it as it is


@pytest.mark.parametrize("part, code", [
    ({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}, "bad_video"),
    ({"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}, "bad_video"),
    ({"type": "video_url"}, "invalid_params"),
])
def test_openai_video_url_refusals(part, code):
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [part]}])
    with pytest.raises(ServeError) as e:
        asyncio.run(worker_payload(OpenAIConfig(), req))
    assert e.value.code.name.lower() == code and e.value.status == 400


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_attaches_videos_and_images_mid_conversation(onevision, tmp_path):
    from llava.chat import ChatSession
    from serve.cli import LocalBackend, chat_loop
    from serve.protocol import SamplingFields

    clip, broken, picture = tmp_path / "clip.webm", tmp_path / "broken.mp4", tmp_path / "red.png"
    clip.write_bytes(tiny.encode_video(12, "webm", "libvpx"))
    broken.write_bytes(b"\0" * 300)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(picture)
    lm = onevision.loaded
    backend = LocalBackend.__new__(LocalBackend)  # the in-process backend around an already loaded model
    backend.serving = ServingModel(lm, Engine(lm.model, lm.tokenizer, eos_token_ids=[lm.tokenizer.eos_token_id]).start(), ["ov"])
    backend.adapter, backend.name = None, "ov"
    session, out = ChatSession(), io.StringIO()
    script = f"/video {clip}\nwhat happens?\n/image {picture}\n/video {broken}\nand here?\n/exit\n"
    try:
        chat_loop(backend, session, SamplingFields(temperature=0, max_new_tokens=3, max_frames=5),
                  [], io.StringIO(script), out, [])
    finally:
        backend.close()
    text = out.getvalue()
    assert "(video attached" in text and "(image attached" in text and "[error bad_video: not a readable video" in text
    assert "[error" not in text.replace("[error bad_video", "")
    assert [m["content"].split("\n")[0] for m in session.messages[::2]] == ["<video>", "<image>"]
    assert len(session.videos) == 1 and len(session.images) == 1 and session.num_turns == 2


# ------------------------------------------------------------------------------------------------ whole stack


@pytest.mark.slow  # starts controller, worker and OpenAI server as processes (~40 s on 2 busy cores)
def test_openai_sdk_several_images_and_a_video_through_the_stack(tmp_path):
    import openai

    from conftest import API_KEY, IMAGE_TOKENS, MODEL, start_cluster

    cluster = start_cluster(tmp_path, 1, openai=True)
    try:
        client = openai.OpenAI(base_url=cluster.procs["openai"].url + "/v1", api_key=API_KEY, max_retries=0)
        png = "data:image/png;base64," + _png_b64((255, 0, 0))
        video = _uri(tiny.encode_video(5, "webm", "libvpx"), "video/webm")
        reply = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, extra_body={"max_frames": 3},
                                               messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "a"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                         {"type": "image_url", "image_url": {"url": png}},
                                         {"type": "text", "text": "and these?"}]},
        ])
        assert reply.choices[0].message.content is not None
        # two images and three frames read as images by this plain llava
        assert reply.usage.prompt_tokens_details.image_tokens == 5 * IMAGE_TOKENS
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": _uri(b"\0" * 500)}}, {"type": "text", "text": "?"}]}])
        assert e.value.body["code"] == "bad_video" and "not a readable video" in e.value.body["message"]
    finally:
        cluster.stop_all()


# ------------------------------------------------------------------------------------------------ web UI


def test_web_ui_turns_with_images_and_videos(tmp_path):
    from serve.gradio_web_server import ChatHandlers, WebChat, WebConfig, token_costs

    picture, clip, broken = tmp_path / "red.png", tmp_path / "clip.mp4", tmp_path / "broken.webm"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(picture)
    clip.write_bytes(tiny.encode_video(4))
    broken.write_bytes(b"\0" * 100)
    h = ChatHandlers(WebConfig(log_dir=tmp_path / "logs"))
    chat, shown, *_ = h.add_text(WebChat(), {"text": "what?", "files": [str(picture), str(clip)]})
    assert chat.session.messages[-1]["content"] == "<image>\n<video>\nwhat?" and len(chat.session.videos) == 1
    assert shown[-1]["content"] == [{"path": str(picture)}, {"path": str(clip)}, "what?"]  # the clip plays in the chat
    assert list((tmp_path / "logs" / "videos").glob("*.mp4")) and len(chat.video_shas) == 1
    chat.session.add_assistant("ok")
    chat, shown, *_ = h.add_text(chat, {"text": "and this?", "files": [str(broken)]})
    assert "VideoError" in chat.error and "not a readable video" in chat.error and chat.session.num_turns == 1
    usage = {"prompt_tokens": 120, "image_tokens": 91,
             "media": [{"type": "image", "tokens": 4}, {"type": "video", "tokens": 87, "frames": 4}]}
    assert token_costs(usage) == ("prompt 120 tokens — image 1: 4 tokens, video 1: 4 frames, 87 tokens, "
                                  "text: 29 tokens")
    assert token_costs({"prompt_tokens": 50, "image_tokens": 20}) == "prompt: 50 tokens, 20 of them for images/video frames"


def test_openai_video_url_fetched_over_http_only_when_allowed(tmp_path):
    import functools
    import http.server
    import threading

    from serve.openai_api_server import video_payload

    (tmp_path / "clip.webm").write_bytes(data := tiny.encode_video(3, "webm", "libvpx"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/clip.webm"
    try:
        got = asyncio.run(video_payload(OpenAIConfig(allow_image_urls=True), url, 0))
        assert base64.b64decode(got) == data
        with pytest.raises(ServeError, match="video 0: .*more than 100 bytes"):
            asyncio.run(video_payload(OpenAIConfig(allow_image_urls=True, video_url_max_bytes=100), url, 0))
        with pytest.raises(ServeError, match="disabled"):
            asyncio.run(video_payload(OpenAIConfig(), url, 0))
    finally:
        server.shutdown()
