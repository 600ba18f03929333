"""`python -m train.train`: one entry point for both LLaVA stages.

Promises:
- `TrainConfig` is the whole configuration (typed, validated); a stage preset (`STAGES`) fills what the user did not
  set. Presets differ only in data, template and which parts train: stage1 = projector on captions with `plain`;
  stage2 = projector + LLM (LoRA by default; `full` or `qlora` too) on conversations with the model's template.
- The model is an HF llava folder, `default`, or an AssemblySpec JSON (assembled from its parts first).
  `init_from` loads the projector of a previous stage's output, so stage-1 output feeds stage 2 (and a LoRA
  adapter/ there, if present, so a LoRA run can continue on more data).
- With a frozen vision encoder (always, here) and `cache_features`, each image is encoded once into a FeatureCache
  reused across epochs and stages; `measure_cache_steps` times the same batches with and without the cache.
- The run is resumable: checkpoints every `save_steps`; `resume` picks the newest `checkpoint-N` in output_dir,
  `resume_from_checkpoint` names one (HF Trainer's flag).
- Outputs in output_dir: projector.safetensors (HF Llava key names), adapter/ (PEFT LoRA) or llm.safetensors (full),
  metrics.json, loss.png, config.json; with `export`, `hf/` is a standard HF llava folder (LoRA merged).
- Runs single-process on CPU, and on several processes and nodes under `accelerate launch`, `torchrun` or `deepspeed`
  (with `deepspeed=train/configs/zero2.json` / `zero3.json`). A step's rows and loss do not depend on the split: the
  sampler groups by the global batch, the loss is averaged over the step's label tokens on all processes, and an
  epoch's last partial global batch is dropped (`train.data.whole_batches`), so W processes x batch b x accumulation
  a match one process x batch W*b*a.
- Under several processes the main process builds the data file and the feature cache first, the others then read
  them; only the main process writes outputs (ZeRO-3 weights are gathered for it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava.assemble import build_model, save_checkpoint
from llava.config import META_KEY, AssemblySpec, LlavaMeta
from llava.hardware import resolve_autocast
from llava.loading import load_model
from train import easyvqa
from train.data import Collator, LlavaDataset
from train.features import FeatureCache
from train.modeling import LlavaForTraining, add_lora, projector_state, set_trainable
from train.trainer import HeapTrim, LlavaTrainer, StepTimer, TimeBudget, global_batch, params_summary, write_run_report

Tune = Literal["projector", "full", "lora", "qlora"]


class ConfigError(ValueError):
    """The configuration is inconsistent (unknown stage, tune mode the stage cannot use, missing data...)."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["stage1", "stage2"]
    model: str  # HF llava folder | "default" | an AssemblySpec .json
    data: str  # LLaVA JSON/JSONL path, or easyvqa:captions | easyvqa:dialogues
    output_dir: str
    image_folder: str | None = None
    init_from: str | None = None  # previous stage's output_dir: its projector (and LoRA adapter/, if any) are loaded
    template: str | None = None
    tune: Tune | None = None
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lr: float | None = None
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    epochs: float = 1.0
    max_steps: int = -1
    max_minutes: float | None = None  # wall-time budget: stop after the step that exceeds it (1 process)
    fit_schedule: bool = True  # with max_minutes: shorten the learning-rate schedule to the steps the budget holds
    heap_trim: bool = True  # CPU runs: return freed memory to the OS when training ends (glibc malloc_trim)
    batch_size: int = 8
    grad_accum: int = 1
    bf16: bool | Literal["auto"] = "auto"  # bf16 autocast; auto = only where the CPU/GPU runs bf16 natively
    cache_features: bool = True
    feature_cache_dir: str | None = None  # default: <output_dir>/../feature-cache
    measure_cache_steps: int = 0
    group_by_modality_length: bool = True
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    seed: int = 0
    offset: int = 0  # skip the first rows of the data (e.g. to continue on rows a previous run did not see)
    limit: int | None = None  # then at most N rows
    skip_bad: bool = False
    max_length: int | None = None
    independent_turns: bool = False  # pack an image's exchanges as independent single-turn samples (tree mask)
    deepspeed: str | None = None
    resume: bool = True
    resume_from_checkpoint: str | None = None  # a checkpoint-N folder (default with resume: the newest in output_dir)
    export: bool = False
    progress: bool = True


