"""What this machine runs fast, decided once per process and logged with the reason.

Promises:
- `cpu_info()` reads the CPU's flags (`/proc/cpuinfo`, else what torch reports) once.
- `resolve_dtype("auto", device)` picks the compute dtype for inference: bf16 (fp16 without bf16 support) on CUDA;
  on CPU bf16 only where the CPU multiplies bf16 natively (avx512_bf16 or AMX), else float32 — emulated bf16 is
  slower for prefill and training even where it halves decode's memory traffic. An explicit name is checked and
  returned as is.
- `resolve_autocast("auto", device)` is the same decision for training's mixed precision: on a CPU without native
  bf16, autocast to bf16 made a LoRA step 24x slower (63 s vs 2.6 s, AVX2 EPYC), so `auto` turns it off there.
- `Choice` carries the value and a one-line reason for logs, benchmarks and the model card.
- `ThreadGovernor` (`--num-threads auto`) gives torch the CPUs other processes leave free, re-decided every few
  seconds.
- `single_openmp_thread(release=...)` keeps a serving process's other threads off OpenMP, so the engine thread's
  OpenMP team is the only one (see its docstring for the 4x it costs otherwise).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]  # as read, capped by ATEN_CPU_CAPABILITY
    torch_capability: str  # what ATen dispatches to: DEFAULT / AVX2 / AVX512 ...

    @property
    def native_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def avx2(self) -> bool:
        return {"avx2", "fma", "f16c"} <= self.flags

    def summary(self) -> str:
        shown = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16",
                             "amx_int8", "avx_vnni") if f in self.flags]
        return f"{self.model or platform.machine()} [{' '.join(shown) or 'no SIMD flags read'}; torch {self.torch_capability}]"


@functools.cache
def cpu_info() -> CpuInfo:
    model, flags = "", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    capability = torch.backends.cpu.get_cpu_capability()
    # ATEN_CPU_CAPABILITY=avx2 (or default) caps what torch uses; honour the same cap for our own choices, so a
    # bigger CPU can stand in for a smaller one
    if capability == "AVX2":
        flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    elif capability == "DEFAULT":
        flags = {f for f in flags if not f.startswith(("avx", "amx", "fma", "f16c"))}
    if not flags:  # no /proc/cpuinfo (macOS, Windows): what ATen dispatches to is the best hint
        flags = {"avx2", "fma", "f16c"} if capability.startswith("AVX") else set()
        if capability == "AVX512":
            flags |= {"avx512f", "avx512bw"}
    return CpuInfo(model, frozenset(flags), capability)


@dataclass(frozen=True)
class Choice:
    value: object
    reason: str


def normalize_dtype_name(name: str) -> str:
    name = DTYPE_ALIASES.get(name, name)
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return name


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> Choice:
    """The compute dtype for inference on `device` (see the module docstring)."""
    if isinstance(name, torch.dtype):
        return Choice(name, "given")
    name = normalize_dtype_name(name or "auto")
    if name != "auto":
        return Choice(DTYPES[name], "given")
    if _is_cuda(device):
        if torch.cuda.is_bf16_supported():
            return Choice(torch.bfloat16, "CUDA device with bf16 support")
        return Choice(torch.float16, "CUDA device without bf16 support")
    cpu = cpu_info()
    if cpu.native_bf16:
        return Choice(torch.bfloat16, f"CPU multiplies bf16 natively ({cpu.summary()})")
    return Choice(torch.float32, f"CPU has no native bf16, so bf16 would be emulated ({cpu.summary()})")


def resolve_autocast(setting: str | bool | None, device: str | torch.device = "cpu") -> Choice:
    """Whether training autocasts to bf16: True/False as given, or decided for this machine with "auto"."""
    if isinstance(setting, bool):
        return Choice(setting, "given")
    if setting not in (None, "auto"):
        raise ValueError(f"bf16 must be true, false or auto, got {setting!r}")
    choice = resolve_dtype("auto", device)
    on = choice.value == torch.bfloat16
    return Choice(on, ("bf16 autocast: " if on else "no bf16 autocast: ") + choice.reason)


def _proc_stat_cpu() -> tuple[int, int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, and how many CPUs /proc/stat lists; None off Linux."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields), sum(1 for ln in lines[1:] if ln.startswith("cpu"))


def _own_ticks() -> int:
    """This process's user + system CPU time in clock ticks (all its threads)."""
    t = os.times()
    return round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


