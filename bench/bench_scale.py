"""Scale benchmark: peak memory and wall time of each ``mopeq`` step on a ~1 GB checkpoint.

Builds a synthetic DeepSeek-V2 checkpoint in the layout published checkpoints use (``config.json`` with
``model_type: deepseek_v2``; safetensors shards + index; one tensor per expert matrix,
``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``; shared experts, router and MLA
attention under transformers' DeepseekV2 names), random bf16 weights, a character-level tokenizer and
a calibration text file. Then runs each step in a fresh process through ``mopeq.cli.main`` and
reports its peak resident memory above that process's import baseline (torch, transformers,
mopeq.cli and the modules the steps use, all imported before the baseline is read), as a ratio to
the checkpoint, to one decoder layer and (for ``run``) to the artifact, and its wall time.

Peak RSS is the kernel's high-water mark (VmHWM, reset to the baseline through
``/proc/self/clear_refs`` after the imports); it counts mmapped file pages that were touched. ``anon``
is RssAnon sampled every 10 ms (what the process allocated itself).

    OMP_NUM_THREADS=1 python bench/bench_scale.py --size-gb 0.2 --max-memory 500M
    OMP_NUM_THREADS=1 python bench/bench_scale.py --steps profile,plan,compile,run --max-memory 1500M --keep /tmp/scale
    OMP_NUM_THREADS=1 python bench/bench_scale.py --steps gauss-newton,fisher --max-memory 1500M --max-memory-only \
        --keep /tmp/scale --repeat 3 --markdown
    OMP_NUM_THREADS=1 python bench/bench_scale.py --commit 2c243d9 ...   # mopeq as committed there, not the work tree

``--keep DIR`` reuses DIR's checkpoint (and its profile, plan and artifact where a step needs them;
missing ones are made first, unmeasured). The synthetic config has no end-of-sequence token, so ``run``
always generates all 16 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, MOE_INTER, LAYERS, TOP_K, VOCAB = 1024, 512, 4, 6, 64
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'-()\n"  # tests/models/conftest.py's tokenizer alphabet
PROMPT = "the quick brown fox"
SPEC = """# written by bench/bench_scale.py: 2.5 average expert bits, one model-wide budget
version: 1
bits: [2, 3, 4]
group_size: 128
symmetric: false
budget:
  avg_bits: 2.5
