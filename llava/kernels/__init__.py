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
        "llava_q4_gemm": ([P] * 5 + [I64, P, I64, P, P] + [I64] * 3 + [P, I, I], None),
        "llava_q4_scratch_bytes": ([I64] * 3, I64),
        "llava_q4_decode_layer": ([P, P] + [I64] * 6 + [F, P, P, P, P, P, I, I64, I64] + [P] * 7 + [I64, I, I], None),
        "llava_q4_decode_layers": ([P, I64, P] + [I64] * 6 + [F, P, P, P, P, P, I, I64, I64, I64] + [P] * 8
                                   + [I64, I, I], None),
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


class Q4Matrix(ctypes.Structure):
    """What the kernels read of one int4 matrix (cpu.c's q4_matrix); holds its tensors alive."""

    _fields_ = [("w", ctypes.c_void_p), ("sz", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("lu", ctypes.c_void_p),
                ("lv", ctypes.c_void_p), ("part_end", ctypes.c_void_p), ("R", ctypes.c_int64),
                ("P", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64)]

    @classmethod
    def of(cls, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int, bias: torch.Tensor | None = None,
           lr_u: torch.Tensor | None = None, lr_v: torch.Tensor | None = None,
           part_ends: torch.Tensor | None = None) -> Q4Matrix:
        """packed [NB, G, 4, 64] uint8, scales_zeros [NB, G, 2, 16] float16 (cpu.c's layout) for n rows; bias [n],
        low-rank lr_u [NB, R, 16], lr_v [P R, K] float32 for P parts ending at part_ends (int64 [P])."""
        tensors = [packed, scales_zeros, bias, lr_u, lr_v, part_ends]
        for t in tensors:
            if t is not None and not t.is_contiguous():
                raise ValueError("int4 kernel inputs must be contiguous")
        ptr = [0 if t is None else t.data_ptr() for t in tensors]
        m = cls(*ptr, 0 if lr_u is None else lr_u.shape[1], 1 if part_ends is None else part_ends.numel(), n,
                packed.shape[1] * GROUP)
        m._keep = tensors
        return m

    def scratch(self, rows: int) -> torch.Tensor:
        """A scratch buffer for `rows` input rows."""
        nbytes = library().llava_q4_scratch_bytes(rows, self.K, self.P * self.R if self.R else 0)
        return torch.empty(nbytes, dtype=torch.uint8)


class Q4Layer(ctypes.Structure):
    """A decoder layer of int4 matrices and float32 norm weights (cpu.c's q4_layer)."""

    _fields_ = [("qkv", Q4Matrix), ("o", Q4Matrix), ("gate_up", Q4Matrix), ("down", Q4Matrix),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p)]

    @classmethod
    def of(cls, qkv: Q4Matrix, o: Q4Matrix, gate_up: Q4Matrix, down: Q4Matrix, attn_norm: torch.Tensor,
           mlp_norm: torch.Tensor) -> Q4Layer:
        layer = cls(qkv, o, gate_up, down, attn_norm.data_ptr(), mlp_norm.data_ptr())
        layer._keep = [qkv, o, gate_up, down, attn_norm, mlp_norm]
        return layer


def q4_gemm(x: torch.Tensor, matrix: Q4Matrix, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous @ the int4 matrix^T -> [M, N] float32."""
    lib = library()
    m = x.shape[0]
    y = torch.empty((m, matrix.N), dtype=torch.float32)
    ws = matrix.scratch(m) if scratch is None else scratch
    lib.llava_q4_gemm(matrix.w, matrix.sz, matrix.bias, matrix.lu, matrix.lv, matrix.R, matrix.part_end, matrix.P,
                      x.data_ptr(), y.data_ptr(), m, matrix.N, matrix.K, ws.data_ptr(), isa(),
                      torch.get_num_threads())
    return y
