"""Where an object's position is lost (issue 14): linear probes on a scenes model's image tokens, layer by layer.

    python -m bench.scenes_position_probe --model runs/build/default/stage2b/hf --data runs/build/scenesB/data \
        --out bench/results/scenes_position_probe.json

For one-image training scenes without a word, the vision features, the projected tokens (what the LLM receives) and
the LLM's hidden state after every layer (the image alone as input, as at the start of a LLaVA prompt) are read at
each object's centre patch; a ridge regression fitted on the first `--fit` scenes predicts the object's x and y
(0..1) on the rest. Reported per representation: how often the predicted half of the image (left/right, top/bottom)
is right, and how often a patch's own column and row are recovered exactly from any patch (rounded prediction).
A diagnostic: it says whether a position can still be read where the answer is produced, not what the model does.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from llava.hardware import cpu_info
from llava.loading import load_model
from train import scenes
from train.features import select_features


def ridge(x: np.ndarray, y: np.ndarray, lam: float = 10.0) -> np.ndarray:
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], 1) @ w


@torch.no_grad()
def representations(lm, data: Path, items: list[tuple[str, dict]], batch: int = 50) -> list[np.ndarray]:
    """[features, projected, llm layer 1..L] each [N, T, D] for the images `items` names."""
    model, cfg = lm.model, lm.model.config
    out: list[list[np.ndarray]] = []
    for s in range(0, len(items), batch):
        pixels = torch.stack([p.pixel_values for p in lm.process_images([str(data / k) for k, _ in items[s:s + batch]])])
        feats = select_features(model.model.vision_tower, pixels.to(model.dtype), cfg.vision_feature_layer,
                                cfg.vision_feature_select_strategy)
        embeds = model.model.multi_modal_projector(feats)
        hidden = model.model.language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        out.append([feats.float().numpy(), embeds.float().numpy()] + [h.float().numpy() for h in hidden[1:]])
    return [np.concatenate(parts) for parts in zip(*out)]


def probe(x: np.ndarray, centres: list[list[tuple[float, float]]], fit: int) -> dict:
    """Half-of-image accuracy of object centres and exact column/row accuracy of patches, on scenes after `fit`."""
    n, t, d = x.shape
    g = int(round(t ** 0.5))
    mu, sd = x[:fit].reshape(-1, d).mean(0), x[:fit].reshape(-1, d).std(0) + 1e-6
    x = (x - mu) / sd
    cells = np.stack([np.tile(np.arange(g), g), np.repeat(np.arange(g), g)], 1).astype(float)  # (col, row) per patch
    w = ridge(x[:fit].reshape(-1, d), np.tile(cells, (fit, 1)))
    exact = (np.rint(predict(w, x[fit:].reshape(-1, d))) == np.tile(cells, (n - fit, 1))).mean(0)
    rows, pos, split = [], [], sum(len(c) for c in centres[:fit])
    for i, objs in enumerate(centres):
        for cx, cy in objs:
            rows.append(x[i, min(int(cy * g), g - 1) * g + min(int(cx * g), g - 1)])
            pos.append((cx, cy))
    rows_a, pos_a = np.array(rows), np.array(pos)
    half = ((predict(ridge(rows_a[:split], pos_a[:split]), rows_a[split:]) > 0.5) == (pos_a[split:] > 0.5)).mean(0)
    return {"object_half_x": round(float(half[0]), 3), "object_half_y": round(float(half[1]), 3),
            "patch_column_exact": round(float(exact[0]), 3), "patch_row_exact": round(float(exact[1]), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a scenes-sized model's HF folder (e.g. <stage>/hf)")
    p.add_argument("--data", type=Path, required=True, help="a scenes data folder (python -m train.scenes)")
    p.add_argument("--n", type=int, default=900, help="scenes probed")
    p.add_argument("--fit", type=int, default=700, help="of which the probes are fitted on the first")
    p.add_argument("--out", type=Path, help="merge the result under the model's path into this JSON file")
    a = p.parse_args(argv)
    if not 0 < a.fit < a.n:
        raise SystemExit("--fit must be between 0 and --n")
    described = sorted(json.loads((a.data / "scenes-train.json").read_text()).items())
    random.Random(0).shuffle(described)
    items = [(k, v) for k, v in described if v.get("word") is None][: a.n]
    centres = [[(o.x / s.size, o.y / s.size) for o in s.objects] for s in (scenes.scene_from_dict(v) for _, v in items)]
    lm = load_model(str(a.model), dtype="float32", quantization="none")
    reps = representations(lm, a.data, items)
    names = ["vision features", "projected tokens"] + [f"LLM layer {i}" for i in range(1, len(reps) - 1)]
    result = {"model": str(a.model), "scenes": len(items), "fitted_on": a.fit, "cpu": cpu_info().summary(),
              "layers": {name: probe(x, centres, a.fit) for name, x in zip(names, reps)}}
    for name, r in result["layers"].items():
        print(f"{name:18s} {r}", flush=True)
    if a.out:
        merged = json.loads(a.out.read_text()) if a.out.is_file() else {}
        merged[str(a.model)] = result
        a.out.write_text(json.dumps(merged, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
