"""CPU weight-only quantization (llava.quant) and the int4 kernels (llava.kernels): layouts, error bounds, the
kernels against a dequantize-and-matmul reference on both instruction sets, fusing, and quantize_llm on a model."""

from __future__ import annotations

import pytest
import torch

from llava import kernels
from llava.quant import (
    GROUP, Int4Linear, Int8Linear, QuantizationError, _dequant_codes, _int4_quantize, _repack, _unpack, quantize_llm,
)
from llava.runner import _fuse


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def on_grid(n: int, k: int) -> torch.Tensor:
    """A weight exactly representable in int4 (like a model shipped as Q4_1)."""
    return _dequant_codes(*_int4_quantize(torch.randn(n, k) * 0.02))


def isas() -> list[int]:
    if not kernels.available():
        return []
    return [0, 1] if kernels.isa() == 1 else [0]


@pytest.fixture
def force_isa(monkeypatch):
    def force(value: int):
        monkeypatch.setattr(kernels, "isa", lambda: value)
    return force


def reference(q, x):
    return torch.nn.functional.linear(x, q.dequantize(torch.float32), q.bias)


def test_int4_round_trip_error_is_within_half_a_step():
    w = torch.randn(40, 96)
    codes, scale, zero = _int4_quantize(w)
    assert codes.max() <= 15 and codes.dtype == torch.uint8
    err = (_dequant_codes(codes, scale, zero) - w).abs().reshape(40, 3, GROUP)
    step = scale.float()[..., None]
    assert (err <= step / 2 + 1e-3 * step + 1e-6).all()


def test_repack_and_unpack_are_inverse_for_padded_rows():
    codes = torch.randint(0, 16, (37, 64), dtype=torch.uint8)
    scale, zero = torch.rand(37, 2).half(), torch.rand(37, 2).half()
    packed, sz = _repack(codes, scale, zero)
    assert packed.shape == (3, 2, 4, 64) and sz.shape == (3, 2, 2, 16)  # 37 rows -> 3 blocks of 16
    c2, s2, z2 = _unpack(packed, sz, 37)
    assert torch.equal(c2, codes) and torch.equal(s2, scale) and torch.equal(z2, zero)


@pytest.mark.parametrize("n,k,rows", [(64, 64, 1), (49, 96, 3), (16, 608, 5), (128, 64, 17)])
def test_int4_kernel_matches_the_dequantized_product(force_isa, n, k, rows):
    if not kernels.available():
        pytest.skip("CPU kernels not built here (no compiler or no AVX2)")
    q = Int4Linear.from_weight(torch.randn(n, k) * 0.02, torch.randn(n), torch.float32)
    x = torch.randn(rows, k)
    ref = reference(q, x)
    for isa in isas():
        force_isa(isa)
        out = q.small(x)
        # activations are quantized to int8 per 32: ~0.4 % of each group's largest value
        assert out.shape == (rows, n)
        assert (out - ref).abs().max() <= 0.02 * ref.abs().max(), isa