STAGES: dict[str, dict] = {
    "stage1": dict(template="plain", tune="projector", lr=1e-3),
    "stage2": dict(tune="lora", lr=2e-4, projector_lr=2e-5),
}


def with_preset(cfg: TrainConfig) -> TrainConfig:
    """Fill unset fields from the stage preset and check the combination."""
    filled = {k: v for k, v in STAGES[cfg.stage].items() if getattr(cfg, k) is None}
    cfg = cfg.model_copy(update=filled)
    if cfg.stage == "stage1" and cfg.tune != "projector":
        raise ConfigError(f"stage1 trains the projector only, got tune={cfg.tune!r}")
    return cfg


# ----------------------------------------------------------------------------------------------- model


def load_for_training(cfg: TrainConfig, workdir: Path):
    """(llava model in train mode, tokenizer, image processing, model's own template name)."""
    if cfg.model.endswith(".json"):
        if cfg.tune == "qlora":
            raise ConfigError("qlora needs a saved llava folder to load in 4-bit; assemble one first (llava.assemble)")
        spec = AssemblySpec(**json.loads(Path(cfg.model).read_text()))
        model, tokenizer, proc = build_model(spec, workdir)
        return model, tokenizer, proc, spec.template
    # float32 master weights: autocast (cfg.bf16) decides the compute precision
    loaded = load_model(cfg.model, quantization="4bit" if cfg.tune == "qlora" else None, dtype="float32")
    return loaded.model, loaded.tokenizer, loaded.image_processing, loaded.template.name


def load_projector(llava, folder: str | Path) -> None:
    path = Path(folder) / "projector.safetensors"
    if not path.is_file():
        raise ConfigError(f"init_from={folder}: no projector.safetensors (is it a finished stage output?)")
    state = load_file(path)
    own = projector_state(llava)
    new = {k for k in set(own) - set(state) if k.endswith(".position_embedding")}
    if new:  # a plain projector continued on a `_pos2d` base: its position embedding starts at zero (a no-op)
        print(f"init_from={folder}: no {sorted(new)[0]}; it starts at zero", flush=True)
        state = {**state, **{k: torch.zeros_like(own[k]) for k in new}}
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ConfigError(f"{path} does not fit this model's projector ({sorted(own)})")
    llava.load_state_dict(state, strict=False)


