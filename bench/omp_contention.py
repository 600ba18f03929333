"""How torch's CPU threads behave when another process is busy on the same small machine.

    python -m bench.omp_contention [--out bench/results/omp_contention.json]

Times a decode-shaped loop (one token through 30 matrix-vector products the size of SmolLM2-135M's MLP, 576 x 1536)
in a fresh process per setting -- torch's default threads, OMP_WAIT_POLICY=PASSIVE, one thread, and
llava.hardware.ThreadGovernor (what `--num-threads auto` / `--cpu-threads auto` run: consulted before every token,
as the engine does before every step, re-deciding every 0.5 s here) -- once on an idle machine and once beside one
busy process (a Python busy loop, as a training or test job would be). Each setting is measured in its own
subprocess because OpenMP reads its environment once, when torch loads it.
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

SETTINGS = {"default threads": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "1 thread": {"OMP_NUM_THREADS": "1"}, "auto (ThreadGovernor)": {"__auto__": "1"}}


def cpu_flags() -> str:
    from llava.hardware import cpu_info

    return f"{cpu_info().summary()}, {os.cpu_count()} logical CPUs"


def measure(extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    extra_env = dict(extra_env)
    auto = extra_env.pop("__auto__", None) is not None
    out = subprocess.run([sys.executable, "-c", LOOP] + (["auto"] if auto else []), env={**env, **extra_env},
                         capture_output=True, text=True, check=True).stdout.split()
    return {"ms_per_token_loop": round(float(out[0]), 2), "threads": int(out[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    result = {"cpu": cpu_flags(), "date": time.strftime("%Y-%m-%d"), "idle": {}, "beside one busy process": {}}
    for name, env in SETTINGS.items():
        result["idle"][name] = measure(env)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        for name, env in SETTINGS.items():
            result["beside one busy process"][name] = measure(env)
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
