"""The embedded default model: the real DINOv2-small + SmolLM2-135M-Instruct + trained assets, assembled offline."""

import pytest
import torch

from llava.default import default_model_dir
from llava.loading import load_model


def test_default_assembles_offline_and_answers_text_questions():
    path = default_model_dir()
    assert (path / "model.safetensors").is_file()
    assert default_model_dir() == path  # cached, reused
    lm = load_model("default")
    assert lm.template.name == "chatml_direct"
    assert lm.image_processing.size == 112 and lm.process_images([_red_square()])[0].num_tokens == 64
    rendered = lm.render([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([rendered.input_ids])
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    reply = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


def _red_square():
    from PIL import Image

    return Image.new("RGB", (64, 64), (220, 20, 20))


def test_older_embedded_default_is_loadable_by_name(tmp_path, monkeypatch):
    """`default-easyvqa` (kept when a newer default ships) resolves to its own assets; a missing one is a clear error."""
    import shutil

    from llava.config import assets_root
    from llava.convert import resolve_path
    from llava.default import DefaultModelError, assets_dir

    monkeypatch.setenv("LLAVA_ASSETS", str(tmp_path / "assets"))
    (tmp_path / "assets").mkdir()
    with pytest.raises(DefaultModelError, match="'default-easyvqa' is not in this installation"):
        resolve_path("default-easyvqa", None)
    with pytest.raises(DefaultModelError, match="unknown embedded model 'default-x'"):
        assets_dir("default-x")
    monkeypatch.delenv("LLAVA_ASSETS")
    shutil.copytree(assets_root() / "default", tmp_path / "assets" / "default-easyvqa")
    monkeypatch.setenv("LLAVA_ASSETS", str(tmp_path / "assets"))
    assert assets_dir("default-easyvqa") == tmp_path / "assets" / "default-easyvqa"
    monkeypatch.delenv("LLAVA_ASSETS")
    original = default_model_dir()
    monkeypatch.setenv("LLAVA_ASSETS", str(tmp_path / "assets"))
    assert default_model_dir("default-easyvqa") == original  # same pieces, same cached folder
