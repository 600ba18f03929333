"""serve.model_worker.ServingModel in-process (no HTTP): the raw-prompt path, the messages path, quantized loads."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from llava.templates import render_text
from serve.serving import ImageLimits, ServingModel, is_out_of_memory
from serve.protocol import ErrorCode, GenerateStreamRequest, SamplingFields, ServeError


def png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from llava.testing import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("worker") / "tiny")


@pytest.fixture(scope="module")
def serving(model_dir):
    s = ServingModel.load(str(model_dir), names=["tiny"], limits=ImageLimits(max_images=2))
    s.engine.start()
    yield s
    s.engine.shutdown()


def run(serving: ServingModel, prepared) -> str:
    return serving.submit(prepared).result(timeout=60).text


GREEDY = SamplingFields(temperature=0, max_new_tokens=6)


def test_raw_prompt_expands_each_image_and_matches_the_messages_path(serving):
    messages = [{"role": "user", "content": "<image>\nWhat is it?\n<image>"}]
    images = [png(), png((0, 0, 255))]
    prompt = render_text(messages, serving.loaded.template, add_generation_prompt=True)
    raw = serving.prepare_prompt(GenerateStreamRequest(prompt=prompt, images=[], **GREEDY.model_dump()), images)
    structured = serving.prepare_messages(messages, images, GREEDY)
    image_id = serving.loaded.image_token_id
    assert raw.input_ids.count(image_id) == sum(im.num_tokens for im in raw.images) == raw.image_tokens == 8
    # a LLaVA client that templated the same conversation gets exactly the ids of the structured path
    assert raw.input_ids == structured.input_ids
    assert run(serving, raw) == run(serving, structured)


def test_temperature_below_llava_threshold_is_greedy_and_stops_merge(serving):
    p = serving.sampling(SamplingFields(temperature=0.0005, stop="###"))
    assert p.temperature == 0.0 and p.stop == ("###", *serving.loaded.template.stop_strings)
    with pytest.raises(ServeError) as e:
        serving.sampling(SamplingFields(temperature=-0.5))
    assert e.value.code == ErrorCode.INVALID_PARAMS and "temperature" in e.value.message


def test_bos_is_prepended_for_templates_that_have_one(model_dir):
    s = ServingModel.load(str(model_dir), names=["tiny"], template="vicuna_v1")
    prompt = "USER: hi ASSISTANT:"
    ids = s.tokenize_prompt(prompt, [])
    bos = s.loaded.tokenizer.convert_tokens_to_ids("<s>")
    assert ids[0] == bos and s.tokenize_prompt("<s>" + prompt, []) == ids


def test_errors_name_the_cause(serving):
    req = GenerateStreamRequest(prompt="<image><image><image>", **GREEDY.model_dump())
    with pytest.raises(ServeError) as e:
        serving.prepare_prompt(req, [png()] * 3)
    assert e.value.code == ErrorCode.TOO_MANY_IMAGES and "at most 2" in e.value.message
    with pytest.raises(ServeError) as e:
        serving.prepare_messages([{"role": "user", "content": "hi"}], [b"GIF89a broken"], GREEDY)
    assert e.value.code == ErrorCode.IMAGE_COUNT_MISMATCH
    with pytest.raises(ServeError) as e:
        serving.prepare_messages([{"role": "user", "content": "<image>"}], [b"GIF89a broken"], GREEDY)
    assert e.value.code == ErrorCode.BAD_IMAGE and "image 0" in e.value.message
    long = serving.prepare_messages([{"role": "user", "content": "red " * 600}], [], GREEDY)
    with pytest.raises(ServeError) as e:
        serving.submit(long)
    assert e.value.code == ErrorCode.PROMPT_TOO_LONG and "512" in e.value.message
    assert is_out_of_memory("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_out_of_memory("RuntimeError: shape mismatch")


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_worker_generates(model_dir, quantization):
    pytest.importorskip("bitsandbytes")
    s = ServingModel.load(str(model_dir), names=["tiny"], quantization=quantization)
    s.engine.start()
    try:
        prepared = s.prepare_messages([{"role": "user", "content": "<image>\nhello"}], [png()], GREEDY)
        result = s.submit(prepared).result(timeout=60)
        assert result.finish_reason in ("stop", "length") and result.completion_tokens >= 1
    finally:
        s.engine.shutdown()
