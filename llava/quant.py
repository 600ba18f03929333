"""Weight-only quantization of the LLM's linear layers for CPU inference: `int8` and `int4`.

- int4: 4-bit codes in groups of 32 along the input features, an fp16 scale and zero per group
  (w = code * scale + zero; 5 bits per weight in all, the same budget as llama.cpp's Q4_1). Few-row products
  (decode) run in `llava.kernels.q4_gemm`; many-row products (prefill) multiply by the dequantized weight.
- int8: per-output-channel symmetric codes; few-row products use PyTorch's packed `_weight_int8pack_mm`.
The vision encoder and the projector stay in the compute dtype (as with bitsandbytes on CUDA).

`quantize_llm(model, "int4")` swaps `nn.Linear` modules of the LLM (and the LM head, untied from the input
embeddings) for `Int4Linear` / `Int8Linear`, which still work inside transformers' own forward and `generate`.
Each keeps a dense copy of its dequantized weight for prefill when the copies fit `dense_budget_bytes` (the default
model: yes); otherwise prefill dequantizes one layer at a time.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llava import kernels

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4")
GROUP = kernels.GROUP
# Products with at most this many rows use the few-row kernels when the module is called through nn.Module
# (transformers' forward); the engine's runner calls `small` / `large` explicitly.
SMALL_ROWS = 16


class QuantizationError(ValueError):
    """The requested quantization cannot be applied to this model or device."""


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


class QuantLinear(nn.Module):
    """Common part of the quantized linears: bias, dense copy, the few-row / many-row split."""

    in_features: int
    out_features: int
    ROWS_PER_ENTRY: dict[str, int] = {}  # buffers indexed by output rows: how many rows one dim-0 entry covers

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        self.dense: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def keep_dense(self) -> None:
        """Keep the dequantized weight in the compute dtype for many-row products."""
        self.dense = self.dequantize(self.compute_dtype)

    def small(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (few rows) -> [M, N] float32."""
        raise NotImplementedError

    def large(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (many rows) -> [M, N] in x's dtype, through the dequantized weight."""
        w = self.dense if self.dense is not None else self.dequantize(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return F.linear(x.to(w.dtype), w, bias).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= SMALL_ROWS and x.device.type == "cpu":
            out = self.small(rows).to(x.dtype)
        else:
            out = self.large(rows)
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        total = sum(b.numel() * b.element_size() for b in self.buffers())
        return total + (0 if self.dense is None else self.dense.numel() * self.dense.element_size())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dense_copy={self.dense is not None}"


ROW_BLOCK = 16  # rows per block of the repacked int4 layout (llava/kernels/cpu.c)


def _int4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [N, K] uint8 (0..15), scales and zeros [N, K/32] fp16 of w [N, K] (min/max per group of 32)."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).half()
    zero = lo.half()
    # codes from the fp16-rounded scale and zero, so dequantization reproduces exactly what was chosen
    codes = ((g - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return codes.reshape(n, k), scale, zero


def _dequant_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    g = codes.float().reshape(n, k // GROUP, GROUP)
    return (g * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def _blocks(n: int) -> int:
    return -(-n // ROW_BLOCK)


def _repack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout: packed [NB, G, 4, 64] uint8 and scales_zeros [NB, G, 2, 16] fp16 (zero rows pad N)."""
    n, k = codes.shape
    nb, g = _blocks(n), k // GROUP
    pad = nb * ROW_BLOCK - n
    if pad:
        codes = F.pad(codes, (0, 0, 0, pad))
        scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
    c = codes.reshape(nb, ROW_BLOCK, g, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # [b, g, quad, row, i, lo/hi]
    packed = (c[..., 0] | (c[..., 1] << 4)).reshape(nb, g, 4, 64).contiguous()
    sz = torch.stack([scale, zero], 1).reshape(nb, ROW_BLOCK, 2, g).permute(0, 3, 2, 1).contiguous()
    return packed, sz


def _unpack(packed: torch.Tensor, sz: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `_repack`: codes [n, K], scales and zeros [n, K/32]."""
    nb, g = packed.shape[:2]
    p = packed.reshape(nb, g, 4, ROW_BLOCK, 4)
    c = torch.stack([p & 15, p >> 4], -1)  # [b, g, quad, row, i, lo/hi]
    codes = c.permute(0, 3, 1, 2, 5, 4).reshape(nb * ROW_BLOCK, g * GROUP)[:n]
    s = sz.permute(0, 3, 2, 1).reshape(nb * ROW_BLOCK, 2, g)[:n]
    return codes, s[:, 0], s[:, 1]


def _low_rank(r: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """u [N, rank], v [rank, K] with u @ v the best rank-`rank` approximation of r."""
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def _block_rows(u: torch.Tensor) -> torch.Tensor:
    """u [N, R] -> [NB, R, 16]: the low-rank output side transposed per row block (zero rows pad N)."""
    n, r = u.shape
    nb = _blocks(n)
    return F.pad(u, (0, 0, 0, nb * ROW_BLOCK - n)).reshape(nb, ROW_BLOCK, r).transpose(1, 2).contiguous()


class Int4Linear(QuantLinear):
    """4-bit codes, groups of 32 along K, an fp16 scale and zero per group, rows repacked in blocks of 16
    (layout: llava/kernels/cpu.c), plus an optional low-rank float correction u @ v of what 4 bits cannot hold.

    Why the correction: a fine-tuned model's weights are often a base plus a small low-rank update (LoRA merged).
    Rounding to 4 bits is noise of about a quarter of a group's range and erases such an update: the default model
    answered 26 % of easy-VQA questions right in plain int4 (99.8 % in float32). Splitting W = L + Q, with L the
    best rank-r approximation of what Q misses (two alternations), keeps the update at r * (N + K) extra floats."""

    # entries of dim 0 of each row-indexed buffer cover this many rows (fusing stacks them, llava.runner)
    ROWS_PER_ENTRY = {"packed": ROW_BLOCK, "scales_zeros": ROW_BLOCK, "lr_u": ROW_BLOCK}

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype, lr_u: torch.Tensor | None = None,
                 lr_v: torch.Tensor | None = None, part_ends: torch.Tensor | None = None):
        super().__init__(packed.shape[1] * GROUP, out_features, bias, compute_dtype)
        self.register_buffer("packed", packed, persistent=False)  # [NB, G, 4, 64] uint8
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)  # [NB, G, 2, 16] float16
        self.register_buffer("lr_u", lr_u, persistent=False)  # [NB, r, 16] float32 or None
        self.register_buffer("lr_v", lr_v, persistent=False)  # [P r, K] float32 or None (P stacked parts)
        # row ends of the P parts when several linears were fused (llava.runner); None = one part
        self.part_ends = part_ends

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                    rank: int = 0, alternations: int = 2) -> Int4Linear:
        n, k = weight.shape
        if k % GROUP:
            raise QuantizationError(f"int4 needs in_features divisible by {GROUP}, got {k}")
        w = weight.detach().float()
        rank = min(rank, n, k)
        low = None
        for _ in range(alternations if rank else 0):
            target = w if low is None else w - low[0] @ low[1]
            residual = w - _dequant_codes(*_int4_quantize(target))
            low = _low_rank(residual, rank)
            # noise spreads evenly over the min(N, K) directions; a LoRA update concentrates in a few
            if low[0].norm() ** 2 < max(LOW_RANK_MIN_ENERGY, 3 * rank / min(n, k)) * residual.norm() ** 2:
                low = None  # noise-like residual (e.g. an untuned embedding used as LM head): nothing to keep
                break
        codes, scale, zero = _int4_quantize(w if low is None else w - low[0] @ low[1])
        packed, sz = _repack(codes, scale, zero)
        if low is None:
            return cls(packed, sz, n, bias, compute_dtype)
        return cls(packed, sz, n, bias, compute_dtype, _block_rows(low[0]), low[1])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = _dequant_codes(*_unpack(self.packed, self.scales_zeros, self.out_features))
        if self.lr_u is not None:
            nb, r, _ = self.lr_u.shape
            u = self.lr_u.transpose(1, 2).reshape(nb * ROW_BLOCK, r)[: self.out_features]
            ends = [self.out_features] if self.part_ends is None else self.part_ends.tolist()
            start = 0
            for p, end in enumerate(ends):
                w[start:end] += u[start:end] @ self.lr_v[p * r : (p + 1) * r]
                start = end
        return w.to(dtype or self.compute_dtype)

    def matrix(self) -> kernels.Q4Matrix:
        """The kernels' view of this matrix (rebuilt when the buffers were re-pointed, see llava.runner)."""
        key = (self.packed.data_ptr(), self.scales_zeros.data_ptr())
        if getattr(self, "_matrix_key", None) != key:
            self._matrix = kernels.Q4Matrix.of(self.packed, self.scales_zeros, self.out_features, self.bias,
                                               self.lr_u, self.lr_v, self.part_ends)
            self._matrix_key, self._scratch = key, {}
        return self._matrix

    def small(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.available() and x.device.type == "cpu":
            matrix = self.matrix()
            rows = x.shape[0]
            if rows not in self._scratch:
                self._scratch[rows] = matrix.scratch(rows)
            x = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
            return kernels.q4_gemm(x, matrix, self._scratch[rows])
        return self.large(x).float()


class Int8Linear(QuantLinear):
    """Per-output-channel symmetric int8 codes; few-row products through PyTorch's `_weight_int8pack_mm` (bf16)."""

    ROWS_PER_ENTRY = {"codes_": 1, "scales": 1}

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.register_buffer("codes_", codes, persistent=False)  # [N, K] int8
        self.register_buffer("scales", scales, persistent=False)  # [N] float32
        self._scales_bf16 = scales.to(torch.bfloat16)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> Int8Linear:
        w = weight.detach().float()
        scales = (w.abs().amax(1) / 127).clamp(min=1e-8)
        codes = _round_half_away(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        return cls(codes, scales, bias, compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.codes_.float() * self.scales[:, None]).to(dtype or self.compute_dtype)

    def small(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.large(x).float()
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.codes_, self._scales_bf16)
        y = y.float()
        return y if self.bias is None else y + self.bias


_CLASSES = {"int4": Int4Linear, "int8": Int8Linear}


# Rank of int4's low-rank correction (see Int4Linear). The default model (LoRA rank 8) answered 300 easy-VQA
# questions as float32 does with rank 4, 8 or 16 and 26 % of them with none; 8 keeps a margin for ~10 % more bytes.
INT4_RANK = 8
# The correction is kept only when it holds this share of the residual's energy (a LoRA update: 60-75 % at rank 8;
# rounding noise: ~ rank / min(N, K), 3 % for the default model's LM head).
LOW_RANK_MIN_ENERGY = 0.3


def quantize_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype, rank: int | None = None) -> QuantLinear:
    if kind == "int4":
        return Int4Linear.from_weight(linear.weight, linear.bias, compute_dtype, INT4_RANK if rank is None else rank)
    return _CLASSES[kind].from_weight(linear.weight, linear.bias, compute_dtype)


def _targets(model) -> list[tuple[nn.Module, str, nn.Linear]]:
    llm = model.model.language_model
    found = [(parent, name, child) for parent in llm.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        found.append((model, "lm_head", head))
    return found


# bump when the stored quantized state changes meaning
QUANT_CACHE_FORMAT = "1"
_STATE_KEYS = {"int4": ("packed", "scales_zeros", "lr_u", "lr_v"), "int8": ("codes_", "scales")}


def _qualified_targets(model) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    names = {id(m): n for n, m in model.named_modules()}
    return [(f"{names[id(parent)]}.{name}".lstrip("."), parent, name, linear) for parent, name, linear in _targets(model)]


def _build_state(targets, kind: str, compute_dtype: torch.dtype, rank: int | None) -> dict[str, torch.Tensor]:
    state = {}
    for qname, _, _, linear in targets:
        try:
            q = quantize_linear(linear, kind, compute_dtype, rank)
        except QuantizationError:
            continue  # stays dense; quantize_llm lists why
        for key in _STATE_KEYS[kind]:
            if getattr(q, key) is not None:
                state[f"{qname}/{key}"] = getattr(q, key).contiguous()
    return state


def _from_state(kind: str, state: dict[str, torch.Tensor], qname: str, linear: nn.Linear,
                compute_dtype: torch.dtype) -> QuantLinear | None:
    t = {key: state.get(f"{qname}/{key}") for key in _STATE_KEYS[kind]}
    if kind == "int4" and t["packed"] is not None:
        return Int4Linear(t["packed"], t["scales_zeros"], linear.out_features, linear.bias, compute_dtype,
                          t["lr_u"], t["lr_v"])
    if kind == "int8" and t["codes_"] is not None:
        return Int8Linear(t["codes_"], t["scales"], linear.bias, compute_dtype)
    return None


def quantize_llm(model, kind: str, *, compute_dtype: torch.dtype = torch.float32,
                 dense_budget_bytes: int | None = None, rank: int | None = None, cache_key: str | None = None) -> dict:
    """Replace the LLM's linear layers by `kind` ("int8" / "int4") in place. Returns a report with byte counts.

    Layers whose shape the format cannot hold (int4: in_features not a multiple of 32) stay dense (listed).
    dense_budget_bytes: total size allowed for the dequantized copies kept for prefill (default: 1/8 of RAM).
    cache_key: names these weights (`llava.loading` derives it from the checkpoint's files, the weights' dtype,
    kind and rank): the quantized state is computed once into the cache and read back on later loads (int4's
    low-rank correction costs one SVD per matrix and alternation: minutes for the default model on 2 cores).
    """
    if kind not in _CLASSES:
        raise QuantizationError(f"unknown quantization {kind!r}; valid on CPU: {', '.join(QUANTIZATIONS)}")
    if model.get_input_embeddings().weight.device.type != "cpu":
        raise QuantizationError(f"{kind} is a CPU format; on CUDA use bitsandbytes (--load-8bit / --load-4bit)")
    before = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    head = model.get_output_embeddings()
    before += 0 if head.weight is model.get_input_embeddings().weight else head.weight.numel() * head.weight.element_size()
    skipped, made = [], []
    targets = _qualified_targets(model)
    state = None
    if cache_key is not None:
        from safetensors.torch import load_file, save_file

        from llava.buildcache import build_once, cache_dir

        folder = build_once(cache_dir() / "quantized" / f"{kind}-{cache_key}", lambda tmp: save_file(
            _build_state(targets, kind, compute_dtype, rank), str(tmp / "state.safetensors"),
            metadata={"format": QUANT_CACHE_FORMAT, "kind": kind}))
        state = load_file(str(folder / "state.safetensors"))
    for qname, parent, name, linear in targets:
        q = None if state is None else _from_state(kind, state, qname, linear, compute_dtype)
        if q is None:
            try:
                q = quantize_linear(linear, kind, compute_dtype, rank)
            except QuantizationError as e:
                skipped.append(f"{name}: {e}")
                continue
        setattr(parent, name, q)
        made.append(q)
    dense_bytes = sum(q.out_features * q.in_features * torch.finfo(compute_dtype).bits // 8 for q in made)
    budget = _default_dense_budget() if dense_budget_bytes is None else dense_budget_bytes
    keep = dense_bytes <= budget
    if keep:
        for q in made:
            q.keep_dense()
    packed = sum(q.nbytes for q in made) - (dense_bytes if keep else 0)
    report = {
        "quantization": kind, "layers": len(made), "skipped": skipped,
        "dense_llm_bytes": before, "quantized_bytes": packed,
        "prefill_copy_bytes": dense_bytes if keep else 0,
        "kernel": "llava q4 (AVX2)" if kind == "int4" and kernels.available() else
                  "aten _weight_int8pack_mm" if kind == "int8" else "dequantize + matmul (no kernel)",
    }
    logger.info("quantized %d LLM linear layers to %s: %.0f MB -> %.0f MB (+%.0f MB dense copy for prefill)%s",
                len(made), kind, before / 2**20, packed / 2**20, report["prefill_copy_bytes"] / 2**20,
                f"; kept dense: {skipped}" if skipped else "")
    return report


def _default_dense_budget() -> int:
    try:
        total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        total = 8 * 2**30
    return total // 8
