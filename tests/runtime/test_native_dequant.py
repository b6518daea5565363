"""The native CPU dequantization (``runtime/dequant.c``) against ``dequantize_packed``'s torch code, bit for bit."""

import pytest
import torch

from mopeq.compiler import native
from mopeq.compiler.pack import pack_int32
from mopeq.runtime.qlayer import dequantize_many, dequantize_packed, PackedMatrix

needs_kernel = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")


def torch_path(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setenv("MOPEQ_NATIVE", "0")
        return dequantize_packed(*args)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def packed_case(lead: tuple, n: int, k: int, bits: int, group: int, scale_dtype, symmetric: bool, seed: int,
                max_exponent: int = 17):
    gen = torch.Generator().manual_seed(seed)
    g = -(-k // group)
    codes = torch.randint(0, 2**bits, (*lead, n, k), generator=gen, dtype=torch.uint8)
    exponents = torch.randint(-30, max_exponent, (*lead, n, g), generator=gen).float()  # fp16 subnormals .. overflow
    scale = ((1 + torch.rand(*lead, n, g, generator=gen)) * 2.0**exponents).to(scale_dtype)
    zero = None if symmetric else torch.randint(0, 2**bits, (*lead, n, g), generator=gen, dtype=torch.uint8)
    return pack_int32(codes, bits), scale, zero


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_dequantize_equals_torch(monkeypatch, bits, scale_dtype, dtype):
    for lead, n, k, group in [((), 37, 300, 128), ((), 1, 9, 128), ((3,), 5, 64, 32), ((2,), 3, 33, 16), ((), 2, 1, 1)]:
        for symmetric in (True, False):
            # scales within fp16's range when fp16 is the output (else the kernel declines, tested below)
            packed, scale, zero = packed_case(lead, n, k, bits, group, scale_dtype, symmetric, seed=bits * k + n,
                                              max_exponent=14 if dtype == torch.float16 else 17)
            args = (packed, scale, zero, bits, min(group, k), k, dtype)
            ours = dequantize_packed(*args)
            assert same_bits(ours, torch_path(monkeypatch, *args)), (lead, n, k, group, symmetric)


@needs_kernel
def test_native_path_runs(monkeypatch, native_calls):
    """The comparison above is only worth something if the kernel, not the fallback, produced ``ours``."""
    packed, scale, zero = packed_case((), 4, 256, 4, 128, torch.bfloat16, False, seed=0)
    dequantize_packed(packed, scale, zero, 4, 128, 256, torch.bfloat16)
    assert native_calls == ["mopeq_dequantize"]


@needs_kernel
def test_scale_beyond_the_output_dtype_falls_back(monkeypatch):
    """A bf16 scale above fp16's range: the kernel declines; the torch path's infinities come out."""
    packed, scale, zero = packed_case((), 4, 64, 4, 32, torch.bfloat16, True, seed=1)
    scale[2, 1] = 1e6
    args = (packed, scale, zero, 4, 32, 64, torch.float16)
    out = dequantize_packed(*args)
    assert same_bits(out, torch_path(monkeypatch, *args)) and not torch.isfinite(out).all()


def test_dequantize_many_matches_one_by_one(monkeypatch):
    mats = []
    for i, (bits, n, k) in enumerate([(2, 8, 64), (3, 8, 64), (2, 8, 64), (4, 5, 40), (8, 8, 64)]):
        packed, scale, zero = packed_case((), n, k, bits, 32, torch.bfloat16, i % 2 == 0, seed=i)
        mats.append(PackedMatrix(packed, scale, zero, bits, 32, (n, k)))
    for setting in ("1", "0"):
        monkeypatch.setenv("MOPEQ_NATIVE", setting)
        for m, dense in zip(mats, dequantize_many(mats, torch.bfloat16)):
            assert same_bits(dense, torch_path(monkeypatch, m.packed, m.scale, m.zero, m.bits, 32, m.shape[1],
                                               torch.bfloat16))


@needs_kernel
def test_direct_calls_with_bad_arguments_behave_as_the_torch_code(monkeypatch):
    """Review findings: arguments the loader never lets through (unsupported widths, shapes that disagree,
    another zero-point dtype, gradients, negated views) must not reach the kernel; the torch code decides."""
    packed, scale, zero = packed_case((), 4, 64, 4, 32, torch.bfloat16, False, seed=2)
    for bits in (1, 5, 16):
        with pytest.raises(ValueError):
            dequantize_packed(torch.zeros(4, 16, dtype=torch.int32), scale, zero, bits, 32, 64, torch.float32)
    for args in [(packed, scale[:, :1], zero[:, :1], 4, 32, 64, torch.float32),  # one group of scales short
                 (packed, scale, zero.to(torch.int32), 4, 32, 64, torch.float32),
                 (packed, torch._neg_view(scale.clone()), zero, 4, 32, 64, torch.float32),
                 (packed, scale, zero, 4, 2**64 + 1, 64, torch.float32)]:
        try:
            expected = torch_path(monkeypatch, *args)
        except (RuntimeError, ValueError, TypeError) as e:
            with pytest.raises(type(e)):
                dequantize_packed(*args)
        else:
            assert same_bits(dequantize_packed(*args), expected)
    wanted = scale.float().requires_grad_()
    out = dequantize_packed(packed, wanted, zero, 4, 32, 64, torch.float32)
    out.sum().backward()
    assert wanted.grad is not None and wanted.grad.abs().sum() > 0