scope: global
sensitivity: hessian-local
"""
# step -> extra `mopeq profile` arguments; plan/compile/run are built in step_argv
PROFILES = {"profile": [], "gauss-newton": ["--curvature", "gauss-newton"], "fisher": ["--curvature", "fisher"]}
STEPS = [*PROFILES, "plan", "compile", "run"]
# imported before the baseline is read, so each step's peak is data, not code
PRELOAD = ["torch", "transformers", "safetensors", "mopeq.cli", "mopeq.models", "mopeq.planner",
           "mopeq.profiler.profile", "mopeq.profiler.stream", "mopeq.compiler.artifact", "mopeq.runtime.load",
           "transformers.models.deepseek_v2.modeling_deepseek_v2"]


# --- synthetic checkpoint -------------------------------------------------------------------------
def deepseek_config(experts: int):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                            num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
                            n_routed_experts=experts, num_experts_per_tok=min(TOP_K, experts),
                            moe_intermediate_size=MOE_INTER,
                            n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=128, q_lora_rank=None,
                            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=1024,
                            pad_token_id=0, bos_token_id=1, eos_token_id=None,  # `run` generates every token
                            tie_word_embeddings=False)


def disk_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a published-layout checkpoint: transformers' meta-device model with
    its fused ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]`` split per expert."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    out = {}
    for key, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if key.endswith("experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for j in range(shape[0]):
                out[f"{prefix}{j}.gate_proj.weight"] = out[f"{prefix}{j}.up_proj.weight"] = (shape[1] // 2, shape[2])
        elif key.endswith("experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for j in range(shape[0]):
                out[f"{prefix}{j}.down_proj.weight"] = shape[1:]
        else:
            out[key] = shape
    return out


def write_checkpoint(directory: Path, size_gb: float, shard_mb: int, calib_tokens: int) -> None:
    """Random bf16 tensors (norm weights 1, the rest N(0, 0.02)), written one shard at a time."""
    import torch
    from safetensors.torch import save_file

    experts = max(2, round(size_gb * 1e9 / (LAYERS * 3 * HIDDEN * MOE_INTER * 2)))
    config = deepseek_config(experts)
    gen = torch.Generator().manual_seed(0)
    groups, current, nbytes = [], [], 0
    for key, shape in disk_shapes(config).items():  # plan the shards from shapes alone
        current.append((key, shape))
        nbytes += 2 * torch.Size(shape).numel()
        if nbytes >= shard_mb * 2**20:
            groups, current, nbytes = groups + [current], [], 0
    groups += [current] if current else []
    weight_map = {}
    for i, group in enumerate(groups):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.ones(s, dtype=torch.bfloat16) if "norm" in k
                   else (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in group}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(groups) > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["DeepseekV2ForCausalLM"],
                                                       "torch_dtype": "bfloat16"}, indent=1))
    save_tokenizer(directory)
    words = ["".join(random.Random(i).choices(CHARS[:26], k=1 + i % 7)) for i in range(300)]
    rng = random.Random(0)
    text = ""
    while len(text) < calib_tokens + 64:
        text += " ".join(rng.choices(words, k=12)) + rng.choice(".,;!?") + "\n"
    (directory / "calib.txt").write_text(text)
    (directory / "spec.yaml").write_text(SPEC)


def save_tokenizer(directory: Path) -> None:
    """Character-level WordLevel tokenizer (as tests/models/conftest.py ``save_tokenizer``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def checkpoint_sizes(directory: Path) -> dict[str, int]:
    """Bytes of the checkpoint's tensors, of its largest decoder layer, and its routed experts per layer."""
    from mopeq.safety import check_safetensors

    total, per_layer = 0, {}
    for shard in sorted(directory.glob("*.safetensors")):
        for key, entry in check_safetensors(shard).items():
            nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
            total += nbytes
            if m := re.match(r"model\.layers\.(\d+)\.", key):
                per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + nbytes
    return {"checkpoint": total, "layer": max(per_layer.values()), "files": sum(
        f.stat().st_size for f in directory.glob("*.safetensors"))}


# --- one step in a fresh process ------------------------------------------------------------------
def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM and RssAnon of this process, in MB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon")}


def child(result_path: Path, argv: list[str]) -> None:
    """Import, read the baseline, run ``mopeq.cli.main(argv)``, write peak/time/exit code to ``result_path``."""
    import importlib
    import threading

    for name in PRELOAD:
        importlib.import_module(name)
    import mopeq.cli
    import mopeq.profiler.stream as stream

    modes = [] if hasattr(stream, "profile_streamed") else ["mode unknown"]
    if not modes:  # which profiling path ran (the CLI imports it at call time)
        streamed = stream.profile_streamed
        stream.profile_streamed = lambda *a, **k: (modes.append("streamed"), streamed(*a, **k))[1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak from here on is the step's own
    base = proc_status()
    anon_peak, running = [base["RssAnon"]], [True]

    def sample():
        while running[0]:
            anon_peak[0] = max(anon_peak[0], proc_status()["RssAnon"])
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    rc = mopeq.cli.main(argv)
    seconds = time.perf_counter() - start
    running[0] = False
    thread.join()
    end = proc_status()
    result = {"rc": rc, "seconds": seconds, "base_mb": base["VmRSS"], "peak_mb": end["VmHWM"] - base["VmRSS"],
              "anon_mb": max(anon_peak[0], end["RssAnon"]) - base["RssAnon"], "modes": modes,
              "mopeq": str(Path(mopeq.cli.__file__).parent)}
    result_path.write_text(json.dumps(result))


def run_step(argv: list[str], timeout: float | None) -> dict:
    """``mopeq ARGV`` in a fresh process, after ``sync`` (earlier steps' dirty pages written back first)."""
    os.sync()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, __file__, "_child", str(result_path), "--", *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result_path.unlink()
        return {"status": "timeout", "message": f"killed after {timeout:.0f} s"}
    text = result_path.read_text()
    result_path.unlink()
    lines = [line for line in (proc.stderr + proc.stdout).splitlines()
             if line.strip() and not line.startswith("done in")]
    if not text:  # died before writing its result (killed, out of memory, a traceback)
        return {"status": f"failed (exit {proc.returncode})", "message": lines[-1] if lines else ""}
    result = json.loads(text)
    status = {0: "ok", 2: "refused"}.get(result["rc"], f"failed (exit {result['rc']})")
    errors = [line for line in lines if line.startswith("mopeq ")]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    message = (errors or lines[-1:])[-1] if status != "ok" else "; ".join(notes)
    return {**result, "status": status, "message": message, "stdout": proc.stdout}


def step_argv(step: str, work: Path, max_memory: str | None) -> list[str]:
    ckpt = work / "checkpoint"
    if step in PROFILES:
        name = "profile" if step == "profile" else f"profile-{step}"
        out = work / (f"{name}.json" if max_memory is None else f"{name}.max-memory.json")
        extra = [] if max_memory is None else ["--max-memory", max_memory]
        return ["profile", str(ckpt), "--calib", str(ckpt / "calib.txt"), "-o", str(out), *PROFILES[step], *extra]
    if step == "plan":
        return ["plan", str(ckpt / "spec.yaml"), "--profile", str(work / "profile.json"), "-o", str(work / "plan.json")]
    if step == "compile":
        return ["compile", str(ckpt), "--plan", str(work / "plan.json"), "-o", str(work / "artifact"), "--overwrite"]
    assert step == "run"
    return ["run", str(work / "artifact"), "--prompt", PROMPT, "--max-new-tokens", "16"]


def traces_of(profile_path: Path) -> str:
    """The curvature sources a profile holds (what an in-memory or streamed profile actually computed)."""
    from mopeq.schemas import read_profile

    if not profile_path.is_file():
        return ""
    return ",".join(sorted({source for node in read_profile(profile_path).experts for source in node.trace}))


# --- the table ------------------------------------------------------------------------------------
def label(step: str, max_memory: str | None) -> str:
    name = {"profile": "profile", "gauss-newton": "profile --curvature gauss-newton",
            "fisher": "profile --curvature fisher"}.get(step, step)
    return name if max_memory is None else f"{name} --max-memory {max_memory}"


def summarize(runs: list[dict]) -> dict:
    """Medians over the repeats that succeeded; status and message of the last run."""
    ok = [r for r in runs if r["status"] == "ok"] or runs
    med = lambda key: statistics.median(r[key] for r in ok) if all(key in r for r in ok) else None  # noqa: E731
    return {**runs[-1], "peak_mb": med("peak_mb"), "anon_mb": med("anon_mb"), "seconds": med("seconds"),
            "base_mb": med("base_mb"), "n": len(ok)}


def table_rows(results: dict, sizes: dict, artifact_bytes: int | None) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        peak = r.get("peak_mb") if r["status"] == "ok" else None  # ratios only for steps that ran through
        ratio = lambda nbytes: "" if peak is None or not nbytes else f"{peak * 2**20 / nbytes:.2f}"  # noqa: E731
        note = "; ".join(x for x in (r.get("mode", ""), r.get("message", "")) if x)
        rows.append([name, r["status"], "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}",
                     ratio(sizes["checkpoint"]), ratio(sizes["layer"]), ratio(artifact_bytes) if name == "run" else "",
                     "" if r.get("anon_mb") is None else f"{r['anon_mb']:.0f}",
                     "" if r.get("seconds") is None else f"{r['seconds']:.1f}", note])
    return rows


def print_table(rows: list[list[str]], markdown: bool) -> None:
    head = ["step", "status", "peak RSS MB", "x checkpoint", "x one layer", "x artifact", "anon MB", "wall s", "note"]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
        return
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head) - 1)]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


