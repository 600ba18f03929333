"""`python -m train.train` on several processes and "nodes" of this CPU (gloo) under `accelerate launch` and
`torchrun` with DeepSpeed ZeRO-2 / ZeRO-3: the same loss curve, saved weights and resume as one process at the same
global batch.

Tolerances (float32, bf16 autocast off): every logged step's loss within rel LOSS_RTOL = 1e-4 of the one-process run,
every saved tensor (projector, LoRA adapter, LoRA-merged HF model; values up to 0.1-1) within abs WEIGHT_ATOL = 5e-5.
Measured: loss 1.6e-7 relative; projector 4e-9, merged model 8e-8, LoRA adapter up to 2.8e-6 (Adam divides by the
root of tiny second moments, so the summation-order noise of the gradient reduction grows there). Averaging the loss
per process instead moves the losses by 3e-3 relative. A killed and resumed run equals the uninterrupted one exactly.
The data mixes answer lengths and text-only rows and does not fill the last global batch, so a loss averaged per
process, an order that depends on the process count or a ragged last batch would break these bounds.

Fast (`make test`): accelerate + ZeRO-2 on 2 processes against one process. Slow: torchrun, DeepSpeed's launcher
and ZeRO-3, gradient accumulation, two accelerate "nodes" (two launchers, one process each), a 2-process job
SIGKILLed after a checkpoint and started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image
from safetensors.torch import load_file

from serve.common import free_port
from train.train import parse_args, run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "train" / "configs"
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 5e-5
SAVED = ["projector.safetensors", "adapter/adapter_model.safetensors", "hf/model.safetensors"]
LAUNCH_TIMEOUT = 300  # s per launch; a 2-process tiny run takes ~15 s on 2 idle cores

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
ANSWERS = ["{c}", "it is {c}", "the shape is {c}", "a {c} shape on a gray picture", "{c} is the color of the shape"]


def write_rows(root: Path, images: int = 17, text_only: int = 5) -> Path:
    """22 rows (5 global batches of 4 and 2 rows dropped per epoch) with 1- to 8-word answers and text-only rows."""
    rows = []
    for i in range(images):
        colour = list(COLOURS)[i % 3]
        img = root / "img" / f"{i % 3}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), COLOURS[colour]).save(img)
        rows.append({"id": f"r{i}", "image": img.name, "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"},
            {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)].format(c=colour)}]})
    for i in range(text_only):
        rows.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": "hello"}, {"from": "gpt", "value": " ".join(["hi"] * (1 + 2 * i))}]})
    path = root / "data.json"
    path.write_text(json.dumps(rows))
    return path


def flags(tiny: Path, data: Path, out: Path, *, batch_size: int, max_steps: int = 6, save_steps: int = 3,
          **extra) -> list[str]:
    """Stage-2 LoRA command line; global batch 4 = batch_size x processes."""
    opts = dict(stage="stage2", model=tiny, data=data, image_folder=data.parent / "img", output_dir=out,
                batch_size=batch_size, max_steps=max_steps, save_steps=save_steps, tune="lora", lora_r=4, lora_alpha=8,
                lr=5e-3, logging_steps=1, feature_cache_dir=out.parent / f"{out.name}-features", **extra)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    return args + ["--no-bf16", "--no-progress", "--export"]


def env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "LLAVA_CACHE": str(tmp / "llava-cache"),
            "TORCH_EXTENSIONS_DIR": str(tmp / "torch-extensions")}  # nothing is built there (train.train skips it)


def accelerate_cmd(zero: int, port: int, *, machines: int = 1, rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(CONFIGS / f"accelerate_multinode_zero{zero}.yaml"), "--num_machines", str(machines),
            "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "-m", "train.train"]


def torchrun_cmd(zero: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "train.train",
            "--deepspeed", str(CONFIGS / f"zero{zero}.json")]


def deepspeed_cmd(zero: int, port: int) -> list[str]:
    """DeepSpeed's own launcher (the hostfile route), on this one host."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "--no_local_rank", "--module", "train.train",
            "--deepspeed", str(CONFIGS / f"zero{zero}.json")]


