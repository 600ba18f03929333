"""Assembly from parts: every vision family and projector type, HF folder round trips, clear errors."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

from llava.assemble import AssemblyError, assemble
from llava.config import AssemblySpec
from llava.loading import LoadError, load_model
from llava.checkpoint import image_processing_from_hf
from llava.projector import (
    LlavaVariantForConditionalGeneration,
    ProjectorError,
    column_major,
    projector_depth,
    sincos_2d,
)
from llava.testing import make_tiny_llava, make_tiny_llm_dir, make_tiny_vision_dir


def _image(seed: int = 0, size=(20, 12)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _logits(lm, images=(_image(),), question="What color is the shape?"):
    processed = lm.process_images(list(images))
    content = "<image>\n" * len(processed) + question
    rendered = lm.render([{"role": "user", "content": content}], processed)
    ids = torch.tensor([rendered.input_ids])
    kwargs = {}
    if processed:
        kwargs["pixel_values"] = torch.stack([p.pixel_values for p in processed])
    with torch.no_grad():
        return lm.model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_each_vision_family_assembles_and_runs(tmp_path, family):
    path = make_tiny_llava(tmp_path, family=family)
    lm = load_model(str(path))
    proc = lm.image_processing
    # CLIP / DINOv2 emit a CLS token that the default strategy drops; SigLIP has none.
    assert proc.num_prefix_tokens == (0 if family == "siglip" else 1)
    expected_tokens = (16 // 8) ** 2
    assert lm.process_images([_image()])[0].num_tokens == expected_tokens
    logits = _logits(lm)
    assert torch.isfinite(logits).all()
    # The image really conditions the output.
    assert not torch.allclose(_logits(lm, [_image(1)])[:, -1], logits[:, -1])


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_each_projector_round_trips_with_identical_logits(tmp_path, projector):
    path = make_tiny_llava(tmp_path, projector=projector)
    lm = load_model(str(path))
    cls = LlavaForConditionalGeneration if projector == "mlp2x_gelu" else LlavaVariantForConditionalGeneration
    assert type(lm.model) is cls
    assert sum(1 for n, _ in lm.model.named_parameters() if "multi_modal_projector" in n and n.endswith("weight")) == projector_depth(projector)
    before = _logits(lm)
    lm.model.save_pretrained(tmp_path / "again")
    lm.tokenizer.save_pretrained(tmp_path / "again")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").eval()
    lm.model = again
    assert torch.equal(before, _logits(lm))


def test_pos2d_projector_adds_a_trained_embedding_per_token_position(tmp_path):
    """`_pos2d`: zero at assembly (the MLP alone), then token t gets position_embedding[t]; saved and loaded with the
    model; other token counts are refused by name; a text-only batch still gives the embedding a (zero) gradient."""
    path = make_tiny_llava(tmp_path, projector="mlp2x_gelu_pos2d")
    lm = load_model(str(path), dtype="float32")
    assert type(lm.model) is LlavaVariantForConditionalGeneration
    proj = lm.model.model.multi_modal_projector
    tokens, width = proj.position_embedding.shape
    assert tokens == lm.process_images([_image()])[0].num_tokens == 4
    same = torch.randn(1, 1, proj.linear_1.in_features).expand(2, tokens, -1)  # one feature at every position
    with torch.no_grad():
        assert torch.equal(proj.position_embedding, torch.zeros(tokens, width))
        flat = proj(same)
        assert torch.allclose(flat, flat[:, :1].expand_as(flat))
        proj.position_embedding.copy_(sincos_2d(2, width, 0.1))
        moved = proj(same)
    assert torch.allclose(moved - flat, sincos_2d(2, width, 0.1).expand(2, -1, -1), atol=1e-6)
    assert len({tuple(r.tolist()) for r in moved[0].round(decimals=4)}) == tokens  # every position differs
    assert not torch.allclose(_logits(lm), _logits(load_model(str(path), dtype="float32")))
    lm.model.save_pretrained(tmp_path / "again")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again")
    assert torch.equal(again.model.multi_modal_projector.position_embedding, proj.position_embedding)
    with pytest.raises(ProjectorError, match="4 tokens per image but got 5"):
        proj(torch.randn(1, 5, proj.linear_1.in_features))
    proj(torch.zeros(0, 1, proj.linear_1.in_features)).sum().backward()
    assert proj.position_embedding.grad is not None and not proj.position_embedding.grad.any()


def test_rowcol_projector_reads_the_grid_by_rows_then_by_columns(tmp_path):
    """`_rowcol`: an image takes twice its grid's tokens everywhere they are counted (config, our processing, the HF
    processor saved beside the model, a load without our metadata); the second half is the first, column-major."""
    from transformers import AutoProcessor

    path = make_tiny_llava(tmp_path, projector="mlp2x_gelu_rowcol")
    config = json.loads((path / "config.json").read_text())
    assert config["image_seq_length"] == 8 and config["projector_type"] == "mlp2x_gelu_rowcol"
    lm = load_model(str(path), dtype="float32")
    assert lm.process_images([_image()])[0].num_tokens == 8
    assert image_processing_from_hf(str(path), config).reading_orders == 2
    proj = lm.model.model.multi_modal_projector
    feats = torch.randn(3, 4, proj.linear_1.in_features)
    with torch.no_grad():
        out = proj(feats)
    assert out.shape[:2] == (3, 8)
    grid = out[:, :4].reshape(3, 2, 2, -1)
    assert torch.equal(out[:, 4:], grid.transpose(1, 2).reshape(3, 4, -1))  # (0,0) (1,0) (0,1) (1,1)
    assert torch.equal(out[:, 5], out[:, 2]) and torch.equal(out[:, 6], out[:, 1])
    assert torch.equal(column_major(column_major(out[:, :4])), out[:, :4])
    with pytest.raises(ProjectorError, match="square patch grid"):
        proj(torch.randn(1, 5, proj.linear_1.in_features))
    processor = AutoProcessor.from_pretrained(path)
    batch = processor(images=_image(), text="<image>\nWhat is it?", return_tensors="pt")
    assert int((batch["input_ids"] == lm.model.config.image_token_id).sum()) == 8
    with torch.no_grad():  # transformers' own forward: 8 image tokens, 8 features
        assert torch.isfinite(lm.model(**batch).logits).all()
    assert torch.isfinite(_logits(lm)).all()
    both = make_tiny_llava(tmp_path / "both", projector="mlp2x_gelu_rowcol_pos2d")
    assert load_model(str(both)).model.model.multi_modal_projector.position_embedding.shape[0] == 8
    assert projector_depth("mlp2x_gelu_rowcol_pos2d") == 2


def test_sincos_2d_codes_rows_and_columns_apart():
    code = sincos_2d(8, 96, 0.25)
    assert code.shape == (64, 96) and abs(code.pow(2).mean().sqrt().item() - 0.25) < 1e-5
    grid = code.reshape(8, 8, 96)
    assert torch.equal(grid[3, :, :48], grid[3, 0, :48].expand(8, -1))  # first half: the row only
    assert torch.equal(grid[:, 5, 48:], grid[0, 5, 48:].expand(8, -1))  # second half: the column only
    assert len({tuple(r.tolist()) for r in code.round(decimals=5)}) == 64


def test_standard_checkpoint_is_a_plain_transformers_folder(tmp_path):
    path = make_tiny_llava(tmp_path)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "chat_template.jinja", "tokenizer.json", "processor_config.json"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llava" and config["llava"]["template"] == "chatml_direct"
    model = LlavaForConditionalGeneration.from_pretrained(path)  # no llava import needed for the standard type
    assert model.config.image_token_id == load_model(str(path)).tokenizer.image_token_id


def test_unknown_projector_names_list_the_valid_forms():
    with pytest.raises(ProjectorError, match="_pos2d"):
        projector_depth("mlp2x_relu")
    assert projector_depth("mlp3x_gelu_pos2d") == 3 and projector_depth("linear_pos2d") == 1


def test_identity_projector_needs_equal_widths(tmp_path):
    with pytest.raises(ProjectorError, match="equal widths"):
        make_tiny_llava(tmp_path / "a", projector="identity")
    path = make_tiny_llava(tmp_path / "b", projector="identity", llm_hidden_size=32)
    assert torch.isfinite(_logits(load_model(str(path)))).all()


def test_multi_layer_features_concatenate(tmp_path):
    path = make_tiny_llava(tmp_path, vision_feature_layer=[-2, -1])
    lm = load_model(str(path))
    assert lm.model.model.multi_modal_projector.linear_1.in_features == 64  # 2 layers x hidden 32
    assert torch.isfinite(_logits(lm)).all()


def test_two_images_in_one_conversation(tmp_path):
    lm = load_model(str(make_tiny_llava(tmp_path)))
    assert torch.isfinite(_logits(lm, [_image(0), _image(1)], "Compare them.")).all()


def test_anyres_assembles_llava_next(tmp_path):
    path = make_tiny_llava(tmp_path, image_mode="anyres", image_size=16, grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    lm = load_model(str(path))
    assert lm.model.config.model_type == "llava_next"
    wide = lm.process_images([_image(0, size=(40, 18))])[0]
    assert wide.pixel_values.shape[0] > 1 and wide.num_tokens > 4
    processed = lm.process_images([_image(0, size=(40, 18))])
    rendered = lm.render([{"role": "user", "content": "<image>\nDescribe."}], processed)
    with torch.no_grad():
        out = lm.model(
            input_ids=torch.tensor([rendered.input_ids]),
            pixel_values=processed[0].pixel_values[None],
            image_sizes=torch.tensor([processed[0].image_size]),
        )
    assert torch.isfinite(out.logits).all()


def test_bad_specs_name_the_cause(tmp_path):
    vision = make_tiny_vision_dir(tmp_path / "v")
    llm = make_tiny_llm_dir(tmp_path / "l")
    with pytest.raises(AssemblyError, match="native"):
        assemble(AssemblySpec(vision_encoder=str(vision), llm=str(llm), template="vicuna_v1", image_size=24), tmp_path / "o")
    with pytest.raises(AssemblyError, match="grid_pinpoints"):
        assemble(AssemblySpec(vision_encoder=str(vision), llm=str(llm), template="vicuna_v1", image_mode="anyres"), tmp_path / "o")
    with pytest.raises(ProjectorError, match="valid"):
        assemble(AssemblySpec(vision_encoder=str(vision), llm=str(llm), template="vicuna_v1", projector="mlp2x_relu"), tmp_path / "o")
    with pytest.raises(ValueError, match="chatml_direct"):  # unknown template lists the valid ones
        assemble(AssemblySpec(vision_encoder=str(vision), llm=str(llm), template="vicuna"), tmp_path / "o")
    with pytest.raises(LoadError, match="not a llava checkpoint"):
        load_model(str(llm))


def test_quantized_8bit_loads_and_runs(tmp_path):
    pytest.importorskip("bitsandbytes")
    lm = load_model(str(make_tiny_llava(tmp_path)), quantization="8bit", dtype="float32")
    assert type(lm.model.model.language_model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    # vision tower and projector stay in float (llm_int8_skip_modules)
    assert lm.model.model.multi_modal_projector.linear_1.weight.dtype == torch.float32
    assert torch.isfinite(_logits(lm)).all()
