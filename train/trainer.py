"""HF Trainer specialised for LLaVA stages: small checkpoints, a projector learning rate, modality/length grouping.

Promises:
- Checkpoints (`checkpoint-N/`) hold only the trainable tensors (`trainable.safetensors`: projector, LoRA or the
  LLM) plus Trainer's optimizer, scheduler, RNG and data position, so `resume_from_checkpoint` continues to the same
  result as an uninterrupted run (LoRA + projector state included). Under DeepSpeed, Trainer's own engine
  checkpoints are used instead.
- The projector gets its own learning rate when `projector_lr` is set (LLaVA-1.5's `mm_projector_lr`).
- With `group_by_modality_length`, batches hold one modality and similar lengths (`ModalityLengthSampler`), else
  a plain shuffle (`ShuffleSampler`); both group by the global batch and drop an epoch's last partial one, so the
  rows of each optimizer step do not depend on the number of processes or accumulation steps.
- `StepTimer` records the wall time of every optimizer step (the median, first step left out, is `seconds_per_step`).
- `LlavaTrainer.tokens` adds up what the batches this process trained on cost (`train.data.token_counts`: padded
  slots, real tokens, image tokens, label tokens), so a run says where its compute went.
- `write_run_report` writes metrics.json and loss.png beside the run.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from train.data import ModalityLengthSampler, ShuffleSampler, token_counts
from train.modeling import PROJECTOR_PREFIX, load_trainable, trainable_state

TRAINABLE_FILE = "trainable.safetensors"


def global_batch(args: TrainingArguments) -> int:
    """Rows per optimizer step: per-device batch x processes (all nodes) x accumulation steps."""
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


class LlavaTrainer(Trainer):
    def __init__(self, *args, projector_lr: float | None = None, group_by_modality_length: bool = False,
                 image_token_id: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.group_by_modality_length = group_by_modality_length
        self.image_token_id = image_token_id
        self.tokens: Counter[str] = Counter()

    def training_step(self, model, inputs, *args, **kwargs):
        self.tokens.update(token_counts(inputs, self.image_token_id))
        return super().training_step(model, inputs, *args, **kwargs)

    def token_report(self, steps: int, train_seconds: float) -> dict:
        """Per optimizer step and per second of training, from `tokens` (this process)."""
        t = self.tokens
        if not steps or not t["slots"]:
            return {}
        return {
            "tokens_per_step": t["tokens"] / steps, "image_tokens_per_step": t["image_tokens"] / steps,
            "label_tokens_per_step": t["label_tokens"] / steps, "padding_share": 1 - t["tokens"] / t["slots"],
            "tokens_per_second": t["tokens"] / train_seconds if train_seconds > 0 else None,
        }

    def _get_train_sampler(self, train_dataset=None):
        """Our own samplers, never Trainer's: every process draws the same index stream (deterministic in seed and
        epoch) and accelerate deals it out in per-device batches, so each optimizer step sees the same rows whatever
        the split into processes x per-device batch x accumulation; the stream holds whole global batches only."""
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_modality_length:
            return ModalityLengthSampler(ds.lengths, ds.modalities, global_batch(self.args), seed=self.args.seed)
        return ShuffleSampler(len(ds), global_batch(self.args), seed=self.args.seed)

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


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step of this process (data loading, forward, backward, reduction, update)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)

    def seconds_per_step(self) -> float | None:
        """Median over the steps after the first (which pays for warm-up), None before two steps."""
        return statistics.median(self.seconds[1:]) if len(self.seconds) > 1 else None


def release_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`); False where there is no glibc. PyTorch's CPU
    allocator frees tensors into glibc's heap, which keeps them: after 12 steps of the scenes stage the process held
    9.0 GB, of which 0.9 GB were live (measured, issue 14)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class HeapTrim(TrainerCallback):
    """`release_heap` when a CPU run's training ends, so what follows in the same process (export, a build's next
    stage) does not sit on the training's freed blocks: 30 steps of the scenes stage left 10.4 GB resident, 2.8 GB
    with this. It does not lower the peak during training (10.5 GB either way); trimming after every step lowered
    that peak to 9.1 GB at a speed cost these runs could not pin down (6.1-9.1 s/step between runs on a noisy
    2-core machine), so it is not done."""

    def on_train_end(self, args, state, control, **kwargs):
        release_heap()


class TimeBudget(TrainerCallback):
    """Ends training once `minutes` of wall time have passed since it began (this process): the step in progress
    finishes and the run's outputs are saved as after a full run, so a run on a busy machine lands on time.
    Single-process only: processes that stopped at different steps would wait on each other forever.

    With `fit_schedule`, the learning-rate schedule is fitted to the budget: from `after` steps on, every step
    re-estimates how many steps the remaining time holds (at the pace so far) and, when that is fewer than planned,
    shortens the schedule's length (`num_training_steps` of transformers' step-based schedules) so the decay ends
    when the time does, instead of training stopping at a high learning rate part-way down the curve."""

    def __init__(self, minutes: float, fit_schedule: bool = False, after: int = 5):
        self.seconds, self._start, self.stopped_at = minutes * 60, 0.0, None
        self.fit_schedule, self.after = fit_schedule, after
        self._first_step = 0
        self.fitted_steps: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._first_step = state.global_step

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        elapsed = time.perf_counter() - self._start
        if elapsed > self.seconds:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            return
        done = state.global_step - self._first_step
        if self.fit_schedule and lr_scheduler is not None and done >= self.after:
            fits = state.global_step + int((self.seconds - elapsed) / (elapsed / done))
            if fits < state.max_steps:
                self._shorten(lr_scheduler, max(fits, state.global_step + 1))

    def _shorten(self, scheduler, steps: int) -> None:
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if not lambdas or not all("num_training_steps" in getattr(f, "keywords", {}) for f in lambdas):
            return  # a schedule without a length (constant, inverse sqrt) has nothing to fit
        scheduler.lr_lambdas = [functools.partial(f.func, *f.args, **{**f.keywords, "num_training_steps": steps})
                                for f in lambdas]
        self.fitted_steps = steps


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
