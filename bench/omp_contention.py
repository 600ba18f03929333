"""How torch's CPU threads behave when another process is busy on the same small machine.

    python -m bench.omp_contention [--out bench/results/omp_contention.json]

Times a decode-shaped loop (one token through 30 matrix-vector products the size of SmolLM2-135M's MLP, 576 x 1536)
in a fresh process per setting -- torch's default threads, OMP_WAIT_POLICY=PASSIVE, one thread, and
llava.hardware.ThreadGovernor (what `--num-threads auto` / `--cpu-threads auto` run: consulted before every token,
as the engine does before every step, re-deciding every 0.5 s here) -- once on an idle machine and once beside one
busy process (a Python busy loop, as a training or test job would be). Each setting is measured in its own
subprocess because OpenMP reads its environment once, when torch loads it.

    python -m bench.omp_contention --engine [--quick] [--out bench/results/omp_contention-engine.json]

measures the same settings end to end instead: single-stream decode tokens/s of one image question through
llava.engine.Engine (what a worker runs) on the embedded default model at the worker's `--dtype auto
--quantization auto` (`--quick`: bench.engine's small random model), 64 new tokens, best of 3 after 3 s of warm-up,
with `OMP_NUM_THREADS=1` or `cpu_threads="auto"` as `--num-threads 1` / `--num-threads auto` set them, and the main
thread off OpenMP once the engine runs, as a worker does (`--shared-openmp`: without that).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOOP = r"""
import sys, time, torch
from llava.hardware import ThreadGovernor
torch.manual_seed(0)
w = [torch.randn(576, 1536) for _ in range(30)]
x = torch.randn(1, 576)
governor = ThreadGovernor(interval=0.5) if sys.argv[1:] == ["auto"] else None
def step():
    if governor is not None:
        governor.apply()
    for m in w:
        x @ m
t0 = time.perf_counter()
while time.perf_counter() - t0 < 1.5:  # warm up; the governor has decided by then
    step()
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    for _ in range(300):
        step()
    best = min(best, (time.perf_counter() - t) / 300)
print(best * 1e3, torch.get_num_threads())
"""

ENGINE = r"""
import sys, time
from bench.engine import consume, default_setup, fixed_length, no_cache_engine, one_image_request, quick_setup
from llava.engine import GenerationRequest
mode, quick = sys.argv[1], "--quick" in sys.argv
setup = quick_setup() if quick else default_setup()
engine = no_cache_engine(setup, max_batch_size=1, cpu_threads="auto" if mode == "auto" else "fixed").start()
if "--shared-openmp" not in sys.argv:  # as a worker does (llava.hardware.single_openmp_thread)
    from llava.hardware import single_openmp_thread
    single_openmp_thread(release=True)
n, best, r = 64, float("inf"), 0
def decode(r):
    ids, images = one_image_request(setup, r, n)
    timing = consume(engine.submit(GenerationRequest(ids, images, fixed_length(n))), time.perf_counter())
    return sum(timing.itl) / len(timing.itl)  # seconds per decoded token after the first
try:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 3 or r < 1:  # warm up; the governor (2 s interval) has decided by then
        decode(r)
        r += 1
    for _ in range(3):
        r += 1
        best = min(best, decode(r))
    print(1 / best, engine.stats().cpu_threads)
finally:
    engine.shutdown()
"""

SETTINGS = {"default threads": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "1 thread": {"OMP_NUM_THREADS": "1"}, "auto (ThreadGovernor)": {"__auto__": "1"}}


def cpu_flags() -> str:
    from llava.hardware import cpu_info

    return f"{cpu_info().summary()}, {os.cpu_count()} logical CPUs"


def measure(extra_env: dict[str, str], engine: list[str] | None = None) -> dict:
    """One setting in a fresh process: the loop's ms per token, or (engine: the ENGINE script's flags, maybe empty)
    decode tokens/s."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    extra_env = dict(extra_env)
    auto = extra_env.pop("__auto__", None) is not None
    if engine is not None:
        args = ["-c", ENGINE, "auto" if auto else "fixed", *engine]
    else:
        args = ["-c", LOOP] + (["auto"] if auto else [])
    done = subprocess.run([sys.executable, *args], env={**env, **extra_env}, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise SystemExit(f"bench.omp_contention: the measuring process failed:\n{done.stderr[-2000:]}")
    out = done.stdout.split()
    if engine is not None:
        return {"decode_tok_s": round(float(out[-2]), 1), "threads": int(out[-1])}
    return {"ms_per_token_loop": round(float(out[0]), 2), "threads": int(out[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--engine", action="store_true", help="decode tokens/s through llava.engine instead of the loop")
    p.add_argument("--quick", action="store_true", help="--engine: the small random model, not the default")
    p.add_argument("--shared-openmp", action="store_true",
                   help="--engine: leave the main thread's OpenMP team in place (as workers did before "
                        "llava.hardware.single_openmp_thread)")
    a = p.parse_args(argv)
    engine = [f for f, on in (("--quick", a.quick), ("--shared-openmp", a.shared_openmp)) if on] if a.engine else None
    settings = {k: v for k, v in SETTINGS.items() if not (engine is not None and "OMP_WAIT_POLICY" in v)}
    result = {"cpu": cpu_flags(), "date": time.strftime("%Y-%m-%d"),
              "measure": (f"engine decode tokens/s, {'quick' if a.quick else 'default'} model, main thread "
                          f"{'keeping its OpenMP team' if a.shared_openmp else 'off OpenMP (as a worker)'}"
                          if engine is not None else "ms per decode-shaped loop"),
              "idle": {}, "beside one busy process": {}}
    for name, env in settings.items():
        result["idle"][name] = measure(env, engine)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        for name, env in settings.items():
            result["beside one busy process"][name] = measure(env, engine)
    finally:
        busy.kill()
        busy.wait()
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
