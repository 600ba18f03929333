"""HF Trainer specialised for LLaVA stages: small checkpoints, a projector learning rate, modality/length grouping.

Promises:
- Checkpoints (`checkpoint-N/`) hold only the trainable tensors (`trainable.safetensors`: projector, LoRA or the
  LLM) plus Trainer's optimizer, scheduler, RNG and data position, so `resume_from_checkpoint` continues to the same
  result as an uninterrupted run (LoRA + projector state included). Under DeepSpeed, Trainer's own engine
  checkpoints are used instead.
- The projector gets its own learning rate when `projector_lr` is set (LLaVA-1.5's `mm_projector_lr`).
- With `group_by_modality_length`, batches hold one modality and similar lengths (`ModalityLengthSampler`).
- `write_run_report` writes metrics.json and loss.png beside the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from train.data import ModalityLengthSampler
from train.modeling import PROJECTOR_PREFIX, load_trainable, trainable_state

TRAINABLE_FILE = "trainable.safetensors"


class LlavaTrainer(Trainer):
    def __init__(self, *args, projector_lr: float | None = None, group_by_modality_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.group_by_modality_length = group_by_modality_length

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthSampler(
            ds.lengths, ds.modalities, self.args.per_device_train_batch_size,
            seed=self.args.seed,
        )

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.projector_lr is None:
            return super().create_optimizer(model)
        params = [(n, p) for n, p in (model or self.model).named_parameters() if p.requires_grad]
        proj = [p for n, p in params if PROJECTOR_PREFIX in n]
        rest = [p for n, p in params if PROJECTOR_PREFIX not in n]
        groups = [{"params": rest, "lr": self.args.learning_rate}, {"params": proj, "lr": self.projector_lr}]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["weight_decay"] = self.args.weight_decay
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model or self.model)
        kwargs.pop("lr", None)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        state = trainable_state(self.model)
        if state_dict is not None:  # DeepSpeed hands over a gathered state dict; keep its trainable part
            state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k in state}
        save_file(state, os.path.join(output_dir, TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = Path(resume_from_checkpoint) / TRAINABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{resume_from_checkpoint} has no {TRAINABLE_FILE}; not a checkpoint of this trainer")
        load_trainable(model or self.model, load_file(path))


def write_run_report(trainer: Trainer, out_dir: Path, extra: dict) -> dict:
    """metrics.json (log history + extra figures) and loss.png (training loss by step)."""
    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    metrics = {"log_history": history, **extra}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if losses:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([s for s, _ in losses], [v for _, v in losses])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.set_title(out_dir.name)
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=100)
        plt.close(fig)
    return metrics


def params_summary(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}