class ThreadGovernor:
    """`--num-threads auto`: torch's CPU threads = the CPUs this process may use minus the CPUs other processes keep
    busy, re-decided at most every `interval` seconds from /proc/stat and this process's own CPU time.

    Why: on 2 cores a decode-shaped loop took 4.2 ms with torch's 2 threads and 8.1 ms with 1 on an idle machine,
    but 24.3 ms with 2 and 8.9 ms with 1 beside one busy process (a training or test job): the 2 OpenMP threads
    spin-wait against it (bench/results/omp_contention.json), so no fixed setting is right for both.
    Call `apply()` from the thread that runs the model (OpenMP's thread count is per calling thread). It does
    nothing where /proc/stat is missing or lists more CPUs than this process may use (a container's view of its host).
    """

    def __init__(self, interval: float = 2.0, cpus: int | None = None, read=_proc_stat_cpu, own=_own_ticks,
                 clock=time.monotonic):
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.cpus = cpus
        self.interval, self._read, self._own, self._clock = interval, read, own, clock
        self._last: tuple[float, int, int, int] | None = None
        self.others = 0.0  # CPUs other processes kept busy over the last interval
        self.enabled = True

    def threads(self) -> int | None:
        """The thread count for now, or None when there is nothing new to decide (or no way to measure)."""
        if not self.enabled:
            return None
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.interval:
            return None
        stat = self._read()
        if stat is None or stat[2] > self.cpus:
            self.enabled = False
            logger.info("--num-threads auto: /proc/stat %s; keeping torch's %d threads",
                        "is missing" if stat is None else f"lists {stat[2]} CPUs but this process may use {self.cpus}",
                        torch.get_num_threads())
            return None
        busy, total, ncpu = stat
        own = self._own()
        last, self._last = self._last, (now, busy, total, own)
        if last is None or total <= last[2]:
            return None
        per_cpu = (total - last[2]) / ncpu  # ticks one CPU had in the interval
        self.others = max(0.0, ((busy - last[1]) - (own - last[3])) / per_cpu)
        return max(1, min(self.cpus, self.cpus - round(self.others)))

    def apply(self) -> int:
        """Set torch's threads if the decision changed; returns the count in force."""
        n = self.threads()
        if n is not None and n != torch.get_num_threads():
            logger.info("--num-threads auto: %d thread(s) (other processes keep %.1f of %d CPUs busy)", n,
                        self.others, self.cpus)
            torch.set_num_threads(n)
        return torch.get_num_threads()


@functools.cache
def _libgomp():
    """torch's GNU OpenMP runtime, loaded in this process (ctypes), or None (another runtime, or not Linux)."""
    torch.get_num_threads()  # torch has loaded its OpenMP runtime by now
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    if len(paths) != 1:
        return None
    lib = ctypes.CDLL(paths.pop())
    return lib if hasattr(lib, "omp_set_num_threads") else None


def single_openmp_thread(release: bool = False) -> bool:
    """From now on the calling thread computes torch's CPU ops with one OpenMP thread; `release` also ends the idle
    OpenMP workers this thread started before. Returns False where torch does not run on GNU OpenMP (nothing done).

    Why: libgomp keeps one team of worker threads per thread that ever ran a parallel region, and once its threads
    outnumber the CPUs it stops spinning between regions and sleeps instead. A worker's model runs in the engine
    thread after the main thread loaded it (and request threads preprocessed images) with torch's threads: the
    engine's decode of the embedded default with 2 threads on 2 cores ran at 40-42 tokens/s instead of 166, below one
    thread's 85-92 (bench/results/omp_contention-engine.json). Serving processes call this in their main thread once the
    engine runs, and as the initializer of their request threads.
    """
    lib = _libgomp()
    if lib is None:
        return False
    torch.get_num_threads()  # torch sets each thread's OpenMP count once, lazily: let it, then override this thread's
    if release and hasattr(lib, "omp_pause_resource_all"):
        lib.omp_pause_resource_all(2)  # omp_pause_hard: this thread's idle team ends
    lib.omp_set_num_threads(1)
    return True
