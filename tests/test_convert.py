"""Loading checkpoints that are not HF llava folders: original LLaVA format, projector-only + base, LoRA + base."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, CLIPVisionModel

from llava.convert import ConversionError
from llava.loading import LoadError, load_model
from llava.testing import make_tiny_llava, make_tiny_llm_dir, make_tiny_vision_dir
from llava.weights import WeightsError, read_file

from conftest import original_checkpoint


def _reference_logits(vision_dir, llm, projector, ids, image_positions, pixel_values):
    """The original LLaVA forward by hand: CLIP hidden_states[-2] minus CLS -> mlp2x_gelu -> scattered embeddings."""
    clip = CLIPVisionModel.from_pretrained(vision_dir).eval()
    with torch.no_grad():
        feats = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        h = torch.nn.functional.linear(feats, projector["model.mm_projector.0.weight"], projector["model.mm_projector.0.bias"])
        h = torch.nn.functional.linear(torch.nn.functional.gelu(h), projector["model.mm_projector.2.weight"], projector["model.mm_projector.2.bias"])
        safe = ids.clone()
        safe[0, image_positions] = 0
        embeds = llm.get_input_embeddings()(safe)
        embeds[0, image_positions] = h[0]
        return llm(inputs_embeds=embeds).logits


def _run(lm, image):
    processed = lm.process_images([image])
    rendered = lm.render([{"role": "user", "content": "<image>\nWhat shape is it?"}], processed)
    ids = torch.tensor([rendered.input_ids])
    with torch.no_grad():
        logits = lm.model(input_ids=ids, pixel_values=processed[0].pixel_values[None]).logits
    return ids, processed[0], logits


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
def test_original_checkpoint_converts_to_the_same_function(tmp_path, weights_format, monkeypatch):
    monkeypatch.setenv("LLAVA_CACHE", str(tmp_path / "cache"))
    path, vision, _, llm, projector = original_checkpoint(tmp_path, weights_format=weights_format)
    with pytest.raises(ConversionError, match="template"):
        load_model(str(path), dtype="float32")
    lm = load_model(str(path), template="vicuna_v1", dtype="float32")
    assert lm.template.name == "vicuna_v1" and lm.image_processing.mode == "pad"
    image = Image.new("RGB", (24, 16), (200, 30, 30))
    ids, processed, logits = _run(lm, image)
    positions = (ids[0] == lm.image_token_id).nonzero().flatten()
    assert len(positions) == processed.num_tokens == 4
    ref = _reference_logits(vision, llm, projector, ids, positions, processed.pixel_values[None])
    # The converted vocabulary gained <image>/<pad> rows; the original's logits are the first columns.
    torch.testing.assert_close(logits[..., : ref.shape[-1]], ref, rtol=1e-4, atol=1e-4)
    # Converted once, then reused from the cache.
    assert load_model(str(path), template="vicuna_v1", dtype="float32").path == lm.path


def test_projector_only_plus_base(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_CACHE", str(tmp_path / "cache"))
    path, vision, llm_dir, llm, projector = original_checkpoint(tmp_path, projector_only=True)
    with pytest.raises(ConversionError, match="model_base"):
        load_model(str(path), template="vicuna_v1", dtype="float32")
    lm = load_model(str(path), model_base=str(llm_dir), template="vicuna_v1", dtype="float32")
    torch.testing.assert_close(lm.model.model.multi_modal_projector.linear_2.weight, projector["model.mm_projector.2.weight"])
    ids, processed, logits = _run(lm, Image.new("RGB", (16, 16), (0, 90, 200)))
    positions = (ids[0] == lm.image_token_id).nonzero().flatten()
    ref = _reference_logits(vision, llm, projector, ids, positions, processed.pixel_values[None])
    torch.testing.assert_close(logits[..., : ref.shape[-1]], ref, rtol=1e-4, atol=1e-4)


def test_original_lora_plus_base_merges(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_CACHE", str(tmp_path / "cache"))
    path, vision, llm_dir, llm, projector = original_checkpoint(tmp_path, projector_only=True)
    torch.manual_seed(2)
    peft_model = get_peft_model(llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "llava-lora"
    peft_model.save_pretrained(adapter)
    (adapter / "config.json").write_text((path / "config.json").read_text())
    save_file({f"base_model.model.{k}": v for k, v in projector.items()}, adapter / "non_lora_trainables.safetensors")
    merged_llm = peft_model.merge_and_unload()

    lm = load_model(str(adapter), model_base=str(llm_dir), template="vicuna_v1", dtype="float32")
    q = lm.model.model.language_model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q, merged_llm.model.layers[0].self_attn.q_proj.weight)
    ids, processed, logits = _run(lm, Image.new("RGB", (16, 16), (10, 200, 10)))
    positions = (ids[0] == lm.image_token_id).nonzero().flatten()
    ref = _reference_logits(vision, merged_llm, projector, ids, positions, processed.pixel_values[None])
    torch.testing.assert_close(logits[..., : ref.shape[-1]], ref, rtol=1e-4, atol=1e-4)


def test_our_lora_adapter_plus_base(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_CACHE", str(tmp_path / "cache"))
    base = make_tiny_llava(tmp_path)
    base_lm = load_model(str(base), dtype="float32")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=r".*language_model.*\.(q_proj|v_proj)", modules_to_save=["multi_modal_projector"])
    peft_model = get_peft_model(base_lm.model, config)
    with torch.no_grad():
        peft_model.base_model.model.model.multi_modal_projector.modules_to_save["default"].linear_1.weight.mul_(2)
    image = Image.new("RGB", (16, 16), (120, 0, 120))
    base_lm.model = peft_model
    _, _, expected = _run(base_lm, image)
    peft_model.save_pretrained(tmp_path / "adapter")

    with pytest.raises(LoadError, match="model_base"):
        load_model(str(tmp_path / "adapter"), dtype="float32")
    lm = load_model(str(tmp_path / "adapter"), model_base=str(base), dtype="float32")
    _, _, logits = _run(lm, image)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "payload": _Evil()}, tmp_path / "bad.bin")
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        read_file(tmp_path / "bad.bin")
