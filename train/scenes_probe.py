"""`python -m train.scenes_probe`: which encoder layer(s) and resolution (tokens per image) to feed the projector for
train/scenes.py's questions, measured by linear probes on frozen DINOv2-small features (issue 14).

Promises:
- For every resolution in `--sizes`, scenes of 1-5 objects are generated with train.scenes at that size (same seed,
  so the same layouts), encoded once, and two logistic-regression probes are fitted on the first 75 % of the images
  and scored on the rest, for each feature layer choice in `--layers`:
  count (how many objects; features mean+max pooled over all tokens) and leftmost colour (the colour of the object
  with the smallest x; tokens max-pooled per column, so the probe keeps the horizontal order).
- Prints one line per (size, layers) and writes the table as JSON to `--out`, with the encoder's ms per image.
- `--heads` instead trains small attention heads (a 2-layer transformer over the image tokens, 256 wide, read from a
  learned query; AdamW lr 1e-3, batch 64) on frozen features of layers [6, -2], 80/20 split, reporting held-out
  accuracy every 5 epochs: count (1-5 objects), leftmost colour with and without a learned position embedding (are
  positions readable from the features themselves?), and the printed word (122-way) at each `--word-fonts` font
  size range (text scenes of train.scenes, `--word-images` images, words and fonts cycled). A linear probe can fail
  where a head succeeds (counting is not linear in pooled features); the heads bound what the projector + LLM can
  read from the same features.
"""

from __future__ import annotations

import argparse
import json
import random
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


def object_scenes(data: Path, seed: int, n: int, size: int) -> tuple[list[str], dict]:
    """Generate n one-image object scenes into `data`: (image paths relative to it, path -> scene description)."""
    scenes.generate(data, seed, n, 1, image_size=size, families=["count", "position", "relation", "existence"])
    described = json.loads((data / "scenes-train.json").read_text())
    return [k for k in described if "-" not in Path(k).stem][:n], described


def measure(tower, base_proc: ImageProcessing, size: int, n: int, layers: list, seed: int, work: Path) -> dict:
    data = work / f"s{size}"
    keys, described = object_scenes(data, seed, n, size)
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


class Head(torch.nn.Module):
    """Attention head over image tokens: project, (optionally) add a learned position embedding, 2 transformer layers,
    read the learned query token."""

    def __init__(self, dim: int, tokens: int, classes: int, position: bool):
        super().__init__()
        self.inp = torch.nn.Linear(dim, 256)
        self.pos = torch.nn.Parameter(torch.zeros(tokens, 256), requires_grad=position)
        self.query = torch.nn.Parameter(torch.randn(1, 1, 256) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(256, 4, 512, batch_first=True, dropout=0.1)
        self.body = torch.nn.TransformerEncoder(layer, 2)
        self.out = torch.nn.Linear(256, classes)

    def forward(self, x):
        h = torch.cat([self.query.expand(len(x), -1, -1), self.inp(x) + self.pos], 1)
        return self.out(self.body(h)[:, 0])


def fit_head(X: torch.Tensor, labels: list, epochs: int, position: bool = True, seed: int = 0) -> list[float]:
    """Held-out accuracy (last 20 %) every 5 epochs of a Head trained on the first 80 %."""
    torch.manual_seed(seed)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    train = len(X) * 4 // 5
    X = (X - X[:train].mean((0, 1))) / (X[:train].std((0, 1)) + 1e-6)
    head = Head(X.shape[-1], X.shape[1], len(classes), position)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], 1e-3, weight_decay=0.01)
    scores = []
    for epoch in range(epochs):
        head.train()
        for b in torch.randperm(train).split(64):
            loss = torch.nn.functional.cross_entropy(head(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 4:
            head.eval()
            with torch.no_grad():
                scores.append(round((head(X[train:]).argmax(-1) == y[train:]).float().mean().item(), 3))
    return scores


def encode(tower, proc: ImageProcessing, images: list, layers=(6, -2)) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            pixels = torch.stack([preprocess(im, proc).pixel_values for im in images[i:i + 64]])
            hidden = tower(pixels, output_hidden_states=True).hidden_states
            out.append(torch.cat([hidden[k][:, 1:] for k in layers], -1))
    return torch.cat(out)


def heads(tower, proc: ImageProcessing, args, work: Path) -> dict:
    out = {}
    data = work / "heads"
    keys, described = object_scenes(data, args.seed, args.n, 112)
    X = encode(tower, proc, [load_image(data / k) for k in keys])
    objs = [described[k]["objects"] for k in keys]
    out["count"] = fit_head(X, [len(o) for o in objs], args.epochs)
    left = [min(o, key=lambda x: x["x"])["colour"] for o in objs]
    out["leftmost_colour"] = fit_head(X, left, args.epochs)
    out["leftmost_colour_no_position_embedding"] = fit_head(X, left, args.epochs, position=False)
    fonts = scenes.Fonts(scenes.discover_fonts())
    for fr in args.word_fonts.split(","):
        lo, hi = (float(v) for v in fr.split("-"))
        saved, scenes.WORD_FONT = scenes.WORD_FONT, (lo, hi)
        try:
            images, words = [], []
            for i in range(args.word_images):
                w = scenes.WORDS[i % len(scenes.WORDS)]
                (scene,), _ = scenes.build_text(random.Random(f"probe:{args.seed}:{i}"), fonts, 112,
                                                (w, i % len(fonts.refs)))
                images.append(scenes.render(scene, fonts))
                words.append(w)
        finally:
            scenes.WORD_FONT = saved
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
        X = encode(tower, proc, [images[i] for i in order])
        out[f"word_font_{fr}"] = fit_head(X, [words[i] for i in order], args.word_epochs)
    for k, v in out.items():
        print(json.dumps({k: v}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.scenes_probe", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="112,168", help="image sides in pixels (DINOv2 patch 14: 112 -> 64 tokens)")
    p.add_argument("--layers", type=json.loads, default=[6, -2, [6, -2]], help="JSON list of layer choices")
    p.add_argument("--n", type=int, default=600, help="images per size")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--heads", action="store_true", help="train attention heads instead of linear probes (112 px)")
    p.add_argument("--epochs", type=int, default=15, help="--heads: epochs of the count and colour heads")
    p.add_argument("--word-images", type=int, default=2000, help="--heads: text scenes per font size range")
    p.add_argument("--word-epochs", type=int, default=15)
    p.add_argument("--word-fonts", default="0.13-0.17,0.22-0.30", help="--heads: font size ranges (fraction of side)")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="scenes-probe-") as work:
        base = Path(work) / "base"
        assemble(default_spec(-2), base)
        lm = load_model(str(base), dtype="float32", quantization="none")
        tower = lm.model.model.vision_tower.eval()
        if args.heads:
            results = heads(tower, lm.image_processing, args, Path(work))
            if args.out:
                args.out.write_text(json.dumps(results, indent=1) + "\n")
            return 0
        for size in (int(s) for s in args.sizes.split(",")):
            results.update(measure(tower, lm.image_processing, size, args.n, args.layers, args.seed, Path(work)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
