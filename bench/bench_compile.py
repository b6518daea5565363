"""Compiler benchmarks: throughput and peak memory against a plain safetensors copy, and quantizer quality.

``speed`` (default) builds a synthetic multi-shard DeepseekV2 checkpoint (a few hundred MB, bf16),
then runs, each in a fresh subprocess so peak RSS is its own: a plain copy (``safe_open`` every
tensor, ``save_file`` the same shards) and ``compile_artifact`` (uniform 4-bit RTN). Prints the
throughput ratio (goal >= 0.5x) and peak RSS above the import baseline against the largest source
shard plus one layer (goal <= 1).

``quality`` measures held-out perplexity of the demo model (``text_windows("test")``) with every
expert (shared included) quantized uniformly to 2 and 3 bits by RTN, RTN + clip search and GPTQ
(routing-weighted and unweighted Grams from the demo calibration set).

    OMP_NUM_THREADS=1 python bench/bench_compile.py speed --size-mb 300
    OMP_NUM_THREADS=1 python bench/bench_compile.py speed --size-mb 300 --bits 2,3,4,8 --asymmetric
    OMP_NUM_THREADS=1 python bench/bench_compile.py speed --size-mb 300 --per-expert
    MOPEQ_NATIVE=0 OMP_NUM_THREADS=1 python bench/bench_compile.py speed --size-mb 300 --per-expert  # torch RTN path
    OMP_NUM_THREADS=1 python bench/bench_compile.py quality --model /tmp/demo_try
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


# --- synthetic checkpoint -------------------------------------------------------------------------
def synthetic_config(hidden: int, inter: int, experts: int, layers: int) -> dict:
    from transformers import DeepseekV2Config

    cfg = DeepseekV2Config(vocab_size=512, hidden_size=hidden, intermediate_size=2 * inter, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=experts,
                           num_experts_per_tok=2, moe_intermediate_size=inter, n_shared_experts=1,
                           first_k_dense_replace=0, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
                           qk_rope_head_dim=16, v_head_dim=32, pad_token_id=0, tie_word_embeddings=False)
    return cfg.to_dict()


def write_synthetic(directory: Path, size_mb: int, shard_mb: int, per_expert: bool = False) -> dict:
    """Random bf16 tensors with the real key names, one shard per ~``shard_mb``; returns the config.

    Experts are stored as transformers 5 holds them (fused ``experts.gate_up_proj`` ``[E, 2I, H]`` and
    ``experts.down_proj``), or with ``per_expert`` as published DeepSeek-V2 checkpoints store them (one
    ``experts.{j}.{gate,up,down}_proj.weight`` tensor each)."""
    from safetensors.torch import save_file

    from mopeq.models import skeleton

    layers = 4
    hidden, inter = 1024, 512
    experts = max(2, int(size_mb * 2**20 / (layers * 3 * hidden * inter * 2)))
    config = synthetic_config(hidden, inter, experts, layers)
    state = {k: v.shape for k, v in skeleton(config, directory).model.state_dict().items()}
    if per_expert:
        state = split_experts(state)
    gen = torch.Generator().manual_seed(0)
    shards, current, nbytes = [], {}, 0
    for key, shape in state.items():
        current[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes += current[key].numel() * 2
        if nbytes >= shard_mb * 2**20:
            shards.append(current)
            current, nbytes = {}, 0
    shards.append(current) if current else None
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return config


def split_experts(shapes: dict) -> dict:
    """Fused ``experts.gate_up_proj`` / ``experts.down_proj`` shapes -> one ``experts.{j}.*_proj.weight`` each."""
    out = {}
    for key, shape in shapes.items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for j in range(shape[0]):
                out[f"{prefix}{j}.gate_proj.weight"] = out[f"{prefix}{j}.up_proj.weight"] = (shape[1] // 2, shape[2])
        elif key.endswith("experts.down_proj"):
            for j in range(shape[0]):
                out[f"{key[: -len('down_proj')]}{j}.down_proj.weight"] = tuple(shape[1:])
        else:
            out[key] = tuple(shape)
    return out


def uniform_plan(directory: Path, bits: int | list[int], symmetric: bool = True, group_size: int = 128,
                 spec: dict | None = None):
    """Every expert at ``bits``; a list of widths is dealt out round robin (a mixed plan)."""
    from mopeq.models import read_config, skeleton
    from mopeq.schemas import ExpertPlan, Plan, SolverReport, config_hash

    config = read_config(directory)
    refs = skeleton(config, directory).experts()
    widths = bits if isinstance(bits, list) else [bits]
    return Plan(model_id=directory.name, family=config["model_type"], config_hash=config_hash(config),
                profile_sha256="0" * 64, spec=spec or {}, group_size=group_size, symmetric=symmetric,
                experts={r.id: ExpertPlan(bits=widths[i % len(widths)], cluster=r.id) for i, r in enumerate(refs)},
                layers={}, totals={}, solver=SolverReport(backend="none", status="optimal", objective=0.0,
                                                          bound=0.0, gap=0.0, seconds=0.0))


# --- measured children ----------------------------------------------------------------------------
class PeakRSS:
    """Samples this process's anonymous resident memory every 2 ms; ``peak_mb`` is the maximum above the start."""

    def __init__(self):
        import threading

        self.base = self.peak = self.current()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def current() -> float:
        """Anonymous resident memory (RssAnon): what the process allocated, not mmap'd file pages."""
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self.current())
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, self.current()) - self.base