def test_both_instruction_sets_agree(force_isa):
    if isas() != [0, 1]:
        pytest.skip("needs a CPU with AVX512-VNNI to compare against the AVX2 path")
    q = Int4Linear.from_weight(torch.randn(80, 160) * 0.02, None, torch.float32)
    x = torch.randn(3, 160)
    force_isa(0)
    a = q.small(x)
    force_isa(1)
    b = q.small(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same integer products, same float epilogue


def test_rows_are_independent_of_each_other():
    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    q = Int4Linear.from_weight(torch.randn(64, 128) * 0.02, None, torch.float32)
    x = torch.randn(6, 128)
    together = q.small(x)
    alone = torch.cat([q.small(x[i : i + 1]) for i in range(6)])
    assert torch.equal(together, alone)  # a request's tokens never depend on its batch


def test_low_rank_correction_keeps_a_merged_lora_update():
    base = on_grid(64, 128)
    update = torch.randn(64, 4) @ torch.randn(4, 128) * 3e-4  # a LoRA-like update, below the 4-bit step
    w = base + update
    plain = Int4Linear.from_weight(w, None, torch.float32, rank=0)
    corrected = Int4Linear.from_weight(w, None, torch.float32, rank=8)
    assert corrected.lr_u is not None and corrected.lr_u.shape == (4, 8, 16)
    err_plain = (plain.dequantize(torch.float32) - w).norm()
    err_corrected = (corrected.dequantize(torch.float32) - w).norm()
    assert err_corrected < 0.35 * err_plain
    x = torch.randn(2, 128)
    if kernels.available():
        ref = torch.nn.functional.linear(x, w)
        assert (corrected.small(x) - ref).abs().max() <= 0.02 * ref.abs().max()


def test_noise_like_residual_keeps_no_correction():
    q = Int4Linear.from_weight(torch.randn(256, 512), None, torch.float32, rank=8)
    assert q.lr_u is None  # rounding noise has no low-rank structure worth its bytes


def test_int8_matches_its_dequantized_weight():
    lin = torch.nn.Linear(96, 40)
    q = Int8Linear.from_weight(lin.weight, lin.bias, torch.float32)
    x = torch.randn(3, 96)
    ref = reference(q, x)
    assert (q.small(x) - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 activations
    torch.testing.assert_close(q.large(x), ref)
    assert (q.dequantize(torch.float32) - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-6


@pytest.mark.parametrize("kind", ["dense", "int4", "int8"])
def test_fused_linears_equal_their_parts_and_parts_keep_working(kind):
    lins = [torch.nn.Linear(64, n) for n in (64, 32, 32)]
    for lin in lins:
        lin.weight.data = on_grid(lin.out_features, 64) + torch.randn(lin.out_features, 2) @ torch.randn(2, 64) * 3e-4
    if kind == "dense":
        mods = lins
    elif kind == "int4":
        mods = [Int4Linear.from_weight(m.weight, m.bias, torch.float32, rank=4) for m in lins]
    else:
        mods = [Int8Linear.from_weight(m.weight, m.bias, torch.float32) for m in lins]
    x = torch.randn(3, 64)
    quantized = kind != "dense"
    large = [m.large(x) if quantized else m(x) for m in mods]
    small = [m.small(x) for m in mods] if quantized else large
    fused = _fuse(mods)
    torch.testing.assert_close(fused.large(x), torch.cat(large, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.small(x), torch.cat(small, -1), rtol=1e-5, atol=1e-5)
    for m, a, b in zip(mods, large, small):  # the modules now read views of the fused storage
        torch.testing.assert_close(m.large(x) if quantized else m(x), a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.small(x) if quantized else m(x), b, rtol=1e-5, atol=1e-5)


def test_quantize_llm_replaces_llm_linears_only_and_reports_bytes(tmp_path):
    from llava.loading import load_model
    from llava.testing import make_tiny_llava

    lm = load_model(str(make_tiny_llava(tmp_path)), dtype="float32")
    x = torch.randint(5, 50, (1, 6))
    before = lm.model(input_ids=x).logits
    report = quantize_llm(lm.model, "int4")
    assert report["layers"] == 2 * 7 + 1 and not report["skipped"]
    assert report["quantized_bytes"] < report["dense_llm_bytes"] / 3
    layer = lm.model.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, Int4Linear) and isinstance(lm.model.lm_head, Int4Linear)
    assert isinstance(lm.model.model.multi_modal_projector.linear_1, torch.nn.Linear)
    after = lm.model(input_ids=x).logits  # transformers' own forward still runs
    assert torch.isfinite(after).all() and (after - before).abs().max() < 0.2 * before.abs().max()


def test_quantization_errors_name_the_cause(tmp_path):
    from llava.loading import LoadError, load_model
    from llava.testing import make_tiny_llava

    path = str(make_tiny_llava(tmp_path))
    with pytest.raises(LoadError, match="valid: auto, none, int8, int4, 8bit, 4bit"):
        load_model(path, quantization="int3")
    with pytest.raises(QuantizationError, match="divisible by 32"):
        Int4Linear.from_weight(torch.randn(8, 48), None, torch.float32)
    lm = load_model(path, dtype="float32", quantization="auto")
    assert lm.quantization is None and "no CPU quantization" in lm.precision_reason