LAUNCHERS = {"torchrun": torchrun_cmd, "accelerate": accelerate_cmd, "deepspeed": deepspeed_cmd}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in sessions of their own)."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(30)


def start(cmd: list[str], log: Path, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(tmp), stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def launch(cmds: list[list[str]], tmp: Path, name: str, timeout: float = LAUNCH_TIMEOUT) -> None:
    """Run launchers side by side (one per "node"); all must exit 0 within `timeout` s, else all are killed."""
    logs = [tmp / f"{name}-{i}.log" for i in range(len(cmds))]
    procs = [start(c, log, tmp) for c, log in zip(cmds, logs)]
    deadline = time.monotonic() + timeout
    try:
        for p, log in zip(procs, logs):
            rc = p.wait(max(deadline - time.monotonic(), 1))
            assert rc == 0, f"{name} exited with {rc}:\n{log.read_text()[-4000:]}"
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} took over {timeout} s:\n{logs[0].read_text()[-4000:]}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["log_history"] if "loss" in h]


def assert_same_run(ref: Path, out: Path) -> None:
    ref_losses, got = losses(ref), losses(out)
    assert len(got) == len(ref_losses) and got == pytest.approx(ref_losses, rel=LOSS_RTOL), (ref_losses, got)
    for name in SAVED:
        a, b = load_file(ref / name), load_file(out / name)
        assert a.keys() == b.keys(), name
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= WEIGHT_ATOL, f"{name}: max |difference| {worst:.2e} > {WEIGHT_ATOL}"


def assert_zero_run(out: Path, zero: int, step: int = 3) -> None:
    """DeepSpeed really ran at this ZeRO stage on two data-parallel ranks (each saved its own partition)."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zero_stage"] == zero and metrics["processes"] == 2
    parts = sorted(p.name for p in (out / f"checkpoint-{step}" / f"global_step{step}").iterdir())
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(parts)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny model, data, the one-process run: per-device batch 4, no DeepSpeed), computed once per module."""
    from llava.testing import make_tiny_llava

    root = tmp_path_factory.mktemp("dist")
    tiny = make_tiny_llava(root / "tiny", family="dinov2")
    data = write_rows(root)
    ref = root / "one-process"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_CACHE", str(root / "llava-cache"))
        run(parse_args(flags(tiny, data, ref, batch_size=4)))
    return tiny, data, ref


