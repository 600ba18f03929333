"""Training and evaluating rows with several images (issue 14's two-image questions) on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.loading import load_model
from llava.templates import IGNORE_INDEX
from llava.testing import make_tiny_llava
from train.data import Collator, DatasetError, LlavaDataset
from train.evaluate import EngineAnswerer, row_items, user_content
from train.train import TrainConfig, run

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
TOKENS = 4  # 16 px / patch 8 -> 2 x 2 tokens per image (CLS dropped)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("tiny"), family="dinov2")


@pytest.fixture(scope="module")
def lm(tiny):
    return load_model(str(tiny), dtype="float32")


def write_pairs(root: Path, n: int = 12, text_only: int = 0) -> Path:
    """Rows asking the colour of the SECOND of two images (the first has another colour)."""
    names = list(COLOURS)
    for c, rgb in COLOURS.items():
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), rgb).save(root / "img" / f"{c}.png")
    rows = []
    for i in range(n):
        first, second = names[i % 3], names[(i + 1 + i // 3 % 2) % 3]
        rows.append({"id": f"p{i}", "image": [f"{first}.png", f"{second}.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat color is the second image?"},
            {"from": "gpt", "value": second}]})
    rows += [{"id": f"t{i}", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}
             for i in range(text_only)]
    path = root / "pairs.json"
    path.write_text(json.dumps(rows))
    return path


def image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of image tokens."""
    runs, start = [], None
    for i, t in enumerate(ids + [-1]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_two_image_row_expands_each_slot_and_labels_only_the_answer(lm, tmp_path):
    data = write_pairs(tmp_path, n=2)
    ds = LlavaDataset(data, lm.tokenizer, "chatml_direct", lm.image_processing, image_folder=tmp_path / "img")
    ex = ds[0]
    runs = image_runs(ex.input_ids, lm.tokenizer.image_token_id)
    assert [n for _, n in runs] == [TOKENS, TOKENS] and runs[1][0] > runs[0][0] + TOKENS  # a "\n" between them
    assert len(ex.pixel_values) == 2
    assert lm.tokenizer.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX]).startswith("blue")
    assert ds.modalities == [True, True] and ds.lengths[0] > 2 * TOKENS
    # the images travel in slot order, row after row: pixels of red, blue (row 0) then blue, green (row 1)
    batch = Collator(lm.tokenizer.pad_token_id)([ds[0], ds[1]])
    means = batch["pixel_values"].mean(dim=(2, 3))  # [4, 3]
    assert means.shape == (4, 3) and [int(m.argmax()) for m in means] == [0, 2, 2, 1]


def test_cached_features_come_per_image_in_slot_order(lm, tmp_path):
    data = write_pairs(tmp_path, n=2)
    ds = LlavaDataset(data, lm.tokenizer, "chatml_direct", lm.image_processing, image_folder=tmp_path / "img")
    ds.use_cache = True
    keys = {p.stem: k for p, k in ds.image_keys.items()}
    assert len(keys) == 3  # red, blue, green: each image cached once, whatever row uses it
    asked = []
    Collator(lm.tokenizer.pad_token_id, lambda ks: asked.extend(ks) or torch.zeros(len(ks), TOKENS, 8))([ds[0], ds[1]])
    assert asked == [keys["red"], keys["blue"], keys["blue"], keys["green"]]


def test_slot_and_image_counts_must_agree(lm, tmp_path):
    data = write_pairs(tmp_path, n=1)
    row = json.loads(data.read_text())[0]
    for bad in ({**row, "image": row["image"][:1]}, {**row, "image": row["image"] + ["red.png"]}, {**row, "image": []}):
        data.write_text(json.dumps([bad]))
        with pytest.raises(DatasetError, match="slot|image"):
            LlavaDataset(data, lm.tokenizer, "chatml_direct", lm.image_processing, image_folder=tmp_path / "img")


def test_two_image_rows_train_cached_and_uncached_alike(tiny, tmp_path):
    """LoRA steps on two-image rows (+ text-only rows): the loss falls, and cached features give the same losses."""
    data = write_pairs(tmp_path, n=8, text_only=4)
    common = dict(model=str(tiny), data=str(data), image_folder=str(tmp_path / "img"), stage="stage2", tune="lora",
                  lora_r=8, lora_alpha=16, batch_size=4, lr=5e-3, warmup_ratio=0.0, scheduler="constant", bf16=False,
                  max_steps=6, progress=False, logging_steps=1, save_steps=100, feature_cache_dir=str(tmp_path / "fc"))
    a = run(TrainConfig(output_dir=str(tmp_path / "a"), cache_features=True, **common))
    b = run(TrainConfig(output_dir=str(tmp_path / "b"), cache_features=False, **common))
    la, lb = ([h["loss"] for h in m["log_history"] if "loss" in h] for m in (a, b))
    assert a["cache_images_encoded"] == 3
    assert la == pytest.approx(lb, rel=1e-4)
    assert sum(la[-2:]) / 2 < 0.97 * sum(la[:2]) / 2, la  # a random tiny LLM: a small but real drop


def test_evaluate_asks_two_image_rows_with_both_images(lm, tmp_path):
    data = write_pairs(tmp_path, n=2)
    rows = json.loads(data.read_text())
    items = row_items(rows, tmp_path / "img")
    assert items[0].image == (str(tmp_path / "img" / "red.png"), str(tmp_path / "img" / "blue.png"))
    assert user_content(items[0]).count("<image>") == 2
    answers = EngineAnswerer(lm, max_new_tokens=3)(items, progress=False)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
