"""CPU kernels that PyTorch does not ship fast enough, compiled once per machine with the system C compiler.

Why: for decode (a few rows per step) the cost is reading the weights. PyTorch's packed int4 kernel
(`_weight_int4pack_mm_for_cpu`) needs bf16 activations and on an AVX2-only CPU took 14.3 ms per SmolLM2-135M step;
this one (int4 weights, activations quantized per 32 on the fly, AVX2 integer multiply-adds) takes 9 ms on the same
machine (`bench/kernels.py` measures both). Nothing here is needed for correctness: without a compiler, or on a CPU
without AVX2, `available()` is False and callers use the dequantize-and-matmul path.

Promises:
- `q4_gemm(x, packed, scales_zeros, bias)` returns float32 [M, N] for float32 x [M, K] (layout in cpu.c).
- `library()` also exposes the decode step's fused small operations (RMSNorm with the residual add, RoPE, attention
  of one new position per row with its KV write), used by `llava.runner`.
- The shared library is built once into `cache_dir()/kernels/<digest>` (source, compiler and flags in the
  digest) under `build_once`, so concurrent processes build it once; `$CC` picks the compiler (default `cc`).
- It links against the OpenMP runtime torch already loaded, so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from llava.buildcache import build_once, cache_dir, digest
from llava.hardware import cpu_info

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")
GROUP = 32
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-Wall"]
_LIB = "libllava_cpu.so"


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled; the message has the compiler's output."""


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


def _build(out: Path, cc: str) -> None:
    cmd = [cc, *_FLAGS, str(SOURCE), "-o", str(out / _LIB), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not cpu_info().avx2:
        logger.info("int4 kernel not used: the CPU lacks AVX2/FMA/F16C (%s)", cpu_info().summary())
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("int4 kernel not built: no C compiler (set $CC); int4 falls back to dequantize + matmul")
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = digest(SOURCE, " ".join(_FLAGS), *version)
    try:
        folder = build_once(cache_dir() / "kernels" / f"cpu-{key}", lambda out: _build(out, cc))
        lib = ctypes.CDLL(str(folder / _LIB))
    except (KernelBuildError, OSError) as e:
        logger.warning("int4 kernel not available (%s); int4 falls back to dequantize + matmul", e)
        return None
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "llava_q4_gemm": ([P] * 6 + [I64, P, I64, P] + [I64] * 3 + [I, I], I),
        "llava_add_rmsnorm": ([P] * 4 + [I64] * 2 + [F], None),
        "llava_rope": ([P] * 3 + [I64] * 4, None),
        "llava_decode_attention": ([P, I64, P, P, I64, P, P, I, I64, I64, P, P] + [I64] * 4 + [F, I], I),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


@functools.cache
def isa() -> int:
    """0: AVX2 paths; 1: AVX512-VNNI for the int4 product (two groups per instruction)."""
    return int({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu_info().flags)


def describe() -> str:
    if not available():
        return "none (dequantize + matmul)"
    return "llava cpu kernels, " + ("AVX512-VNNI" if isa() else "AVX2")


def available() -> bool:
    return _library() is not None


def library() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available on this machine; check llava.kernels.available() first")
    return lib


def q4_gemm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None = None,
            lr_u: torch.Tensor | None = None, lr_v: torch.Tensor | None = None,
            part_ends: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous, packed [N, K/2] uint8, scales_zeros [N, 2, K/32] float16, optional bias [N] and
    low-rank correction (float32, contiguous): lr_u [N, R], lr_v [P R, K] for P stacked parts whose rows end at
    part_ends (int64 [P]; default one part) -> [M, N] float32."""
    lib = library()
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    rank = 0 if lr_u is None else lr_u.shape[1]
    parts = 1 if part_ends is None else part_ends.numel()
    rc = lib.llava_q4_gemm(
        x.data_ptr(), packed.data_ptr(), scales_zeros.data_ptr(), 0 if bias is None else bias.data_ptr(),
        0 if lr_u is None else lr_u.data_ptr(), 0 if lr_v is None else lr_v.data_ptr(), rank,
        0 if part_ends is None else part_ends.data_ptr(), parts, y.data_ptr(), m, n, k, isa(),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError(f"int4 kernel could not allocate scratch for a [{m}, {k}] input")
    return y