def time_ratios(per_repeat: list[dict], max_memory: str | None) -> list[str]:
    """Streamed (``--max-memory``) / in-memory wall time per profile source, one ratio per repeat, median."""
    lines = []
    for step in PROFILES:
        a, b = label(step, None), label(step, max_memory)
        pairs = [r[b]["seconds"] / r[a]["seconds"] for r in per_repeat
                 if max_memory and a in r and b in r and r[a]["status"] == r[b]["status"] == "ok"]
        if pairs:
            goal = "; goal <= 2x" if step != "profile" else ""
            lines.append(f"time ({b}) / time ({a}): median {statistics.median(pairs):.2f}x "
                         f"(range {min(pairs):.2f}-{max(pairs):.2f}, {len(pairs)} runs{goal})")
    return lines


# --- driver ---------------------------------------------------------------------------------------
def prepare(work: Path, args) -> None:
    ckpt = work / "checkpoint"
    if (ckpt / "config.json").is_file():
        print(f"reusing {ckpt}", flush=True)
        return
    ckpt.mkdir(parents=True)
    start = time.perf_counter()
    write_checkpoint(ckpt, args.size_gb, args.shard_mb, args.calib_tokens)
    print(f"built {ckpt} in {time.perf_counter() - start:.1f} s", flush=True)