def child_copy(src: Path, dst: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    rss = PeakRSS()
    start = time.perf_counter()
    dst.mkdir(parents=True, exist_ok=True)
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(dst / shard.name), metadata={"format": "pt"})
        del tensors
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": rss.stop()}


def child_compile(src: Path, dst: Path, shard_mb: int, bits: list[int], symmetric: bool) -> dict:
    from mopeq.compiler.artifact import compile_artifact

    plan = uniform_plan(src, bits, symmetric)
    rss = PeakRSS()
    start = time.perf_counter()
    compile_artifact(src, plan, dst, max_shard_bytes=shard_mb * 2**20, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": rss.stop()}


def kernel_name() -> str:
    from mopeq.compiler import native

    return "native (rtn_pack.c)" if native.enabled() and native.library() is not None else "torch"


def run_child(mode: str, src: Path, dst: Path, shard_mb: int, bits: list[int] = (4,), symmetric: bool = True) -> dict:
    """One measurement in a fresh process, after ``sync``: the previous run's dirty pages (a 300 MB copy)
    are written back first instead of during this run (without it, runs measured up to 2x slower)."""
    os.sync()
    extra = f", {shard_mb}, {list(bits)}, {symmetric}" if mode == "compile" else ""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_compile as b; "
            f"from pathlib import Path; print(json.dumps(b.child_{mode}(Path({str(src)!r}), Path({str(dst)!r})"
            f"{extra})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_speed(size_mb: int, shard_mb: int, runs: int = 3, bits: list[int] = (4,), symmetric: bool = True,
                per_expert: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src")
        src.mkdir()
        config = write_synthetic(src, size_mb, shard_mb, per_expert)
        shards = sorted(src.glob("*.safetensors"))
        largest = max(s.stat().st_size for s in shards) / 2**20
        total = sum(s.stat().st_size for s in shards) / 2**20
        layer = 3 * config["n_routed_experts"] * config["hidden_size"] * config["moe_intermediate_size"] * 2 / 2**20
        copies, comps, ratios = [], [], []
        # untimed warm-up pair: first reads of the fresh checkpoint, and the one-off build of the native kernel
        run_child("copy", src, Path(tmp, "copy"), shard_mb)
        run_child("compile", src, Path(tmp, "art"), shard_mb, bits, symmetric)
        shutil.rmtree(Path(tmp, "art"))
        for i in range(runs):  # copy and compile back to back, so each ratio sees the same machine load
            shutil.rmtree(Path(tmp, "copy"), ignore_errors=True)
            copies.append(run_child("copy", src, Path(tmp, "copy"), shard_mb))
            comps.append(run_child("compile", src, Path(tmp, "art"), shard_mb, bits, symmetric))
            ratios.append(copies[-1]["seconds"] / comps[-1]["seconds"])
            print(f"  run {i + 1}: copy {copies[-1]['seconds']:.3f} s, compile {comps[-1]['seconds']:.3f} s, "
                  f"ratio {ratios[-1]:.2f}x, compile peak +{comps[-1]['peak_mb']:.0f} MB", flush=True)
            shutil.rmtree(Path(tmp, "art"))
        comp_dir = Path(tmp, "art")
        run_child("compile", src, comp_dir, shard_mb, bits, symmetric)
        out_mb = sum(f.stat().st_size for f in comp_dir.glob("*.safetensors")) / 2**20
    med = lambda xs: statistics.median(xs)  # noqa: E731
    copy = {k: med([c[k] for c in copies]) for k in ("seconds", "peak_mb")}
    comp = {k: med([c[k] for c in comps]) for k in ("seconds", "peak_mb")}
    print(f"checkpoint: {total:.0f} MB bf16 in {len(shards)} shards (largest {largest:.0f} MB), "
          f"one MoE layer's experts {layer:.0f} MB; artifact {out_mb:.0f} MB ({'/'.join(map(str, bits))}-bit RTN, "
          f"{'sym' if symmetric else 'asym'}, g128; experts {'one tensor each' if per_expert else 'fused'}); "
          f"medians of {runs} runs, torch threads {torch.get_num_threads()}, RTN kernel {kernel_name()}")
    print(f"plain copy : {copy['seconds']:.2f} s ({total / copy['seconds']:.0f} MB/s), peak +{copy['peak_mb']:.0f} MB")
    print(f"compile    : {comp['seconds']:.2f} s ({total / comp['seconds']:.0f} MB/s), peak +{comp['peak_mb']:.0f} MB")
    print(f"throughput ratio compile/copy: median {med(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x "
          f"(goal >= 0.5x)")
    print(f"peak / (largest shard + one layer): {max(c['peak_mb'] for c in comps) / (largest + layer):.2f} "
          f"(worst run; goal <= 1)")


# --- quality --------------------------------------------------------------------------------------
def fake_quantize_all(loaded, bits: int, method: str, clip: bool, grams=None, symmetric=False, group=128, **kw):
    """Replace every expert matrix (shared included) by its dequantized quantization, in place."""
    from mopeq.compiler.gptq import GPTQSettings, gptq_quantize
    from mopeq.compiler.quantize import dequantize, quantize

    for ref in loaded.adapter.experts():
        new = {}
        for m, w in loaded.adapter.expert_weights(ref).items():
            w = w.detach().float()
            if method == "rtn":
                q = quantize(w, bits, group, symmetric, clip)
            else:
                gram = grams.gram(ref.id, m)
                q = gptq_quantize(w, gram, bits, group, symmetric, clip, grams.tokens.get(ref.id, 0), GPTQSettings(**kw))
            new[m] = dequantize(q)
        loaded.adapter.set_expert_weights(ref, new)


def bench_quality(model: str, bits_list: list[int], symmetric: bool) -> None:
    from mopeq.compiler.gptq import GramFile
    from mopeq.demo.data import text_windows
    from mopeq.evaluate import perplexity
    from mopeq.models import open_model
    from mopeq.profiler.calibration import demo_batches
    from mopeq.profiler.gram import grams_for

    windows = text_windows("test")
    base = open_model(model)
    print(f"model {model}: unquantized held-out perplexity {perplexity(base.adapter, windows):.4f} "
          f"({len(windows)} windows), group 128, {'symmetric' if symmetric else 'asymmetric'}")
    with tempfile.TemporaryDirectory() as tmp:
        grams = {w: GramFile(grams_for(base, demo_batches(base.config), Path(tmp, f"{w}.safetensors"), w,
                                       progress=False)) for w in ("routing", "none")}
        runs = [("RTN", "rtn", False, None, {}), ("RTN+clip", "rtn", True, None, {}),
                ("GPTQ (g^2-weighted)", "gptq", False, "routing", {}),
                ("GPTQ+clip (g^2-weighted)", "gptq", True, "routing", {}),
                ("GPTQ (unweighted)", "gptq", False, "none", {}),
                ("GPTQ act-order (g^2)", "gptq", False, "routing", {"act_order": True})]
        for bits in bits_list:
            for name, method, clip, weighting, kw in runs:
                loaded = open_model(model)
                fake_quantize_all(loaded, bits, method, clip, grams.get(weighting), symmetric, **kw)
                print(f"  {bits}-bit {name:26s} perplexity {perplexity(loaded.adapter, windows):.4f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="speed", choices=["speed", "quality"])
    p.add_argument("--size-mb", type=int, default=300)
    p.add_argument("--shard-mb", type=int, default=100)
    p.add_argument("--runs", type=int, default=3, help="speed: copy+compile pairs (medians are reported)")
    p.add_argument("--model", default="demo")
    p.add_argument("--bits", default=None, help="quality: widths to test (default 2,3); speed: the plan's "
                   "widths, dealt out round robin over the experts (default 4)")
    p.add_argument("--symmetric", action="store_true", help="quality: symmetric quantization (default asymmetric)")
    p.add_argument("--asymmetric", action="store_true", help="speed: asymmetric quantization (default symmetric)")
    p.add_argument("--per-expert", action="store_true", help="speed: one tensor per expert matrix on disk, as "
                   "published DeepSeek-V2 checkpoints store them (default: transformers' fused tensors)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.mode == "speed":
        bench_speed(args.size_mb, args.shard_mb, args.runs, [int(b) for b in (args.bits or "4").split(",")],
                    not args.asymmetric, args.per_expert)
    else:
        bench_quality(args.model, [int(b) for b in (args.bits or "2,3").split(",")], args.symmetric)


if __name__ == "__main__":
    main()
