"""Vision features computed once and reused while the vision encoder is frozen.

Promises:
- `select_features(vision_tower, pixel_values, layer, strategy)` is exactly what transformers' Llava computes
  before the projector (hidden_states[layer], CLS dropped for "default", layers concatenated on the hidden axis).
- `FeatureCache` stores those features per image content hash, in one safetensors file per
  (encoder weights fingerprint, image processing, feature layer(s), strategy): change any of them and a different
  file is used, so stale features are never fed to a model. Entries are kept in memory and saved on `save()`.
- A cache built for a dataset makes every image cost one encoder pass for all epochs and both stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from llava.images import ImageProcessing, load_image, preprocess


class FeatureCacheError(RuntimeError):
    """A cached feature is missing or does not fit the model."""


def select_features(vision_tower, pixel_values: torch.Tensor, layer: int | list[int], strategy: str) -> torch.Tensor:
    """[B, 3, S, S] -> [B, T, D * n_layers]: the vision features Llava feeds its projector."""
    out = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layers = [layer] if isinstance(layer, int) else list(layer)
    pool = [out.hidden_states[i] for i in layers]
    if strategy == "default":  # drop CLS (LLaVA's "patch")
        pool = [h[:, 1:] for h in pool]
    return torch.cat(pool, dim=-1)


def encoder_fingerprint(vision_tower) -> str:
    """sha256 over the encoder's parameter names, shapes and bytes (a few hundred ms for DINOv2-small)."""
    h = hashlib.sha256()
    for name, t in sorted(vision_tower.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """content hash -> features [T, D] for one (encoder, processing, layer, strategy)."""

    def __init__(self, root: str | Path, vision_tower, proc: ImageProcessing, layer: int | list[int], strategy: str):
        self.vision_tower, self.proc, self.layer, self.strategy = vision_tower, proc, layer, strategy
        # features are the projector's input: a second reading order of the grid (a `_rowcol` projector) reuses them
        plain = dataclasses.replace(proc, reading_orders=1).key()
        ident = json.dumps(
            {"encoder": encoder_fingerprint(vision_tower), "proc": plain, "layer": layer, "strategy": strategy},
            sort_keys=True,
        )
        self.file = Path(root) / f"features-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.safetensors"
        self.entries: dict[str, torch.Tensor] = load_file(self.file) if self.file.is_file() else {}
        self.encoded = 0  # images encoded by this process (the rest came from disk)

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def fill(self, images: dict[Path, str], batch_size: int = 32, progress: bool = True) -> None:
        """Encode every image (path -> content hash) not cached yet."""
        todo = [(p, k) for p, k in images.items() if k not in self.entries]
        todo = list({k: (p, k) for p, k in todo}.values())  # equal pixels are encoded once
        was_training = self.vision_tower.training
        self.vision_tower.eval()
        for start in tqdm(range(0, len(todo), batch_size), desc="encode images", disable=not progress or not todo):
            chunk = todo[start:start + batch_size]
            pixels = torch.stack([preprocess(load_image(p), self.proc).pixel_values for p, _ in chunk])
            feats = select_features(self.vision_tower, pixels.to(self._device()), self.layer, self.strategy)
            for (_, key), f in zip(chunk, feats.float().cpu()):
                self.entries[key] = f.clone()
            self.encoded += len(chunk)
        self.vision_tower.train(was_training)

    def _device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    def save(self) -> Path:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")  # processes on several nodes may save at once
        save_file(self.entries, tmp)
        tmp.replace(self.file)
        return self.file

    def __call__(self, keys: list[str]) -> torch.Tensor:
        """Features of `keys` in order: [n, T, D]."""
        missing = [k for k in keys if k not in self.entries]
        if missing:
            raise FeatureCacheError(f"{len(missing)} image(s) are not in the feature cache {self.file} (first: {missing[0]})")
        return torch.stack([self.entries[k] for k in keys])
