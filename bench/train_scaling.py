"""Seconds per training step of the stage-2 recipe on 1 and on 2 processes at the same global batch
(`python -m bench.train_scaling [--quick]`).

One process x batch B (plain HF Trainer, with one thread per core and with one thread) against
`torchrun --nproc_per_node 2` x batch B/2 under DeepSpeed ZeRO-2 (gloo on CPU, one thread per process); LoRA +
projector, float32, the same rows. The figure per run is the median wall time of an optimizer step after the first
(train.train's `seconds_per_step`), so model loading, the feature cache and DeepSpeed start-up are left out. All runs
share this machine's cores (and whatever else runs on them: the 1-minute load average is recorded): two processes
on 2 cores are not expected to be faster; the numbers show what the data-parallel machinery costs here. The default
model (SmolLM2-135M + DINOv2-small) on easy-VQA dialogues, or with --quick the tiny random test model. Prints a JSON
line with the CPU flags; the default model's run is written to bench/results/train_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.engine import RESULTS_DIR, cpu_flags
from serve.common import free_port

ROOT = Path(__file__).resolve().parents[1]


def tiny_setup(root: Path) -> list[str]:
    """The tiny random llava of the tests and 64 one-image rows."""
    from PIL import Image

    from llava.testing import make_tiny_llava

    model = make_tiny_llava(root / "tiny", family="dinov2")
    rows = []
    for i in range(64):
        colour = ("red", "green", "blue")[i % 3]
        Image.new("RGB", (20, 20), {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}[colour]).save(
            root / f"{i % 3}.png")
        rows.append({"id": str(i), "image": f"{i % 3}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": f"it is {colour}"}]})
    (root / "data.json").write_text(json.dumps(rows))
    return ["--model", str(model), "--data", str(root / "data.json"), "--image-folder", str(root)]


def run_one(cmd: list[str], out: Path, threads: int, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds_per_step": round(metrics["seconds_per_step"], 4), "steps": metrics["global_step"],
            "wall_seconds": round(time.perf_counter() - t0, 1), "zero_stage": metrics.get("zero_stage"),
            "final_loss": metrics["final_loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny random model instead of the default model")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 6, quick 20)")
    p.add_argument("--batch-size", type=int, default=4, help="global batch (even)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = p.parse_args(argv)
    steps = args.steps or (20 if args.quick else 6)
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as tmp:
        root = Path(tmp)
        source = tiny_setup(root) if args.quick else ["--model", "default", "--data", "easyvqa:dialogues", "--limit",
                                                      str(args.batch_size * (steps + 1))]
        common = ["--stage", "stage2", *source, "--max-steps", str(steps), "--save-steps", str(10 * steps),
                  "--no-bf16", "--no-progress", "--logging-steps", "1", "--feature-cache-dir", str(root / "features")]
        runs = {}
        # one process with every core, and with one thread (what each of the two processes gets)
        for name, n in ((f"1_process_{threads}_threads", threads), ("1_process_1_thread", 1)):
            out = root / name
            runs[name] = run_one([sys.executable, "-m", "train.train", *common, "--output-dir", str(out),
                                  "--batch-size", str(args.batch_size)], out, n, args.timeout)
        out = root / "two"
        runs["2_processes_zero2"] = run_one(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), "-m", "train.train", *common, "--output-dir", str(out),
             "--batch-size", str(args.batch_size // 2), "--deepspeed", str(ROOT / "train/configs/zero2.json")],
            out, max(threads // 2, 1), args.timeout)
    best_one = min(r["seconds_per_step"] for k, r in runs.items() if k.startswith("1_"))
    res = {"mode": "quick" if args.quick else "default-model", "cpu": cpu_flags(), "cores": threads,
           "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the shared cores skews the figures
           "global_batch": args.batch_size, "precision": "float32", "runs": runs,
           "two_processes_over_best_one": round(runs["2_processes_zero2"]["seconds_per_step"] / best_one, 2)}
    print(json.dumps(res))
    if not args.quick:  # the record is the default model's
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / "train_scaling.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