def test_two_processes_zero2_match_one_process(setup, tmp_path):
    """accelerate launch, 2 processes x per-device batch 2, ZeRO-2 == 1 process x batch 4 (fast variant)."""
    tiny, data, ref = setup
    out = tmp_path / "acc-zero2"
    launch([accelerate_cmd(2, free_port()) + flags(tiny, data, out, batch_size=2)], tmp_path, "acc-zero2")
    assert_zero_run(out, 2)
    assert_same_run(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,zero", [("torchrun", 2), ("torchrun", 3), ("accelerate", 3), ("deepspeed", 2)])
def test_launchers_and_zero_stages_match_one_process(setup, tmp_path, launcher, zero):
    tiny, data, ref = setup
    out = tmp_path / f"{launcher}-zero{zero}"
    launch([LAUNCHERS[launcher](zero, free_port()) + flags(tiny, data, out, batch_size=2)], tmp_path, out.name)
    assert_zero_run(out, zero)
    assert_same_run(ref, out)


@pytest.mark.slow
def test_grad_accumulation_on_two_processes_matches_one_process(setup, tmp_path):
    """2 processes x batch 1 x 2 accumulation steps: the step's loss is the mean over all its label tokens."""
    tiny, data, ref = setup
    out = tmp_path / "torchrun-accum"
    launch([torchrun_cmd(2, free_port()) + flags(tiny, data, out, batch_size=1, grad_accum=2)], tmp_path, out.name)
    assert_same_run(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_nodes_match_one_process(setup, tmp_path, zero):
    """Two accelerate launchers (machine_rank 0 and 1, one process each) rendezvous on 127.0.0.1 and train as one."""
    tiny, data, ref = setup
    out, port = tmp_path / f"nodes-zero{zero}", free_port()
    args = flags(tiny, data, out, batch_size=2)
    launch([accelerate_cmd(zero, port, machines=2, rank=r) + args for r in (0, 1)], tmp_path, out.name)
    assert_zero_run(out, zero)
    assert_same_run(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_killed_two_process_run_resumes_to_the_uninterrupted_result(setup, tmp_path, zero):
    """SIGKILL the whole 2-process job once checkpoint-2 is complete, run the same command again: it resumes from the
    newest complete checkpoint (a half-written one is skipped) and ends where the uninterrupted run ends."""
    tiny, data, _ = setup
    steps = 16
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    launch([torchrun_cmd(zero, free_port()) + flags(tiny, data, whole, batch_size=2, max_steps=steps, save_steps=2)],
           tmp_path, "whole")

    cmd = torchrun_cmd(zero, free_port()) + flags(tiny, data, cut, batch_size=2, max_steps=steps, save_steps=2)
    proc = start(cmd, tmp_path / "cut-killed.log", tmp_path)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (cut / "checkpoint-2" / "trainer_state.json").is_file():
            assert proc.poll() is None, (tmp_path / "cut-killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint-2 in time"
            time.sleep(0.02)
    finally:
        kill_tree(proc)
    assert not (cut / "metrics.json").exists(), "the run finished before it was killed; nothing was interrupted"

    launch([cmd], tmp_path, "cut-resumed")
    metrics = json.loads((cut / "metrics.json").read_text())
    resumed_step = int(Path(metrics["resumed_from"]).name.split("-")[1])
    assert 2 <= resumed_step < steps and metrics["global_step"] == steps
    assert_same_run(whole, cut)


def test_resume_from_checkpoint_names_a_complete_checkpoint(tmp_path):
    """--resume-from-checkpoint takes HF Trainer's checkpoint-N folder; a folder cut short (no trainer_state.json)
    is refused by name and skipped by the automatic resume."""
    from train.train import ConfigError, resume_point

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-10").mkdir()  # killed while saving
    cfg = parse_args(["--stage", "stage2", "--model", "m", "--data", "d", "--output-dir", str(out)])
    assert resume_point(cfg, out) == str(out / "checkpoint-2")
    named = cfg.model_copy(update={"resume_from_checkpoint": str(out / "checkpoint-10")})
    with pytest.raises(ConfigError, match="checkpoint-10"):
        resume_point(named, out)
    assert resume_point(cfg.model_copy(update={"resume": False}), out) is None


def test_distributed_configs_name_existing_files():
    """The shipped accelerate configs point at the shipped DeepSpeed JSON files and use the standard launcher."""
    import yaml

    for zero in (2, 3):
        cfg = yaml.safe_load((CONFIGS / f"accelerate_multinode_zero{zero}.yaml").read_text())
        ds = cfg["deepspeed_config"]
        assert cfg["distributed_type"] == "DEEPSPEED" and ds["deepspeed_multinode_launcher"] == "standard"
        assert (ROOT / ds["deepspeed_config_file"]).resolve() == CONFIGS / f"zero{zero}.json"
        assert json.loads((CONFIGS / f"zero{zero}.json").read_text())["zero_optimization"]["stage"] == zero
        assert cfg["num_processes"] == 16 and cfg["num_machines"] == 2


def test_samplers_give_every_process_the_same_whole_global_batches():
    """Both samplers are deterministic in (seed, epoch) -- every process draws the same stream -- and stop at a whole
    number of global batches (22 rows, global batch 4 -> 20)."""
    from train.data import ModalityLengthSampler, ShuffleSampler

    lengths, modal = list(range(22)), [i < 17 for i in range(22)]
    for make in (lambda: ModalityLengthSampler(lengths, modal, 4, seed=3), lambda: ShuffleSampler(22, 4, seed=3)):
        a, b = make(), make()
        order = list(a)
        assert order == list(b) and len(order) == len(a) == 20 and len(set(order)) == 20
        a.set_epoch(1)
        assert list(a) != order and len(list(a)) == 20