INPUTS = {"plan": ("profile", "profile.json"), "compile": ("plan", "plan.json"),
          "run": ("compile", "artifact/mopeq.json")}  # step -> (the step that makes its input, that input)


def ensure_input(step: str, work: Path, timeout: float | None) -> None:
    """Run (unmeasured) the earlier steps whose output ``step`` reads, where it is missing."""
    if step not in INPUTS or (work / INPUTS[step][1]).exists():
        return
    producer = INPUTS[step][0]
    ensure_input(producer, work, timeout)
    print(f"(input for {step}, not measured) mopeq {' '.join(step_argv(producer, work, None))}", flush=True)
    r = run_step(step_argv(producer, work, None), timeout)
    if r["status"] != "ok":
        sys.exit(f"{producer} (input for {step}) {r['status']}: {r['message']}")


def snapshot(rev: str, into: Path) -> Path:
    """``git archive REV`` of this repository laid out as the installed package (pyproject's package-dir:
    ``profiler/`` -> ``mopeq/profiler``, ...); children import mopeq from it through ``PYTHONPATH``."""
    import io
    import tarfile
    import tomllib

    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", rev], cwd=root, capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(into / "src", filter="data")
    package_dir = tomllib.loads((into / "src" / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        shutil.copytree(into / "src" / folder, into / "pkg" / package.replace(".", "/"), dirs_exist_ok=True)
    return into / "pkg"


def source_state() -> str:
    """The commit measured, and the tracked files changed on top of it (read-only git calls)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=Path(__file__).resolve().parent.parent).stdout
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    commit = git("rev-parse", "--short", "HEAD").strip()
    return f"commit {commit}" + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def bench(work: Path, args) -> None:
    steps = args.steps.split(",")
    bad = [s for s in steps if s not in STEPS]
    if bad:
        sys.exit(f"--steps: got {', '.join(bad)}, expected a subset of {','.join(STEPS)}")
    steps = [s for s in STEPS if s in steps]
    prepare(work, args)
    state_before = source_state()
    plan = [(s, None) for s in steps]
    if args.max_memory:
        variants = [args.max_memory] if args.max_memory_only else [None, args.max_memory]
        plan = [(s, m) for s, _ in plan for m in (variants if s in PROFILES else [None])]
    per_repeat = [measure(plan, work, args, i) for i in range(args.repeat)]
    report(per_repeat, work, args, state_before)


def measure(plan: list[tuple[str, str | None]], work: Path, args, repeat: int) -> dict[str, dict]:
    """One run of every (step, max-memory) pair, each in a fresh process; results by table label."""
    results = {}
    for step, max_memory in plan:
        ensure_input(step, work, args.timeout)
        argv = step_argv(step, work, max_memory)
        print(f"[{repeat + 1}/{args.repeat}] mopeq {' '.join(argv)}", flush=True)
        r = run_step(argv, args.timeout)
        r["message"] = r["message"].replace(str(work), "WORK")
        if step in PROFILES and r["status"] == "ok":
            modes = r.get("modes") or ["in memory"]
            r["mode"] = f"{modes[-1]}, traces: {traces_of(Path(argv[argv.index('-o') + 1])) or 'none'}"
        results[label(step, max_memory)] = r
        print(f"    {r['status']}: peak +{r.get('peak_mb', 0):.0f} MB, {r.get('seconds', 0):.1f} s "
              f"{r.get('message', '')}", flush=True)
        if step == "run" and r["status"] == "ok":
            print(f"    generated: {r['stdout'].rstrip(chr(10)).splitlines()[-1:]}", flush=True)
    return results


def report(per_repeat: list[dict], work: Path, args, state_before: str) -> None:
    import torch

    results = {name: summarize([r[name] for r in per_repeat]) for name in per_repeat[0]}
    ckpt, art = work / "checkpoint", work / "artifact"
    sizes = checkpoint_sizes(ckpt)
    artifact_bytes = sum(f.stat().st_size for f in art.glob("*.safetensors")) if art.is_dir() else None
    config = json.loads((ckpt / "config.json").read_text())
    base = statistics.median(r["base_mb"] for r in results.values() if r.get("base_mb") is not None)
    print(f"\ncheckpoint: {sizes['files'] / 1e9:.3f} GB bf16 ({sizes['files'] / 2**20:.0f} MiB) in "
          f"{len(list(ckpt.glob('*.safetensors')))} shard(s); {config['num_hidden_layers']} MoE layers x "
          f"{config['n_routed_experts']} routed experts (+1 shared, top-{config['num_experts_per_tok']}), hidden "
          f"{config['hidden_size']}, expert intermediate {config['moe_intermediate_size']}, one tensor per expert; "
          f"largest layer {sizes['layer'] / 2**20:.0f} MiB"
          + (f"; artifact {artifact_bytes / 2**20:.0f} MiB" if artifact_bytes else ""))
    state_after = source_state()
    working_tree = (state_after if state_after == state_before
                    else f"{state_before} at the start, {state_after} at the end")
    print("mopeq: " + (f"git archive of {args.commit} ({args.commit_hash})" if args.commit
                       else f"the working tree, {working_tree}"))
    print(f"calibration {len((ckpt / 'calib.txt').read_text())} characters (`mopeq profile` reads windows of 256 "
          f"tokens, at most 64); {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; import baseline ~{base:.0f} MB RSS; "
          f"{'medians of ' + str(args.repeat) + ' runs' if args.repeat > 1 else 'one run'}; MB = MiB\n")
    print_table(table_rows(results, sizes, artifact_bytes), args.markdown)
    for line in time_ratios(per_repeat, args.max_memory):
        print(line)
    for step in ("gauss-newton", "fisher"):
        r = results.get(label(step, args.max_memory)) if args.max_memory else None
        if r and r["status"] == "ok":
            print(f"{label(step, args.max_memory)}: peak / one layer {r['peak_mb'] * 2**20 / sizes['layer']:.2f} "
                  f"(goal <= 3)")
    if "run" in results and results["run"].get("peak_mb") is not None and artifact_bytes:
        print(f"run peak / artifact: {results['run']['peak_mb'] * 2**20 / artifact_bytes:.2f} (goal <= 1.3)")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        child(Path(sys.argv[2]), sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.2, help="routed experts' bf16 bytes (GB = 1e9), default "
                   "%(default)s: 4 layers x 95 experts x (1024 x 512 x 3)")
    p.add_argument("--shard-mb", type=int, default=400, help="checkpoint shard size (default %(default)s MiB)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration characters = tokens "
                   "(default %(default)s: the 64 windows of 256 that `mopeq profile` reads at most)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of %(default)s")
    p.add_argument("--max-memory", default=None, help="also run each profile step with --max-memory SIZE, e.g. 1500M")
    p.add_argument("--max-memory-only", action="store_true", help="run the profile steps only with --max-memory")
    p.add_argument("--repeat", type=int, default=1, help="runs of every step (medians are reported)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a step is killed (default: none)")
    p.add_argument("--keep", type=Path, default=None, help="work directory to keep and reuse (checkpoint, "
                   "profiles, plan, artifact); default a temporary one, deleted at the end")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--commit", default=None, help="measure mopeq as committed at this revision (a git archive "
                   "in a temporary folder) instead of the working tree")
    args = p.parse_args()
    temporary = [Path(tempfile.mkdtemp(prefix="mopeq-scale-", dir="/tmp"))] if args.keep is None else []
    try:
        if args.commit:
            temporary.append(Path(tempfile.mkdtemp(prefix="mopeq-src-", dir="/tmp")))
            package = str(snapshot(args.commit, temporary[-1]))
            args.commit_hash = subprocess.run(["git", "rev-parse", "--short", args.commit], capture_output=True,
                                              text=True, check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
            os.environ["PYTHONPATH"] = package  # every step's process imports mopeq from the snapshot ...
            sys.path.insert(0, package)  # ... and so does this one
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        bench(args.keep or temporary[0], args)
    finally:
        for folder in temporary:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