def load_adapter(peft_model, folder: Path, cfg: TrainConfig) -> None:
    """Continue from a previous LoRA run: same rank and alpha, weights loaded into the fresh adapter."""
    from peft import set_peft_model_state_dict

    saved = json.loads((folder / "adapter_config.json").read_text())
    if (saved.get("r"), saved.get("lora_alpha")) != (cfg.lora_r, cfg.lora_alpha):
        raise ConfigError(f"{folder} has LoRA r={saved.get('r')} alpha={saved.get('lora_alpha')}, "
                          f"this run asks for r={cfg.lora_r} alpha={cfg.lora_alpha}")
    result = set_peft_model_state_dict(peft_model, load_file(folder / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise ConfigError(f"{folder}: adapter tensors the model does not have: {result.unexpected_keys[:5]}")


def prepare_model(cfg: TrainConfig, llava) -> LlavaForTraining:
    if cfg.tune in ("lora", "qlora"):
        set_trainable(llava, projector=False, llm=False)
        peft_model = add_lora(llava, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, train_projector=True)
        if cfg.init_from and (Path(cfg.init_from) / "adapter").is_dir():
            load_adapter(peft_model, Path(cfg.init_from) / "adapter", cfg)
        return LlavaForTraining(peft_model)
    set_trainable(llava, projector=True, llm=cfg.tune == "full")
    return LlavaForTraining(llava)


# ----------------------------------------------------------------------------------------------- data


def data_file(cfg: TrainConfig, out_dir: Path) -> Path:
    """The LLaVA JSON to train on; easyvqa:* sources are converted into output_dir first."""
    if not cfg.data.startswith("easyvqa:"):
        return Path(cfg.data)
    kind = cfg.data.split(":", 1)[1]
    if kind == "captions":
        rows, left_out = easyvqa.captions("train")
        print(f"easy-VQA captions: {len(rows)} rows ({dict(left_out)} left out)")
    elif kind == "dialogues":
        rows = easyvqa.dialogues("train")
    elif kind == "branches":
        rows = easyvqa.dialogues("train", instruction_every_turn=True)
    else:
        raise ConfigError(f"unknown easy-VQA source {cfg.data!r}; valid: easyvqa:captions, easyvqa:dialogues, easyvqa:branches")
    return easyvqa.write_json(rows, out_dir / f"easyvqa-{kind}.json")


def build_dataset(cfg: TrainConfig, path: Path, tokenizer, template: str, proc) -> LlavaDataset:
    return LlavaDataset(
        path, tokenizer, template, proc, image_folder=cfg.image_folder, skip_bad=cfg.skip_bad,
        max_length=cfg.max_length, independent_turns=cfg.independent_turns, offset=cfg.offset, limit=cfg.limit,
    )


def attach_cache(cfg: TrainConfig, ds: LlavaDataset, llava, out_dir: Path) -> tuple[FeatureCache, float]:
    root = Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else out_dir.parent / "feature-cache"
    cache = FeatureCache(root, llava.model.vision_tower, ds.proc, llava.config.vision_feature_layer,
                         llava.config.vision_feature_select_strategy)
    t0 = time.perf_counter()
    cache.fill(ds.image_keys, progress=cfg.progress)
    seconds = time.perf_counter() - t0
    if cache.encoded:
        cache.save()
    ds.use_cache = True
    return cache, seconds


def measure_cache(model: LlavaForTraining, ds: LlavaDataset, cache: FeatureCache, pad_id: int, cfg: TrainConfig) -> dict:
    """Samples/s of data loading + forward + backward on the same batches with and without the cache.

    The two modes alternate batch by batch (after one warm-up batch each), so load from other processes on a shared
    machine hits both alike. No optimizer step is taken.
    """
    idx = list(range(min((cfg.measure_cache_steps + 1) * cfg.batch_size, len(ds))))
    batches = [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
    seconds = {"uncached": 0.0, "cached": 0.0}
    for n, b in enumerate(batches):
        for mode in ("uncached", "cached") if n % 2 else ("cached", "uncached"):
            ds.use_cache = mode == "cached"
            t0 = time.perf_counter()
            batch = Collator(pad_id, cache)([ds[i] for i in b])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(**batch)["loss"]
            loss.backward()
            model.zero_grad(set_to_none=True)
            if n:  # batch 0 warms up both paths
                seconds[mode] += time.perf_counter() - t0
    ds.use_cache = True
    samples = sum(len(b) for b in batches[1:])
    result = {f"{m}_samples_per_s": samples / s for m, s in seconds.items()}
    result["cache_speedup"] = result["cached_samples_per_s"] / result["uncached_samples_per_s"]
    result["measured_samples"] = samples
    return result


# ----------------------------------------------------------------------------------------------- outputs


def save_outputs(cfg: TrainConfig, model: LlavaForTraining, tokenizer, proc, template: str, out_dir: Path) -> None:
    llava = model.llava
    save_file(projector_state(llava), out_dir / "projector.safetensors")
    if cfg.tune in ("lora", "qlora"):
        model.model.save_pretrained(out_dir / "adapter")
    elif cfg.tune == "full":
        state = {n: p.detach().cpu().contiguous() for n, p in llava.named_parameters() if p.requires_grad}
        save_file(state, out_dir / "llm.safetensors")
    if cfg.export:
        export_hf(model, tokenizer, proc, template, out_dir / "hf")


def export_hf(model: LlavaForTraining, tokenizer, proc, template: str, out: Path) -> Path:
    """A standard HF llava folder; LoRA is merged into a copy of the weights."""
    import copy

    merged = copy.deepcopy(model.model)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    meta = LlavaMeta(**getattr(merged.config, META_KEY))
    setattr(merged.config, META_KEY, meta.model_copy(update={"template": template}).model_dump())
    return save_checkpoint(merged.float().eval(), tokenizer, proc, template, out)


# ----------------------------------------------------------------------------------------------- main


def training_args(cfg: TrainConfig, out_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.scheduler,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        deepspeed=cfg.deepspeed,
        disable_tqdm=not cfg.progress,
    )


def run(cfg: TrainConfig) -> dict:
    """Train one stage; returns the metrics (written to output_dir/metrics.json by the main process)."""
    cfg = with_preset(cfg)
    autocast = resolve_autocast(cfg.bf16, "cuda" if torch.cuda.is_available() else "cpu")
    cfg = cfg.model_copy(update={"bf16": autocast.value})
    print(json.dumps({"precision": autocast.reason}), flush=True)
    out_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every process
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llava-train-") as work:
        llava, tokenizer, proc, own_template = load_for_training(cfg, Path(work))
    template = cfg.template or own_template
    if cfg.init_from:
        load_projector(llava, cfg.init_from)
    model = prepare_model(cfg, llava).train()
    if cfg.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # flag or accelerate config
        _skip_deepspeed_shm_build()
    args = training_args(cfg, out_dir)  # joins the process group when launched on several processes
    with args.main_process_first(local=False, desc="data and feature cache"):
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.should_save:
            (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        ds = build_dataset(cfg, data_file(cfg, out_dir), tokenizer, template, proc)
        extra: dict = {"stage": cfg.stage, "template": template, "rows": len(ds), "skipped_rows": dict(ds.skipped),
                       "processes": args.world_size, **params_summary(model)}
        cache = None
        if cfg.cache_features and ds.image_keys:
            cache, extra["cache_fill_seconds"] = attach_cache(cfg, ds, model.llava, out_dir)
            extra["cache_images_encoded"] = cache.encoded
    if len(ds) < global_batch(args):  # checked on every process, after the main one has left the block above
        raise ConfigError(f"{len(ds)} rows are fewer than one global batch ({global_batch(args)} = batch_size x "
                          f"{args.world_size} processes x grad_accum)")
    if cache is not None and cfg.measure_cache_steps:
        extra["cache_measurement"] = measure_cache(model, ds, cache, tokenizer.pad_token_id, cfg)
        print(json.dumps({"cache_measurement": extra["cache_measurement"]}), flush=True)
    timer = StepTimer()
    callbacks = [timer]
    if cfg.heap_trim and not torch.cuda.is_available():
        callbacks.append(HeapTrim())
    if cfg.max_minutes is not None:
        if args.world_size > 1:
            raise ConfigError("max_minutes needs a single process (processes would stop at different steps)")
        callbacks.append(budget := TimeBudget(cfg.max_minutes, fit_schedule=cfg.fit_schedule))
    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=ds, data_collator=Collator(tokenizer.pad_token_id, cache),
        projector_lr=cfg.projector_lr, group_by_modality_length=cfg.group_by_modality_length, callbacks=callbacks,
        image_token_id=getattr(tokenizer, "image_token_id", None),
    )
    last = resume_point(cfg, out_dir)
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    train_seconds = time.perf_counter() - t_train
    extra.update(train_seconds=train_seconds, total_seconds=time.perf_counter() - t_start,
                 final_loss=result.training_loss, resumed_from=last, global_step=trainer.state.global_step,
                 seconds_per_step=timer.seconds_per_step(),
                 stopped_by_time_budget_at=budget.stopped_at if cfg.max_minutes is not None else None,
                 schedule_fitted_to_steps=budget.fitted_steps if cfg.max_minutes is not None else None,
                 zero_stage=trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None)
    # per step this run took (the timer's steps: a resumed run's earlier steps are not in trainer.tokens either)
    extra.update(trainer.token_report(len(timer.seconds), train_seconds))
    with gathered_weights(model):
        if args.should_save:
            save_outputs(cfg, model, tokenizer, proc, template, out_dir)
    if args.should_save:
        return write_run_report(trainer, out_dir, extra)
    return extra


def resume_point(cfg: TrainConfig, out_dir: Path) -> str | None:
    """The checkpoint to continue from: the one named, else (with resume) the newest complete one in output_dir.

    Trainer writes trainer_state.json last (after weights, optimizer/ZeRO partitions and RNG states), so a folder
    without it is a checkpoint cut short by a kill; transformers' get_last_checkpoint would pick it and fail."""
    if cfg.resume_from_checkpoint:
        if not (Path(cfg.resume_from_checkpoint) / TRAINER_STATE_NAME).is_file():
            raise ConfigError(f"resume_from_checkpoint={cfg.resume_from_checkpoint} is not a complete checkpoint-N folder")
        return cfg.resume_from_checkpoint
    if not cfg.resume or not out_dir.is_dir():
        return None
    complete = [p for p in out_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if p.name.split("-")[-1].isdigit() and (p / TRAINER_STATE_NAME).is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def gathered_weights(model: torch.nn.Module):
    """Under ZeRO-3 each process holds a slice of every weight: gather them (all processes take part) so the main
    process can save whole tensors; a no-op otherwise."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op (~0.5-2 min on 2 cores, every fresh environment)
    when its process group starts; without it DeepSpeed communicates through torch.distributed (gloo) as usual.
    Replacing the module's builder with a no-op before initialize skips the build. The module is taken from
    sys.modules: `import deepspeed.comm.torch` resolves to the `torch` name that `deepspeed.comm` re-exports."""
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    module = sys.modules.get("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):  # versions without it have nothing to skip here
        module.build_shm_op = lambda: None


# ----------------------------------------------------------------------------------------------- CLI


def _on_off_auto(value: str) -> bool | str:
    v = value.lower()
    if v == "auto":
        return "auto"
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a JSON file of TrainConfig fields (flags override it)")
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        elif name == "bf16":  # --bf16 [auto|true|false] / --no-bf16
            parser.add_argument(flag, dest=name, nargs="?", const=True, default=None, type=_on_off_auto,
                                help="bf16 autocast: auto (default: only where bf16 is native), true, false")
            parser.add_argument("--no-bf16", dest=name, action="store_false")
        else:
            parser.add_argument(flag, dest=name, default=None)
    ns = vars(parser.parse_args(argv))
    values = json.loads(Path(ns.pop("config")).read_text()) if ns.get("config") else {}
    values.update({k: v for k, v in ns.items() if v is not None})
    return TrainConfig(**values)


def _leave_process_group() -> None:
    """Leave the process group before the interpreter exits. A process that exits with it still open (a rank that
    does not save, finishing while rank 0 writes the model) can abort in gloo's teardown ("terminate called without
    an active exception", SIGABRT) and fail the whole launch after training succeeded. The barrier keeps every rank
    until the save is done; only the CLI calls this, as the process ends right after."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    metrics = run(parse_args(argv))
    _leave_process_group()
    summary = {k: metrics[k] for k in ("stage", "rows", "final_loss", "train_seconds", "global_step") if k in metrics}
    if "cache_measurement" in metrics:
        summary["cache_speedup"] = metrics["cache_measurement"]["cache_speedup"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
