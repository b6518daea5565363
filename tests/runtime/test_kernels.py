"""Triton kernels against torch references: under TRITON_INTERPRET=1 on CPU (set by conftest.py),
and compiled ahead of time for sm_80 / sm_90 in a subprocess without the interpreter.

Run as a script (``python tests/runtime/test_kernels.py CC``) it compiles every kernel for
``GPUTarget("cuda", CC, 32)`` and prints one line per kernel; the AOT test does exactly that.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from mopeq.compiler.pack import pack_int32
from mopeq.compiler.quantize import quantize
from mopeq.runtime import kernel_dequant_matmul as dm
from mopeq.runtime import kernel_moe as moe
from mopeq.runtime.qlayer import PackedMatrix, QuantizedExperts, moe_forward_torch

# ||out - ref|| / ||ref|| against float64 dequant + matmul of the same codes.
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
DTYPES = list(REL_TOL)


def packed_matrix(n, k, bits, group_size, symmetric, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    q = quantize(w, bits, group_size, symmetric=symmetric)
    return PackedMatrix(pack_int32(q.codes, bits), q.scale, q.zero, bits, q.group_size, (n, k))


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# --- layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (48, False), (1000, True)])
def test_repack_reads_back_exactly(bits, group_size, symmetric):
    m = packed_matrix(37, 145, bits, group_size, symmetric)
    weights = dm.repack([m])
    assert torch.equal(dm.dequantize_torch(weights).double(), m.dequantize(torch.float64))


def test_repack_mixed_entries_share_one_buffer():
    mats = [packed_matrix(19, 70, b, g, s, seed=b) for b, g, s in [(2, 64, True), (3, 32, False), (8, 128, True)]]
    weights = dm.repack(mats)
    assert weights.group == 32 and weights.has_zero and weights.meta.shape == (3, 4)
    for e, m in enumerate(mats):
        assert torch.equal(dm.dequantize_torch(weights, e).double(), m.dequantize(torch.float64))


# --- dequant GEMV / GEMM ----------------------------------------------------------------------
# (bits, group size, symmetric): covers one scale per tile (64, 1000 -> per-row), several per tile
# (32 at BLOCK_K=64), and a group that is no power of two (48 -> kernel groups of 16).
WEIGHT_CASES = [(2, 64, True), (3, 48, False), (4, 32, False), (8, 1000, True)]
# GEMV: M=3 rows in a BLOCK_M=4 CUDA-core reduction; GEMM: M=20 on tl.dot with BLOCK_M=16.
MATMUL_MODES = {"gemv": (3, dm.Blocks(4, 16, 64)), "gemm": (20, dm.Blocks(16, 32, 64))}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MATMUL_MODES))
@pytest.mark.parametrize("bits,group_size,symmetric", WEIGHT_CASES)
def test_dequant_matmul(bits, group_size, symmetric, mode, dtype):
    m = packed_matrix(45, 145, bits, group_size, symmetric, seed=bits)
    weights = dm.repack([m])
    rows, blocks = MATMUL_MODES[mode]
    x = torch.randn(rows, 145, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = dm.dequant_matmul(x, weights, blocks=blocks)
    assert out.dtype == dtype and out.shape == (rows, 45)
    exact = x.double() @ m.dequantize(torch.float64).t()
    assert rel_error(out, exact) < REL_TOL[dtype]
    assert rel_error(out, dm.dequant_matmul_torch(x, weights)) < REL_TOL[dtype]


def test_dequant_matmul_default_blocks_single_row():
    m = packed_matrix(33, 300, 4, 128, False)
    x = torch.randn(2, 1, 300, dtype=torch.float16)
    out = dm.dequant_matmul(x, dm.repack([m]))
    assert out.shape == (2, 1, 33)
    assert rel_error(out, x.double() @ m.dequantize(torch.float64).t()) < REL_TOL[torch.float16]


# --- grouped MoE ------------------------------------------------------------------------------
HIDDEN, INTER, TOP_K = 96, 80, 3
EXPERT_BITS = [2, 3, 4, 8, 3, 2, 4]  # experts 5 and 6 are never routed to


def mixed_experts(symmetric):
    """Seven experts of 2/3/4/8 bits; symmetric: True, False, or "mixed" (alternating)."""
    experts = []
    for j, bits in enumerate(EXPERT_BITS):
        sym = (j % 2 == 0) if symmetric == "mixed" else symmetric
        shapes = {"gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
        experts.append({name: packed_matrix(*shape, bits, 32, sym, seed=10 * j + i)
                        for i, (name, shape) in enumerate(shapes.items())})
    return experts


def routing(tokens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    index = torch.stack([torch.randperm(5, generator=g)[:TOP_K] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=g), -1).to(dtype)
    return x, index, weights


# decode: one row per block on CUDA cores; prefill: 16-row blocks on tl.dot.
MOE_MODES = {"decode": (1, dm.Blocks(1, 32, 128)), "prefill": (13, dm.Blocks(16, 64, 128))}
MOE_CASES = ([("mixed", mode, dtype) for mode in MOE_MODES for dtype in DTYPES]
             + [(False, "prefill", torch.float16), (True, "decode", torch.bfloat16)])


@pytest.mark.parametrize("symmetric,mode,dtype", MOE_CASES, ids=str)
def test_moe_mixed_bits(symmetric, mode, dtype):
    experts = mixed_experts(symmetric)
    weights = moe.repack_experts(experts)
    tokens, blocks = MOE_MODES[mode]
    x, index, route = routing(tokens, dtype)
    out = moe.moe_forward_triton(weights, x, index, route, blocks)
    assert out.dtype == dtype and out.shape == x.shape
    exact = moe_forward_torch(QuantizedExperts(experts, torch.nn.SiLU()), x.double(), index, route.double())
    assert rel_error(out, exact) < REL_TOL[dtype]
    assert rel_error(out, moe.moe_forward_reference(weights, x, index, route)) < REL_TOL[dtype]


def test_moe_no_tokens():
    weights = moe.repack_experts(mixed_experts(True))
    x, index, route = torch.zeros(0, HIDDEN), torch.zeros(0, TOP_K, dtype=torch.long), torch.zeros(0, TOP_K)
    assert moe.moe_forward_triton(weights, x, index, route).shape == (0, HIDDEN)


def test_align_tokens_blocks_hold_one_expert():
    index = torch.tensor([[3, 0], [3, 9], [1, 3], [-1, 3], [0, 1]])  # 9 and -1 are dropped
    slots, block_expert = moe.align_tokens(index, num_experts=5, block_m=2)
    flat = index.reshape(-1)
    assert block_expert.numel() == 5 + 5 and slots.numel() == 2 * block_expert.numel()
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = [s for s in slots[2 * b: 2 * b + 2].tolist() if s < flat.numel()]
        if e < 0:
            assert rows == []
        assert all(flat[s] == e for s in rows)
        seen += rows
    assert sorted(seen) == [s for s in range(flat.numel()) if 0 <= flat[s] < 5]
    slots, block_expert = moe.align_tokens(index, num_experts=5, block_m=1)
    assert slots.tolist() == list(range(10)) and block_expert.tolist() == [3, 0, 3, -1, 1, 3, -1, 3, 0, 1]


# --- dispatch ---------------------------------------------------------------------------------
def test_dispatch_imports_without_gpu_or_solver():
    code = ("import sys, mopeq.runtime.kernels as k; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'ortools' or "
            "m.startswith(('mopeq.planner', 'mopeq.profiler', 'triton'))]; assert not bad, bad; "
            "assert not k.available()")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_quantized_experts_kernel_path_matches_torch():
    """The dispatch hook qlayer calls on CUDA, exercised here on CPU tensors through the interpreter."""
    from mopeq.runtime import kernels

    module = QuantizedExperts(mixed_experts("mixed"), torch.nn.SiLU())
    x, index, route = routing(2, torch.float32, seed=3)
    out = kernels.moe_forward(module, x, index, route)
    assert kernels.moe_weights(module) is kernels.moe_weights(module)  # cached
    assert rel_error(out, moe_forward_torch(module, x, index, route)) < 1e-5


# --- ahead-of-time compilation ----------------------------------------------------------------
def _signature(fn, types, constexprs):
    return {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}


def _aot_cases(capability):
    """(kernel, pointer/int types, constexprs, name): every kernel in GEMV and GEMM form; the dense
    kernel's variants (each width, each dtype) are split between the two targets."""
    ints = {name: "i32" for name in ("M", "N", "K", "k_pad", "n_groups", "num_slots", "num_experts", "H", "I")}
    weights = {"words_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*u8", "meta_ptr": "*i64"}
    cases = []
    for bits, act, block_m, group in [(2, "fp16", 1, 128), (3, "bf16", 1, 32), (4, "fp16", 1, 64),
                                      (8, "fp32", 1, 128), (3, "fp16", 16, 128), (4, "bf16", 32, 32),
                                      (2, "fp32", 16, 64), (8, "bf16", 64, 128)]:
        types = {**ints, **weights, "x_ptr": f"*{act}", "out_ptr": f"*{act}"}
        consts = dict(BITS=bits, GROUP=group, HAS_ZERO=bits % 2 == 1, BLOCK_M=block_m, BLOCK_N=16 if block_m == 1 else 64,
                      BLOCK_K=256 if block_m == 1 else 128)
        cases.append((dm.dequant_matmul_kernel, types, consts, f"dequant_matmul b{bits} {act} m{block_m}"))
    cases = cases[capability == 90::2]
    # Small MoE tiles: each program carries a loop per bit width, and compile time grows with tile size.
    for act, block_m, group, zero in [("bf16", 1, 128, True), ("fp16", 16, 16, False)]:
        types = {**ints, **weights, "x_ptr": f"*{act}", "h_ptr": f"*{act}", "slot_ptr": "*i32",
                 "block_expert_ptr": "*i32", "route_weight_ptr": f"*{act}", "y_ptr": "*fp32"}
        blocks = dict(GROUP=group, HAS_ZERO=zero, BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=64 if block_m == 1 else 32)
        cases.append((moe.moe_gate_up_kernel, types, dict(TOP_K=8, **blocks), f"moe_gate_up {act} m{block_m}"))
        cases.append((moe.moe_down_kernel, types, blocks, f"moe_down {act} m{block_m}"))
    return cases


def compile_all(capability: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    for fn, types, consts, name in _aot_cases(capability):
        source = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, types, consts), constexprs=consts)
        start = time.perf_counter()
        compiled = triton.compile(source, target=target, options={"num_warps": 4, "num_stages": 3})
        assert "ptx" in compiled.asm and compiled.asm.get("cubin"), name
        print(f"sm_{capability} {name}: ptx {len(compiled.asm['ptx'])} chars, cubin {len(compiled.asm['cubin'])} bytes, "
              f"{time.perf_counter() - start:.1f} s")


def test_kernels_compile_ahead_of_time():
    """Every kernel for sm_80 and sm_90 (two compiler subprocesses side by side)."""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    runs = {cc: subprocess.Popen([sys.executable, __file__, str(cc)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for cc in (80, 90)}
    for cc, run in runs.items():
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
        assert output.count(f"sm_{cc} ") == len(_aot_cases(cc)), output


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "AOT compilation needs the real compiler"
    compile_all(int(sys.argv[1]))
