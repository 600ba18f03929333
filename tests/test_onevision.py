"""LLaVA-OneVision and LLaVA-NeXT-Interleave on tiny random models: folders load, pixels and token counts equal
transformers' own processor classes, and the engine's greedy output equals transformers' `generate` for one image,
several images and a video, on both LLM runners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionProcessor

import tiny_onevision as tiny
from llava.engine import Engine, GenerationRequest, SamplingParams
from llava.images import preprocess_video
from llava.loading import load_model
from llava.templates import stop_token_ids
from llava.zoo import ZOO, get_entry, memory_gb
from serve.protocol import IMAGE_ID

SIZES = [(40, 90), (90, 40), (20, 20), (100, 100), (33, 70), (64, 31)]  # (h, w): wide, tall, small, 3x3 grid...


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def onevision(tok, tmp_path_factory):
    path = tiny.save(tiny.onevision_model(tok), tok, tiny.onevision_image_processor(),
                     tmp_path_factory.mktemp("onevision"))
    return load_model(str(path), template="qwen_1_5", dtype="float32")


@pytest.fixture(scope="module")
def interleave(tok, tmp_path_factory):
    path = tiny.save(tiny.interleave_model(tok), tok, tiny.siglip_image_processor(),
                     tmp_path_factory.mktemp("interleave"))
    return load_model(str(path), template="qwen_1_5", dtype="float32")


def _image(seed: int, hw=(40, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))


def _hf_counter():
    """transformers' LlavaOnevisionProcessor token arithmetic (its constructor needs torchvision for the video
    processor, which does not import beside this torch: the counting methods need only these attributes)."""
    p = object.__new__(LlavaOnevisionProcessor)
    p.image_processor = tiny.onevision_image_processor()
    p.num_image_tokens, p.vision_feature_select_strategy = tiny.BASE_TOKENS, "full"
    p.vision_aspect_ratio, p.image_token, p.video_token = f"anyres_max_{tiny.ANYRES_MAX}", "<image>", "<video>"
    return p


# ------------------------------------------------------------------------------------------------ loading


def test_folders_load_with_their_processing(onevision, interleave):
    proc = onevision.image_processing
    assert (proc.mode, proc.size, proc.anyres_max, proc.num_prefix_tokens, proc.keep_cls) == ("anyres", 32, 2, 0, False)
    assert [list(p) for p in proc.grid_pinpoints] == tiny.PINPOINTS and list(proc.mean) == tiny.MEAN
    assert onevision.video_token_id == onevision.tokenizer.video_token_id and onevision.default_max_frames == 32
    assert (interleave.image_processing.mode, interleave.image_processing.size) == ("resize", 32)
    assert interleave.video_token_id is None and interleave.model.config.text_config.model_type == "qwen2"


def test_zoo_entries_and_memory():
    names = {e.name for e in ZOO}
    for size in ("0.5b", "7b", "72b"):
        for kind in ("si", "ov"):
            e = get_entry(f"llava-hf/llava-onevision-qwen2-{size}-{kind}-hf")
            assert e.arch == "llava_onevision" and e.template == "qwen_1_5" and f"llava-onevision-{size}-{kind}" in names
    for size in ("0.5b", "7b"):
        e = get_entry(f"llava-hf/llava-interleave-qwen-{size}-hf")
        assert e.arch == "llava" and e.template == "qwen_1_5"
    small, big = get_entry("llava-onevision-0.5b-ov"), get_entry("llava-onevision-72b-ov")
    assert memory_gb(small, "bf16") < 5 < 100 < memory_gb(big, "bf16")
    assert memory_gb(big, "4bit") < memory_gb(big, "8bit") < memory_gb(big, "bf16")


# ------------------------------------------------------------------------------------------------ processing


@pytest.mark.parametrize("hw", SIZES)
def test_single_image_pixels_and_tokens_equal_transformers(onevision, hw):
    image = _image(0, hw)
    ours = onevision.process_images([image])[0]
    ref = tiny.onevision_image_processor()(image, return_tensors="np")
    assert torch.equal(ours.pixel_values, torch.from_numpy(ref["pixel_values"][0]))
    assert ours.num_tokens == len(_hf_counter().replace_image_token(ref, 0)) // len("<image>")


def test_several_images_are_base_views_as_in_transformers(onevision):
    images = [_image(i, hw) for i, hw in enumerate(SIZES[:3])]
    ours = onevision.process_images(images)
    ref = tiny.onevision_image_processor()([images], return_tensors="np")
    counter = _hf_counter()
    for i, im in enumerate(ours):
        assert torch.equal(im.pixel_values, torch.from_numpy(ref["pixel_values"][i]))
        assert im.num_tokens == len(counter.replace_image_token(ref, i)) // len("<image>") == tiny.BASE_TOKENS + 1
    single = onevision.process_images(images[:1])[0]
    assert single.key != ours[0].key  # different features: never share a cache entry
    assert all(IMAGE_ID.fullmatch(im.key) for im in (single, *ours))  # each can be sent again by id


def test_video_frames_equal_siglip_processing_and_count(onevision):
    frames = [_image(i, (48, 64)) for i in range(5)]
    video = onevision.process_video(frames)
    ref = tiny.siglip_image_processor()(frames, return_tensors="np")["pixel_values"]
    assert torch.equal(video.pixel_values, torch.from_numpy(ref))
    counted = _hf_counter().replace_video_token({"pixel_values_videos": [ref]}, 0)
    assert video.num_tokens == len(counted) // len("<video>") == 5 * 4 + 1
    assert len(set(video.frame_keys)) == 5 and video.key != preprocess_video(frames[:4], onevision.image_processing).key


# ------------------------------------------------------------------------------------------------ engine = generate


def _engine(lm, runner: str) -> Engine:
    return Engine(lm.model, lm.tokenizer, eos_token_ids=stop_token_ids(lm.template, lm.tokenizer), runner=runner)


def _engine_tokens(lm, runner, prompt, n=10) -> list[int]:
    eng = _engine(lm, runner)
    h = eng.submit(GenerationRequest(prompt.input_ids, prompt.images, SamplingParams(max_new_tokens=n, ignore_eos=True),
                                     videos=prompt.videos))
    eng.run_until_idle()
    result = h.result()
    assert result.error is None, result.error
    return result.token_ids


def _generate(lm, prompt, n=10, **inputs) -> list[int]:
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id, **inputs)
    return out[0, ids.shape[1]:].tolist()


def _msg(*parts: str) -> list[dict]:
    content = [{"type": p} if p in ("image", "video") else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("runner", ["llama", "transformers"])
def test_onevision_single_image_matches_generate(onevision, runner):
    image = _image(3, (40, 90))
    prompt = onevision.prompt(_msg("image", "what is this"), onevision.process_images([image]))
    ref = tiny.onevision_image_processor()(image, return_tensors="pt")
    want = _generate(onevision, prompt, pixel_values=ref["pixel_values"], image_sizes=ref["image_sizes"])
    assert _engine_tokens(onevision, runner, prompt) == want


@pytest.mark.parametrize("runner", ["llama", "transformers"])
def test_onevision_several_images_match_generate(onevision, runner):
    images = [_image(4, (40, 90)), _image(5, (64, 31)), _image(6, (20, 20))]
    prompt = onevision.prompt(_msg("image", "and", "image", "image", "compare them"), onevision.process_images(images))
    ref = tiny.onevision_image_processor()([images], return_tensors="pt")
    want = _generate(onevision, prompt, pixel_values=ref["pixel_values"], image_sizes=ref["image_sizes"],
                     batch_num_images=ref["batch_num_images"])
    assert _engine_tokens(onevision, runner, prompt) == want


@pytest.mark.parametrize("runner", ["llama", "transformers"])
def test_onevision_video_matches_generate(onevision, runner):
    frames = [_image(10 + i, (48, 64)) for i in range(4)]
    video = onevision.process_video(frames)
    prompt = onevision.prompt(_msg("video", "what happens"), videos=[video])
    assert prompt.videos == [video] and prompt.input_ids.count(onevision.video_token_id) == 4 * 4 + 1
    want = _generate(onevision, prompt, pixel_values_videos=video.pixel_values[None])
    assert _engine_tokens(onevision, runner, prompt) == want


def test_interleave_images_and_video_frames_match_generate(interleave):
    images = [_image(20, (40, 90)), _image(21, (30, 30))]
    frames = [_image(30 + i, (48, 64)) for i in range(3)]
    video = interleave.process_video(frames)  # frames as images
    prompt = interleave.prompt(_msg("image", "video", "image", "compare"), interleave.process_images(images),
                               videos=[video])
    assert len(prompt.images) == 5 and not prompt.videos
    assert [im.key for im in prompt.images][1:4] == [f.key for f in video]
    pixel_values = torch.stack([im.pixel_values for im in prompt.images])
    want = _generate(interleave, prompt, pixel_values=pixel_values)
    for runner in ("llama", "transformers"):
        assert _engine_tokens(interleave, runner, prompt) == want


def test_count_mismatch_names_both_counts(onevision):
    frames = [_image(40 + i) for i in range(2)]
    video = onevision.process_video(frames)
    prompt = onevision.prompt(_msg("video", "hi"), videos=[video])
    eng = _engine(onevision, "llama")
    with pytest.raises(ValueError, match=r"9 video tokens .* need 5"):
        short = onevision.prompt(_msg("video", "hi"), videos=[onevision.process_video(frames[:1])])
        eng.submit(GenerationRequest(prompt.input_ids, [], SamplingParams(), videos=short.videos))


# ------------------------------------------------------------------------------------------------ template


def test_qwen_1_5_template_text_jinja_and_labels(tok):
    from llava.templates import IGNORE_INDEX, render, render_text, to_jinja

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And now?"},
    ]
    text = render_text(messages, "qwen_1_5", add_generation_prompt=True)
    # LLaVA-NeXT's conv_qwen: ChatML with a newline after every <|im_end|>
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n<video>\n"
                    "What is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd now?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, chat_template=to_jinja("qwen_1_5"), tokenize=False,
                                   add_generation_prompt=True) == text
    r = render(messages, "qwen_1_5", tok, image_token_counts=[3], video_token_counts=[5], add_generation_prompt=True)
    assert r.input_ids.count(tok.image_token_id) == 3 and r.input_ids.count(tok.video_token_id) == 5
    labelled = tok.decode([t for t, lab in zip(r.input_ids, r.labels) if lab != IGNORE_INDEX])
    assert labelled == "A cat.<|im_end|>\n" and r.num_videos == 1


def test_interleave_pixels_and_tokens_equal_transformers(interleave, tok):
    from transformers import LlavaProcessor

    images = [_image(50, (40, 90)), _image(51, (64, 31))]
    ours = interleave.process_images(images)
    ref = tiny.siglip_image_processor()(images, return_tensors="pt")["pixel_values"]
    assert all(torch.equal(im.pixel_values, r) for im, r in zip(ours, ref))
    processor = LlavaProcessor(image_processor=tiny.siglip_image_processor(), tokenizer=tok, patch_size=tiny.PATCH,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0)
    ids = processor(images=images, text="<image><image> hi", return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(tok.image_token_id) == sum(im.num_tokens for im in ours) == 2 * tiny.BASE_TOKENS
