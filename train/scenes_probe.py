"""`python -m train.scenes_probe`: which encoder layer(s) and resolution (tokens per image) to feed the projector for
train/scenes.py's questions, measured by linear probes on frozen DINOv2-small features (issue 14).

Promises:
- For every resolution in `--sizes`, scenes of 1-5 objects are generated with train.scenes at that size (same seed,
  so the same layouts), encoded once, and two logistic-regression probes are fitted on the first 75 % of the images
  and scored on the rest, for each feature layer choice in `--layers`:
  count (how many objects; features mean+max pooled over all tokens) and leftmost colour (the colour of the object
  with the smallest x; tokens max-pooled per column, so the probe keeps the horizontal order).
- Prints one line per (size, layers) and writes the table as JSON to `--out`, with the encoder's ms per image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llava.assemble import assemble
from llava.images import ImageProcessing, load_image, preprocess
from llava.loading import load_model
from train import scenes
from train.build_default import default_spec


def probe(X: np.ndarray, y: np.ndarray, train: int) -> float:
    from sklearn.linear_model import LogisticRegression

    X = (X - X[:train].mean(0)) / (X[:train].std(0) + 1e-6)
    return float(LogisticRegression(max_iter=300, C=0.1).fit(X[:train], y[:train]).score(X[train:], y[train:]))


def measure(tower, base_proc: ImageProcessing, size: int, n: int, layers: list, seed: int, work: Path) -> dict:
    data = work / f"s{size}"
    scenes.generate(data, seed, n, 1, image_size=size, families=["count", "position", "relation", "existence"])
    described = json.loads((data / "scenes-train.json").read_text())
    keys = [k for k in described if "-" not in Path(k).stem][:n]  # one-image scenes
    proc = ImageProcessing.from_dict({**base_proc.to_dict(), "size": size})
    pixels = torch.stack([preprocess(load_image(data / k), proc).pixel_values for k in keys])
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
    ms = (time.perf_counter() - t0) / len(keys) * 1000
    count = np.array([len(described[k]["objects"]) for k in keys])
    left = np.array([min(described[k]["objects"], key=lambda o: o["x"])["colour"] for k in keys])
    side, train = size // proc.patch_size, len(keys) * 3 // 4
    out = {}
    for choice in layers:
        f = torch.cat([hidden[i][:, 1:] for i in ([choice] if isinstance(choice, int) else choice)], -1)  # [N, T, D]
        pooled = torch.cat([f.mean(1), f.amax(1)], -1).numpy()
        columns = f.reshape(len(keys), side, side, -1).amax(1).reshape(len(keys), -1).numpy()
        r = {"tokens": side * side, "layers": choice, "encode_ms_per_image": round(ms, 1),
             "count": round(probe(pooled, count, train), 3), "leftmost_colour": round(probe(columns, left, train), 3)}
        out[f"{size}px/{json.dumps(choice)}"] = r
        print(json.dumps(r), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.scenes_probe", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="112,168", help="image sides in pixels (DINOv2 patch 14: 112 -> 64 tokens)")
    p.add_argument("--layers", type=json.loads, default=[6, -2, [6, -2]], help="JSON list of layer choices")
    p.add_argument("--n", type=int, default=600, help="images per size")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="scenes-probe-") as work:
        base = Path(work) / "base"
        assemble(default_spec(-2), base)
        lm = load_model(str(base), dtype="float32", quantization="none")
        tower = lm.model.model.vision_tower.eval()
        for size in (int(s) for s in args.sizes.split(",")):
            results.update(measure(tower, lm.image_processing, size, args.n, args.layers, args.seed, Path(work)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
