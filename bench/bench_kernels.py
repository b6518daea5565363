"""Benchmark the packed-weight Triton kernels against bf16 torch, with a correctness check first.

    python bench/bench_kernels.py            # full run on a CUDA device (H100/H200)
    python bench/bench_kernels.py --quick    # one shape per table
    python bench/bench_kernels.py --markdown # also print the tables as Markdown (for bench/RESULTS.md)

Per bit width (2/3/4/8, group 128, asymmetric) and batch (1, 16, 256) it times the dequant
GEMV/GEMM on DeepSeek-VL2/V3 and MolmoE expert shapes; then a mixed-width MoE layer (30 % 2-bit,
50 % 3-bit, 20 % 4-bit experts) against the bf16 torch layer (per-expert matmuls). Times are medians
of ``triton.testing.do_bench`` (L2 flushed); bandwidth counts the bytes a call must read (the packed
weights of the experts it touches, their scales and zero points, activations) and is compared with
a measured device-to-device copy. Goals (docs: DESIGN.md): 4-bit GEMV >= 75 % of copy bandwidth,
mixed MoE at batch 1 >= 2.5x bf16.

Without CUDA it says so and runs a tiny correctness smoke test in Triton's interpreter, exit 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

BATCHES = (1, 16, 256)
DENSE_SHAPES = [  # (name, N, K)
    ("vl2-small gate_up 2816x2048", 2816, 2048),
    ("vl2-small down 2048x1408", 2048, 1408),
    ("v3 gate_up 4096x7168", 4096, 7168),
    ("v3 down 7168x2048", 7168, 2048),
]
MOE_SHAPES = [  # (name, hidden, intermediate, experts, top_k)
    ("molmoe-1b", 2048, 1024, 64, 8),
    ("deepseek-vl2-small", 2048, 1408, 64, 6),
    ("deepseek-v3", 7168, 2048, 256, 8),
]
MIX = ((2, 0.3), (3, 0.5), (4, 0.2))
GROUP = 128
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def random_packed(n, k, bits, device, generator):
    """A ``PackedMatrix`` of random codes, scales ~1e-2 and zero points (no quantizer run: fast)."""
    from mopeq.compiler.pack import pack_int32
    from mopeq.runtime.qlayer import PackedMatrix

    groups = -(-k // GROUP)
    codes = torch.randint(0, 2**bits, (n, k), device=device, dtype=torch.uint8, generator=generator)
    scale = (torch.rand(n, groups, device=device, generator=generator) * 0.02 + 0.005).half()
    zero = torch.randint(0, 2**bits, (n, groups), device=device, dtype=torch.uint8, generator=generator)
    return PackedMatrix(pack_int32(codes, bits), scale, zero, bits, GROUP, (n, k))


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def median_ms(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def bench_dense(device, copy_bw, quick):
    from mopeq.runtime.kernel_dequant_matmul import dequant_matmul, repack

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, n, k in DENSE_SHAPES[:2] if quick else DENSE_SHAPES:
        for bits in (2, 3, 4, 8):
            matrix = random_packed(n, k, bits, device, gen)
            weights = repack([matrix])
            dense = matrix.dequantize(torch.bfloat16)  # [N, K]
            for batch in BATCHES:
                x = torch.randn(batch, k, device=device, dtype=torch.bfloat16, generator=gen)
                err = rel_error(dequant_matmul(x, weights), x.double() @ matrix.dequantize(torch.float64).t())
                ms = median_ms(lambda: dequant_matmul(x, weights))
                ms_bf16 = median_ms(lambda: x @ dense.t())
                moved = weights.nbytes() + x.numel() * 2 + batch * n * 2
                rows.append([name, bits, batch, f"{ms * 1e3:.1f}", f"{moved / ms / 1e6:.0f}",
                             f"{moved / (ms * 1e-3) / copy_bw:.0%}", f"{ms_bf16 / ms:.2f}x",
                             f"{err:.1e}" + ("" if err < REL_TOL[torch.bfloat16] else " FAIL")])
    return ["shape", "bits", "batch", "us", "GB/s", "% copy", "vs bf16", "rel err"], rows


def mixed_bits(num_experts, generator):
    counts = [round(share * num_experts) for _, share in MIX]
    counts[1] += num_experts - sum(counts)
    bits = torch.tensor(sum(([b] * c for (b, _), c in zip(MIX, counts)), []))
    return bits[torch.randperm(num_experts, generator=generator)].tolist()


def bf16_layer(dense, hidden, top_k_index, top_k_weights):
    """The unquantized layer as transformers runs it: per active expert, three bf16 matmuls."""
    out = torch.zeros_like(hidden)
    for e in torch.unique(top_k_index).tolist():
        token, j = torch.nonzero(top_k_index == e, as_tuple=True)
        gate, up, down = dense[e]
        x = hidden[token]
        y = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
        out.index_add_(0, token, y * top_k_weights[token, j, None])
    return out


def bench_moe(device, copy_bw, quick):
    from mopeq.runtime import kernels
    from mopeq.runtime.qlayer import QuantizedExperts, moe_forward_torch

    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for name, hidden, inter, num_experts, top_k in MOE_SHAPES[:1] if quick else MOE_SHAPES:
        bits = mixed_bits(num_experts, torch.Generator().manual_seed(2))
        experts = [{m: random_packed(*shape, b, device, gen) for m, shape in
                    (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))} for b in bits]
        module = QuantizedExperts(experts, torch.nn.SiLU())
        dense = [[e[m].dequantize(torch.bfloat16) for m in ("gate", "up", "down")] for e in experts]
        weights = kernels.moe_weights(module)
        per_expert = weights.nbytes() / num_experts
        avg_bits = sum(bits) / num_experts
        for batch in BATCHES:
            x = torch.randn(batch, hidden, device=device, dtype=torch.bfloat16, generator=gen)
            logits = torch.randn(batch, num_experts, device=device, generator=gen)
            route, index = torch.softmax(logits, -1).topk(top_k, -1)
            route = route.to(torch.bfloat16)
            out = kernels.moe_forward(module, x, index, route)
            err = rel_error(out, moe_forward_torch(module, x.double(), index, route.double()))
            ms = median_ms(lambda: kernels.moe_forward(module, x, index, route))
            ms_bf16 = median_ms(lambda: bf16_layer(dense, x, index, route))
            moved = per_expert * torch.unique(index).numel()  # approximate: widths differ per expert
            rows.append([name, f"{avg_bits:.2f}", batch, f"{ms * 1e3:.1f}", f"{ms_bf16 * 1e3:.1f}",
                         f"{ms_bf16 / ms:.2f}x", f"{moved / ms / 1e6:.0f}", f"{moved / (ms * 1e-3) / copy_bw:.0%}",
                         f"{err:.1e}" + ("" if err < REL_TOL[torch.bfloat16] else " FAIL")])
        del module, dense, experts, weights
        torch.cuda.empty_cache()
    return ["layer", "avg bits", "batch", "us", "bf16 us", "speed-up", "GB/s", "% copy", "rel err"], rows


def print_table(title, header, rows, markdown):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    for row in [header] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    if markdown:
        print(f"\n#### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")


def cpu_smoke() -> None:
    """Tiny interpreter check that the kernels run and agree with the float64 reference."""
    os.environ["TRITON_INTERPRET"] = "1"
    from mopeq.runtime.kernel_dequant_matmul import dequant_matmul, repack
    from mopeq.runtime.kernel_moe import moe_forward_triton, repack_experts

    gen = torch.Generator().manual_seed(0)
    matrix = random_packed(48, 256, 4, "cpu", gen)
    x = torch.randn(1, 256, generator=gen)
    err = rel_error(dequant_matmul(x, repack([matrix])), x.double() @ matrix.dequantize(torch.float64).t())
    experts = [{m: random_packed(*s, b, "cpu", gen) for m, s in (("gate", (64, 128)), ("up", (64, 128)),
                                                                  ("down", (128, 64)))} for b in (2, 3, 4, 8)]
    from mopeq.runtime.qlayer import QuantizedExperts, moe_forward_torch

    index, route = torch.tensor([[0, 3], [1, 2]]), torch.full((2, 2), 0.5)
    xs = torch.randn(2, 128, generator=gen)
    out = moe_forward_triton(repack_experts(experts), xs, index, route)
    err_moe = rel_error(out, moe_forward_torch(QuantizedExperts(experts, torch.nn.SiLU()), xs.double(), index,
                                               route.double()))
    ok = err < 1e-5 and err_moe < 1e-5
    print(f"interpreter smoke: 4-bit GEMV rel err {err:.1e}, mixed MoE rel err {err_moe:.1e}: {'ok' if ok else 'FAIL'}")
    if not ok:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape per table")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here, nothing to time; running the interpreter smoke test.")
        cpu_smoke()
        return
    device = torch.device("cuda")
    import triton

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    copy_bw = copy_bandwidth(device)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s")
    print_table("dequant GEMV/GEMM (bf16 activations, group 128, asymmetric)", *bench_dense(device, copy_bw, args.quick),
                args.markdown)
    print_table("mixed-bit MoE layer (30% 2-bit, 50% 3-bit, 20% 4-bit; bf16)", *bench_moe(device, copy_bw, args.quick),
                args.markdown)


if __name__ == "__main__":
    main()
