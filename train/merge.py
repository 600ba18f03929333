"""`python -m train.merge`: fold a trained projector + LoRA adapter into a standard HF llava folder.

`--checkpoint runs/x/stage2/checkpoint-100` exports a checkpoint taken mid-run (to evaluate it while training goes on).

Promises: the output is an ordinary `LlavaForConditionalGeneration` folder (config with the llava metadata and
template, model.safetensors, tokenizer, processor, chat template) that gives the same outputs as the base model with
the adapter applied; nothing of PEFT remains in it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from llava.assemble import save_checkpoint
from llava.loading import load_model
from train.modeling import load_trainable
from train.train import ConfigError, TrainConfig, export_hf, load_for_training, load_projector, prepare_model, with_preset
from train.trainer import TRAINABLE_FILE


def merge(base: str, out_dir: str | Path, *, adapter: str | Path | None = None, projector_from: str | Path | None = None) -> Path:
    """base: an HF llava folder or `default`; projector_from: a stage output dir holding projector.safetensors."""
    if adapter is None and projector_from is None:
        raise ConfigError("nothing to merge: give an adapter and/or a stage folder with projector.safetensors")
    lm = load_model(base, dtype="float32")
    model = lm.model
    if projector_from is not None:
        load_projector(model, projector_from)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return save_checkpoint(model.eval(), lm.tokenizer, lm.image_processing, lm.template.name, Path(out_dir))


def merge_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export a mid-run `checkpoint-N` of a train.train run (its parent holds the run's config.json)."""
    checkpoint = Path(checkpoint)
    cfg = with_preset(TrainConfig(**json.loads((checkpoint.parent / "config.json").read_text())))
    with tempfile.TemporaryDirectory(prefix="llava-merge-") as work:
        llava, tokenizer, proc, own_template = load_for_training(cfg, Path(work))
    model = prepare_model(cfg, llava)
    load_trainable(model, load_file(checkpoint / TRAINABLE_FILE))
    return export_hf(model, tokenizer, proc, cfg.template or own_template, Path(out_dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__.split("\n")[0])
    p.add_argument("--base", default=None, help="the HF llava folder the adapter was trained on")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint-N folder of a train.train run")
    p.add_argument("--stage-dir", type=Path, default=None,
                   help="a train.train output folder: uses its projector.safetensors and adapter/")
    p.add_argument("--adapter", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.checkpoint is not None:
        print(merge_checkpoint(args.checkpoint, args.out))
        return 0
    if args.base is None:
        p.error("--base is required (unless --checkpoint is given)")
    adapter = args.adapter
    if adapter is None and args.stage_dir is not None and (args.stage_dir / "adapter").is_dir():
        adapter = args.stage_dir / "adapter"
    print(merge(args.base, args.out, adapter=adapter, projector_from=args.stage_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
