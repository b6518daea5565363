"""The native RTN + pack kernel (``compiler/rtn_pack.c``) against the torch path, bit for bit, and its fallbacks."""

import logging
import os
import time

import pytest
import torch

from mopeq.compiler import native
from mopeq.compiler.pack import pack_int32
from mopeq.compiler.quantize import NonFiniteWeights, quantize, quantize_packed

needs_kernel = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")


def torch_path(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setenv("MOPEQ_NATIVE", "0")
        return quantize_packed(*args)


def assert_same(a, b, what=""):
    for x, y in zip(a, b):
        assert (x is None) == (y is None), what
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), what


def hard_weights(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows at magnitudes from 1e-12 (scales clamp at 1e-10, fp16 scales at 2**-14) to 1e4, one-sided
    rows (zero point at an end), constant and all-zero rows, exact ties, signed zeros."""
    gen = torch.Generator().manual_seed(seed)
    mag = 10.0 ** torch.randint(-12, 5, (n, 1), generator=gen).float()
    w = torch.randn(n, k, generator=gen) * mag
    w[1::7] = w[1::7].abs()
    w[2::7] = -w[2::7].abs()
    w[3::11] = 0.37
    w[4::13] = 0.0
    w[5::17, : min(k, 6)] = torch.tensor([0.5, -0.5, 1.5, 0.0, -0.0, 2.5])[: min(k, 6)]
    return w.to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_native_equals_torch_path(monkeypatch, dtype, bits, symmetric):
    assert native.library() is not None
    for n, k, group in [(64, 256, 128), (37, 300, 128), (5, 7, 128), (19, 1000, 32), (3, 33, 16), (1, 1, 128),
                        (1, 9, 128), (1, 8, 3), (2, 9, 4)]:  # single rows: review finding in pack.py
        w = hard_weights(n, k, dtype, seed=bits * 100 + k)
        for scale_dtype in (torch.bfloat16, torch.float16):
            args = (w, bits, group, symmetric, False, scale_dtype)
            out = quantize_packed(*args)
            assert_same(out, torch_path(monkeypatch, *args), (n, k, group, scale_dtype))
            q = quantize(w, bits, group, symmetric, False, scale_dtype)  # the reference quantizer
            assert torch.equal(out[0], pack_int32(q.codes, bits))


@needs_kernel
def test_native_reads_strided_rows(monkeypatch):
    """A slice of a fused [E, 2I, H] tensor (gate half of gate_up) and a transposed view."""
    fused = hard_weights(96, 256, torch.bfloat16, seed=1).view(3, 32, 256)
    for w in (fused[1, :16], fused[2, :, :128], fused[0].t()):
        args = (w, 4, 128, False, False, torch.bfloat16)
        assert_same(quantize_packed(*args), torch_path(monkeypatch, *args))


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30])
def test_non_finite_groups_are_refused_by_both_paths(monkeypatch, native_calls, bad):
    """NaN/inf weights and fp16 scale overflow (1e30 / 7 > 65504): the kernel declines, the torch path finds the
    non-finite scale, and no artifact gets one."""
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    w[5, 130] = bad
    args = (w, 3, 128, False, False, torch.float16)
    with pytest.raises(NonFiniteWeights, match="NaN or infinite weights, or weights too large for float16 scales"):
        quantize_packed(*args)
    assert native_calls == ["mopeq_rtn_pack"]
    with pytest.raises(NonFiniteWeights):
        torch_path(monkeypatch, *args)


def test_unbuildable_kernel_falls_back(monkeypatch, tmp_path, caplog):
    """A compiler that fails: one warning, the torch path's output."""
    monkeypatch.setenv("CC", str(tmp_path / "cc"))
    (tmp_path / "cc").write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    (tmp_path / "cc").chmod(0o755)
    monkeypatch.setenv("MOPEQ_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        w = hard_weights(16, 128, torch.bfloat16, seed=3)
        with caplog.at_level(logging.WARNING, logger="mopeq.compiler.native"):
            out = quantize_packed(w, 4, 64, True, False, torch.bfloat16)
            quantize_packed(w, 4, 64, True, False, torch.bfloat16)
        assert native.library() is None
        assert [r.getMessage() for r in caplog.records if "build" in r.getMessage()] == [
            "mopeq native RTN kernel: build with %s failed, using the torch path: ['cc: error: no such thing']"
            % (tmp_path / "cc")]
        assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind
    finally:
        native.library.cache_clear()
    assert_same(out, torch_path(monkeypatch, w, 4, 64, True, False, torch.bfloat16))


@needs_kernel
def test_build_is_cached_by_content(monkeypatch, tmp_path):
    monkeypatch.setenv("MOPEQ_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list(tmp_path.glob("rtn_pack-*.so"))
        assert len(built) == 1
        mtime = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        native.library()
        assert [p.stat().st_mtime_ns for p in tmp_path.glob("rtn_pack-*.so")] == [mtime]
    finally:
        native.library.cache_clear()


def float_bits(start: int, stop: int, step: int) -> torch.Tensor:
    return torch.arange(start, stop, step, dtype=torch.int64).to(torch.int32).view(torch.float32)


@needs_kernel
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_scale_rounding_equals_torch(scale_dtype):
    """The kernel's fp32 -> bf16/fp16 rounding against torch's ``.to()``: a stride through every positive finite
    fp32, every exact tie of both formats (normal and fp16 subnormal), and the fp16 overflow boundary."""
    ties = torch.cat([float_bits(0x00008000 + (e << 23), 0x00018001 + (e << 23), 0x10000) for e in range(1, 255)]
                     + [float_bits((e << 23) + 0x1000, (e << 23) + 0x800000, 0x2000) for e in (100, 103, 113, 127, 142)])
    subnormal_ties = torch.arange(1, 2049, 2, dtype=torch.float32) * 2.0**-25  # halfway between fp16 subnormals
    boundary = torch.tensor([65504.0, 65519.99, 65520.0, 65535.0, 2.0**-14, 2.0**-14 * (1 - 2**-12), 2.0**-25,
                             2.0**-26, 1e-10])
    x = torch.cat([float_bits(1, 0x7F800000, 4099), ties, subnormal_ties, boundary])
    x = x[x.isfinite()].contiguous()
    out = torch.empty(x.numel(), dtype=torch.int16)
    native.library().mopeq_round_scales(x.data_ptr(), x.numel(), native.SCALE_DTYPES[scale_dtype], out.data_ptr())
    expected = x.to(scale_dtype).view(torch.int16)
    mismatch = (out != expected).nonzero().flatten()
    assert mismatch.numel() == 0, [(float(x[i]), int(out[i]), int(expected[i])) for i in mismatch[:5]]


@needs_kernel
def test_fp16_widening_equals_torch():
    """Every finite fp16 bit pattern (normals, subnormals, both zeros) widens to torch's fp32, exactly."""
    h = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    h = h[h.view(torch.float16).isfinite()].contiguous()
    out = torch.empty(h.numel(), dtype=torch.float32)
    native.library().mopeq_widen_f16(h.data_ptr(), h.numel(), out.data_ptr())
    assert torch.equal(out.view(torch.int32), h.view(torch.float16).float().view(torch.int32))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``native.library()`` rebuilt for one test, with the temp folder at ``tmp_path / "tmp"``."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


@needs_kernel
def test_unusable_cache_folder_builds_in_a_private_temp_folder(monkeypatch, fresh_library):
    """A cache path that cannot be a folder (here: under a file; a read-only home fails the same way)."""
    (fresh_library / "file").write_text("")
    monkeypatch.setenv("MOPEQ_CACHE", str(fresh_library / "file" / "mopeq"))
    assert native.library() is not None
    assert not list((fresh_library / "tmp").iterdir())  # deleted once loaded


@needs_kernel
def test_library_in_a_folder_others_can_write_is_never_loaded(monkeypatch, fresh_library):
    """Review finding: a predictable shared folder let another user plant the library mopeq would load."""
    shared = fresh_library / "shared"
    monkeypatch.setenv("MOPEQ_CACHE", str(shared))
    assert native.library() is not None  # private folder: builds and publishes there
    (built,) = shared.glob("rtn_pack-*.so")
    assert built.stat().st_mode & 0o777 == 0o755  # loadable by other users of a shared cache
    native.library.cache_clear()
    built.unlink()  # a new file: rewriting the loaded one in place would pull pages from under this process
    built.write_bytes(b"planted: not a library")  # would fail to load (OSError) if it were opened
    shared.chmod(0o777)
    assert native.library() is not None
    assert built.read_bytes() == b"planted: not a library"


@needs_kernel
def test_no_home_directory(monkeypatch, fresh_library):
    """A container running under a uid without a passwd entry and no $HOME: still builds (in a temp folder)."""
    for name in ("HOME", "XDG_CACHE_HOME", "MOPEQ_CACHE"):
        monkeypatch.delenv(name, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native.Path, "home", staticmethod(no_home))
    assert native.cache_dir() is None
    assert native.library() is not None


def test_zen2_builds_without_pext():
    zen2 = "vendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\nflags\t\t: bmi2"
    zen4 = zen2.replace(": 23", ": 25")
    assert native.build_flags(zen2)[-1] == "-mno-bmi2"
    assert native.build_flags(zen4) == native.FLAGS
    assert native.build_flags(zen2.replace("AuthenticAMD", "GenuineIntel")) == native.FLAGS


@needs_kernel
def test_negated_view(monkeypatch):
    """A lazily negated view (review finding: its memory holds the un-negated values)."""
    x = hard_weights(16, 256, torch.bfloat16, seed=5)
    args = (4, 128, False, False, torch.bfloat16)
    assert_same(quantize_packed(torch._neg_view(x), *args), torch_path(monkeypatch, -x, *args))


@needs_kernel
def test_portable_packing_without_pext(monkeypatch, fresh_library):
    """The shift-or packing that CPUs without BMI2 (and Zen 1/2) run, against the torch path."""
    monkeypatch.setattr(native, "FLAGS", native.FLAGS + ["-mno-bmi2"])
    monkeypatch.setenv("MOPEQ_CACHE", str(fresh_library / "cache"))
    assert native.library() is not None
    for bits in (2, 3, 4, 8):
        for n, k, group in [(37, 300, 128), (3, 33, 16), (1, 9, 128)]:
            w = hard_weights(n, k, torch.bfloat16, seed=bits + k)
            args = (w, bits, group, bits % 2 == 0, False, torch.bfloat16)
            assert_same(quantize_packed(*args), torch_path(monkeypatch, *args), (bits, n, k))


@needs_kernel
def test_partial_builds_of_killed_processes_are_removed(monkeypatch, fresh_library):
    cache = fresh_library / "cache"
    cache.mkdir(mode=0o700)
    old, recent = cache / "tmpold.so.tmp", cache / "tmpnew.so.tmp"
    old.write_bytes(b"half")
    recent.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    monkeypatch.setenv("MOPEQ_CACHE", str(cache))
    assert native.library() is not None
    assert not old.exists() and recent.exists()  # a build still running elsewhere is left alone
