"""Reading checkpoint weights safely: safetensors first; legacy .bin only through torch.load(weights_only=True).

Never unpickles arbitrary objects: a .bin that needs more than tensors fails with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


class WeightsError(ValueError):
    """No weights found, or a file that cannot be read safely."""


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError for non-tensor pickles
        raise WeightsError(f"{path}: not a plain tensor file (refusing to unpickle arbitrary objects): {e}") from e


def read_file(path: str | Path) -> dict[str, torch.Tensor]:
    """One weights file (.safetensors or .bin) -> state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _load_bin(path)
    raise WeightsError(f"{path}: unknown weights format (expected .safetensors or .bin)")


def read_folder(folder: str | Path, stem: str = "model") -> dict[str, torch.Tensor]:
    """All weights of a checkpoint folder: `{stem}.safetensors`, its sharded index, or legacy pytorch_model*.bin."""
    folder = Path(folder)
    candidates = [
        (folder / f"{stem}.safetensors", None),
        (folder / f"{stem}.safetensors.index.json", "index"),
        (folder / "pytorch_model.bin", None),
        (folder / "pytorch_model.bin.index.json", "index"),
    ]
    for path, kind in candidates:
        if not path.is_file():
            continue
        if kind is None:
            return read_file(path)
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_file(folder / shard))
        return state
    raise WeightsError(f"no weights in {folder} (looked for {', '.join(p.name for p, _ in candidates)})")


def find_first(folder: str | Path, names: list[str]) -> Path | None:
    """The first of `names` that exists in `folder` (safetensors variants should come first in `names`)."""
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None
