"""The ``mopeq`` command line: one subcommand per stage, plus ``demo`` for the whole chain.

Bad input (missing files, malformed specs, stale hand-offs, impossible budgets) is reported as one
line on stderr with exit code 2; outputs are written atomically, so earlier results stay intact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .schemas import InputError

EPILOG = "Exit codes: 0 success, 2 bad input (one-line message on stderr)."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mopeq", description="Per-expert mixed-precision quantization for "
                                "Mixture-of-Experts models: profile -> plan -> compile -> run.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("profile", help="measure per-expert sensitivity and write the expert graph (profile.json)",
                       description="Run calibration data through MODEL and write profile.json: routing statistics, "
                       "curvature, quantization error per bit width, expert similarity.")
    s.add_argument("model", help="model directory (config.json + safetensors) or 'demo'")
    s.add_argument("--calib", default=None, help="calibration data: 'demo' (the demo's own set, default for the "
                   "demo model), a .txt file, or a .jsonl file with a 'text' field per line")
    s.add_argument("-o", "--output", type=Path, default=Path("profile.json"), help="output file (default: %(default)s)")
    s.add_argument("--bits", default="2,3,4,8", help="candidate bit widths, comma-separated (default: %(default)s)")
    s.add_argument("--group-size", type=int, default=128, help="quantization group size (default: %(default)s)")
    s.add_argument("--symmetric", action="store_true", help="symmetric quantization (no zero points)")
    s.add_argument("--clip-search", action="store_true", help="search a clipping ratio per group")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    s.add_argument("--curvature", default="", help="loss-curvature sources to add, comma-separated: hessian "
                   "(Hutchinson), fisher (exact empirical Fisher), gauss-newton (Hutchinson, PSD)")
    s.add_argument("--probes", type=int, default=32, help="most Hutchinson probes (default: %(default)s)")
    s.add_argument("--tolerance", type=float, default=0.1, help="stop probing once every expert's standard error "
                   "is below this fraction of its trace (default: %(default)s)")
    s.add_argument("--ablation", action="store_true", help="also measure the calibration-loss increase of "
                   "quantizing each expert alone to each width (one pass per expert and width: small models)")
    s.add_argument("--resume", type=Path, default=None, metavar="DIR", help="profile layer by layer, writing one "
                   "checkpoint per finished layer to DIR and continuing from DIR's checkpoints (no loss curvature)")
    s.add_argument("--max-memory", default=None, help="e.g. 8G: profile in memory when the estimated need (weights "
                   "+ activations + curvature buffers) fits, else one layer at a time (no loss curvature in that "
                   "mode); refuse before loading when neither fits")

    s = sub.add_parser("plan", help="solve for one bit width per expert under a YAML budget spec (plan.json)",
                       description="Read a budget spec and a profile; solve the multiple-choice knapsack with "
                       "OR-Tools; write plan.json with the proven optimality gap.")
    s.add_argument("spec", type=Path, help="YAML budget spec (see specs/)")
    s.add_argument("--profile", type=Path, required=True, help="profile.json from `mopeq profile`")
    s.add_argument("-o", "--output", type=Path, default=Path("plan.json"), help="output file (default: %(default)s)")

    s = sub.add_parser("compile", help="quantize and pack every expert at its planned width into an artifact",
                       description="Stream MODEL's safetensors, quantize each planned expert, and write a sharded "
                       "safetensors artifact (atomically, with checksums).")
    s.add_argument("model", help="model directory or 'demo'")
    s.add_argument("--plan", type=Path, required=True, help="plan.json from `mopeq plan`")
    s.add_argument("-o", "--output", type=Path, required=True, help="artifact directory to create")
    s.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    s.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"],
                   help="rtn: round-to-nearest; gptq: error compensation from routed-input Grams (default: %(default)s)")
    s.add_argument("--grams", type=Path, default=None, help="gptq: grams.safetensors to read (or to write, with --calib)")
    s.add_argument("--calib", default=None, help="gptq: collect the Grams first from 'demo', a .txt or a .jsonl file "
                   "(written to --grams, default OUTPUT.grams.safetensors)")
    s.add_argument("--weighting", default="routing", choices=["routing", "none"],
                   help="gptq Grams from --calib: rows weighted by routing weight squared, or not (default: %(default)s)")
    s.add_argument("--damp", type=float, default=0.01, help="gptq: dampening, fraction of mean diag (default: %(default)s)")
    s.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Gram diagonal")

    s = sub.add_parser("run", help="load an artifact and answer a prompt",
                       description="Load ARTIFACT (checksums verified) and generate text for --prompt; for the demo "
                       "VLM, --image picks a held-out digit image by index or reads an 8x8 image from a .npy file; "
                       "for DeepSeek-VL2 and MolmoE, --image is an image file, tiled by the model's processor.")
    s.add_argument("artifact", help="artifact directory (or a model directory, unquantized)")
    s.add_argument("--prompt", required=True, help="text prompt (demo VLM: a question about the image)")
    s.add_argument("--image", default=None, help="demo VLM: held-out image index, or a .npy 8x8 array in [0, 1]; "
                   "DeepSeek-VL2 / MolmoE: an image file (png, jpg, ...)")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    s.add_argument("--device", default="cpu", help="where to run: cpu or cuda[:N] (default: %(default)s)")

    s = sub.add_parser("eval", help="measure a model or artifact on a task",
                       description="Tasks: 'demo' (held-out perplexity and question accuracy of the demo model), "
                       "'perplexity' (on --text FILE), 'vqa' (demo VLM, DeepSeek-VL2, MolmoE: a JSONL file of image/question/answer "
                       "records, exact match, or multiple choice with 'choices'), 'fidelity' (KL divergence and "
                       "top-1 agreement against --reference, on --text or the demo's held-out text).")
    s.add_argument("model", help="artifact directory, model directory, or 'demo'")
    s.add_argument("--task", default="demo", choices=["demo", "perplexity", "vqa", "fidelity"],
                   help="task (default: %(default)s)")
    s.add_argument("--text", type=Path, default=None, help="text file (.txt or .jsonl) for perplexity / fidelity")
    s.add_argument("--data", type=Path, default=None, help="VQA JSONL file for the vqa task")
    s.add_argument("--reference", default=None, help="unquantized model directory (or 'demo') for the fidelity task")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--device", default="cpu", help="where to run: cpu or cuda[:N] (default: %(default)s)")

    s = sub.add_parser("pareto", help="size vs. measured quality for every allocation method (demo model)",
                       description="Profile once, then for each method, scope and budget of the spec's sweep: plan, "
                       "compile, load and measure held-out perplexity, accuracy and KL. Writes points.csv, "
                       "points.json, pareto.png and report.md; an interrupted sweep resumes from finished points.")
    s.add_argument("spec", type=Path, help="budget spec with a sweep section (e.g. specs/demo-pareto.yaml)")
    s.add_argument("-o", "--output", type=Path, default=Path("pareto"), help="output directory (default: %(default)s)")
    s.add_argument("--methods", default=None, help="comma-separated sensitivity sources (default: hessian, fisher, "
                   "gauss-newton, hessian-local, ablation, frequency; uniform is always included)")
    s.add_argument("--scopes", default="global,layer", help="comma-separated scopes (default: %(default)s)")
    s.add_argument("--eval-windows", type=int, default=None,
                   help="measure on the first N held-out text windows only (default: all 274; for quick checks)")
    s.add_argument("--eval-questions", type=int, default=None,
                   help="measure on an evenly spaced subset of N held-out questions (default: all 1800)")

    s = sub.add_parser("estimate", help="planned memory footprint of a real model from its config (no weights)",
                       description="Plan MODEL under SPEC from a synthetic profile (real sizes, seeded synthetic "
                       "sensitivities) and report bf16 vs planned size in GB. MODEL: a shipped seed config "
                       "(deepseek-vl2-tiny, deepseek-vl2-small, deepseek-vl2, molmoe-1b), a config.json or a model directory.")
    s.add_argument("model", help="seed model name, config.json, or model directory")
    s.add_argument("--spec", type=Path, required=True, help="YAML budget spec (see specs/)")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic sensitivities (default: %(default)s)")
    s.add_argument("--calib-tokens", type=int, default=128 * 512,
                   help="calibration tokens the memory estimate assumes (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser("demo", help="run the whole chain on the built-in demo model and print one table",
                       description="profile -> plan -> compile -> load -> eval on the built-in demo MoE VLM.")
    s.add_argument("--spec", type=Path, default=None, help="budget spec (default: specs/demo.yaml shipped with mopeq)")
    s.add_argument("-o", "--output", type=Path, default=Path("demo-out"), help="work directory (default: %(default)s)")
    return p


def _bits(text: str) -> list[int]:
    try:
        bits = sorted({int(b) for b in text.split(",")})
    except ValueError:
        raise InputError(f"--bits: got {text!r}, expected comma-separated integers from 2, 3, 4, 8") from None
    if not bits or any(b not in (2, 3, 4, 8) for b in bits):
        raise InputError(f"--bits: got {text!r}, expected values from 2, 3, 4, 8")
    return bits


def cmd_profile(args) -> None:
    from .models import DEMO, read_config, resolve_dir, skeleton
    from .profiler.calibration import demo_batches, image_folder_batches, summary, text_file_batches
    from .profiler.curvature import parse_sources
    from .profiler.stream import parse_memory, profile_streamed
    from .safety import choose_profile_mode
    from .schemas import check_file_output, write_profile

    check_file_output(args.output)  # before any work
    bits = _bits(args.bits)
    if args.group_size < 1:
        raise InputError(f"--group-size: got {args.group_size}, expected a positive integer")
    if args.probes < 2 or args.tolerance < 0:
        raise InputError(f"--probes/--tolerance: got {args.probes}/{args.tolerance}, expected >= 2 and >= 0")
    sources = parse_sources(args.curvature)
    directory = resolve_dir(args.model)
    config = read_config(directory)
    adapter = skeleton(config, directory)
    adapter.experts()  # an unsupported architecture fails here, before any data is read
    calib = args.calib or (DEMO if adapter.is_demo else None)
    if calib is None:
        raise InputError("--calib: required for this model (a .txt or .jsonl file)")
    if calib == DEMO:
        if not adapter.is_demo:
            raise InputError("--calib demo: only for the demo model")
        batches = demo_batches(config)
    elif Path(calib).is_dir():
        tokenizer = None if adapter.is_demo else _tokenizer(directory)
        batches = image_folder_batches(Path(calib), config, tokenizer=tokenizer, directory=directory)
    else:
        batches = text_file_batches(Path(calib), _tokenizer(directory))
    info = summary(batches, str(calib))
    limit = None if args.max_memory is None else parse_memory(args.max_memory)
    mode = choose_profile_mode(directory, batches, limit, sources, args.ablation, args.resume is not None,
                               min(args.probes, 8))  # tangents are kept for one block of probes
    if mode == "memory":
        profile = _profile_in_memory(args, batches, info, bits, sources)
    else:
        if args.ablation:
            raise InputError("--ablation: needs the whole model; not computed in layer-streamed mode (drop --resume)")
        with _scratch(mode == "streamed-disk", args.resume) as boundaries:
            profile, _ = profile_streamed(args.model, batches, info, bits, args.group_size, args.symmetric,
                                          args.clip_search, args.seed, checkpoint_dir=args.resume,
                                          curvature=tuple(sources), probes=args.probes, tolerance=args.tolerance,
                                          boundaries=boundaries)
    write_profile(profile, args.output)
    print(f"wrote {args.output}: {len(profile.experts)} experts, calibration loss {profile.meta.calibration['loss']:.4f}")


@contextmanager
def _scratch(on_disk: bool, resume: Path | None):
    """Where a streamed curvature profile keeps each layer's input: RAM (None), under --resume (kept for a
    rerun), or a temporary folder removed afterwards."""
    if not on_disk or resume is not None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="mopeq-boundaries-") as folder:
        print(f"note: layer inputs do not fit --max-memory; kept in {folder} while profiling")
        yield Path(folder)


def _profile_in_memory(args, batches, info, bits, sources):
    from .models import open_model
    from .profiler.profile import profile_model

    return profile_model(open_model(args.model), batches, info, bits, args.group_size, args.symmetric,
                         args.clip_search, args.seed, curvature=tuple(sources), probes=args.probes,
                         tolerance=args.tolerance, ablation=args.ablation)


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # remote-code model types (deepseek_vl_v2, molmo) make AutoConfig warn; harmless here
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise InputError(f"{directory}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
    finally:
        logging.set_verbosity(level)


def cmd_plan(args) -> None:
    from .planner import load_spec, make_plan
    from .schemas import check_file_output, read_profile, write_plan

    check_file_output(args.output)
    spec = load_spec(args.spec)
    plan = make_plan(spec, read_profile(args.profile))
    write_plan(plan, args.output)
    t, s = plan.totals, plan.solver
    print(f"wrote {args.output}: {t['avg_bits']:.3f} avg bits, {t['bytes'] / 2**20:.2f} MiB of "
          f"{t['budget_bytes'] / 2**20:.2f} MiB budget; {s.backend} {s.status}, gap {s.gap:.2e}")


def cmd_compile(args) -> None:
    from .compiler.artifact import check_output, compile_artifact, make_quantizer
    from .compiler.gptq import GPTQSettings
    from .models import resolve_dir
    from .schemas import read_plan

    plan = read_plan(args.plan)
    args.output = check_output(args.output, args.overwrite, resolve_dir(args.model))  # before any work
    if args.damp <= 0:
        raise InputError(f"--damp: got {args.damp}, expected a positive number")
    grams = args.grams
    if args.quantizer == "gptq" and args.calib is not None:
        grams = _collect_grams(args, grams or args.output.with_name(f"{args.output.name}.grams.safetensors"))
    quantizer = make_quantizer(args.quantizer, grams, GPTQSettings(args.damp, args.act_order), plan.config_hash)
    out = compile_artifact(args.model, plan, args.output, overwrite=args.overwrite, quantizer=quantizer)
    sizes = artifact_sizes(out)
    print(f"wrote {out}: {sizes['files'] / 2**20:.2f} MiB of safetensors = experts {sizes['experts'] / 2**20:.3f} MiB "
          f"(plan predicted {plan.totals.get('bytes', 0) / 2**20:.3f} MiB) + other tensors {sizes['dense'] / 2**20:.3f} MiB "
          f"+ headers {sizes['headers'] / 2**10:.1f} KiB")


def artifact_sizes(directory: Path) -> dict[str, int]:
    """Bytes of an artifact's shards: packed expert tensors, everything else, safetensors headers, files."""
    from math import prod

    from .compiler.artifact import ST_BYTES
    from .safety import check_safetensors

    out = {"experts": 0, "dense": 0, "headers": 0, "files": 0}
    suffixes = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = 0
        for name, entry in check_safetensors(shard).items():
            nbytes = ST_BYTES[entry["dtype"]] * prod(entry["shape"])
            out["experts" if name.endswith(suffixes) else "dense"] += nbytes
            tensors += nbytes
        out["files"] += shard.stat().st_size
        out["headers"] += shard.stat().st_size - tensors
    return out


def _collect_grams(args, path: Path) -> Path:
    """Run ``--calib`` through the model and write its per-expert Grams to ``path``, one decoder layer
    resident at a time."""
    from .models import DEMO, read_config, resolve_dir, skeleton
    from .profiler.calibration import demo_batches, text_file_batches
    from .profiler.gram import collect_grams_streamed

    directory = resolve_dir(args.model)
    config = read_config(directory)
    adapter = skeleton(config, directory)
    if args.calib == DEMO:
        if not adapter.is_demo:
            raise InputError("--calib demo: only for the demo model")
        batches = demo_batches(config)
    else:
        batches = text_file_batches(Path(args.calib), _tokenizer(directory))
    collect_grams_streamed(args.model, batches, path, args.weighting, calibration=str(args.calib))
    print(f"wrote {path}: Grams of {len(adapter.experts())} experts", file=sys.stderr)
    return path


def _open_any(path: str, device: str = "cpu"):
    """An artifact directory (has mopeq.json) through the runtime, anything else as a model; on ``device``
    (checked before anything is read)."""
    from .runtime.load import load, resolve_device

    device = resolve_device(device)
    if Path(path, "mopeq.json").is_file():
        return load(path, device=device)
    from .models import open_model

    loaded = open_model(path)
    loaded.model.to(device)
    return loaded


def _on_device(loaded):
    """Callers that build CPU tensors (eval tasks, the demo's ``answer``) run ``loaded.model`` where it lies:
    tensor inputs move to its device, logits come back to the CPU."""
    import torch

    device = next(loaded.model.parameters()).device
    if device.type == "cpu":
        return loaded
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731

    def inputs(module, args, kwargs):
        return tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}

    def outputs(module, args, kwargs, out):
        if getattr(out, "logits", None) is not None:
            out.logits = out.logits.cpu()
        return out

    loaded.model.register_forward_pre_hook(inputs, with_kwargs=True)
    loaded.model.register_forward_hook(outputs, with_kwargs=True)
    return loaded


def cmd_run(args) -> None:
    import torch

    loaded = _open_any(args.artifact, args.device)
    if loaded.adapter.is_demo:
        print(_on_device(loaded).model.answer(_demo_image(args.image), [args.prompt])[0])
        return
    tok = _tokenizer(loaded.directory)
    if args.image is None:
        inputs = {"input_ids": tok(args.prompt, return_tensors="pt")["input_ids"]}
    else:
        inputs = _image_inputs(loaded, tok, args.prompt, Path(args.image))
    device = next(loaded.model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    out = loaded.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, inputs["input_ids"].shape[1]:].cpu(), skip_special_tokens=True))


def _image_inputs(loaded, tok, prompt: str, image: Path) -> dict:
    from .profiler.calibration import load_rgb
    from .vlm import image_inputs

    return image_inputs(loaded, tok, prompt, load_rgb(image, "--image"))


def _demo_image(spec: str | None):
    import torch

    from .demo.data import digit_images

    if spec is None:
        raise InputError("--image: required for the demo VLM (a held-out image index or a .npy file)")
    if spec.isdigit():
        images, _ = digit_images("test")
        if int(spec) >= len(images):
            raise InputError(f"--image: index {spec} out of range (0..{len(images) - 1})")
        return images[int(spec)][None]
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--image: {path} not found")
    from .profiler.calibration import read_npy

    arr = read_npy(path, "--image")
    if arr.shape != (8, 8):
        raise InputError(f"--image: {path} has shape {arr.shape}, expected (8, 8)")
    return torch.tensor(arr, dtype=torch.float32)[None]


def cmd_eval(args) -> None:
    from . import evaluate

    loaded = _on_device(_open_any(args.model, args.device))
    is_demo = loaded.adapter.is_demo
    if args.task == "demo" and not is_demo:
        raise InputError("--task demo: only for the demo VLM or its artifacts (its digit set); other models: "
                         "--task perplexity, fidelity, or vqa (DeepSeek-VL2, MolmoE)")
    if args.task == "demo":
        result = evaluate.demo_quality(loaded, progress=True)
    elif args.task == "vqa":
        if args.data is None:
            raise InputError("--data: required for --task vqa (a JSONL file)")
        if not loaded.adapter.takes_images:
            raise InputError(f"--task vqa: model_type {loaded.config['model_type']!r} takes no images "
                             "(vqa: demo VLM, DeepSeek-VL2, MolmoE)")
        result = evaluate.vqa_file(loaded, args.data, progress=True,
                                   tokenizer=None if is_demo else _tokenizer(loaded.directory))
    elif args.task == "perplexity":
        result = {"perplexity": evaluate.perplexity(loaded.adapter, _eval_windows(args, loaded, is_demo),
                                                    progress=True)}
    else:
        if args.reference is None:
            raise InputError("--reference: required for --task fidelity (the unquantized model directory or 'demo')")
        reference = _on_device(_open_any(args.reference, args.device))
        if reference.config_hash != loaded.config_hash:
            raise InputError(f"--reference: {args.reference} is another model than {args.model}")
        result = evaluate.fidelity(loaded, reference, _eval_windows(args, loaded, is_demo), progress=True)
    print(json.dumps(result) if args.json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in result.items()))


def _eval_windows(args, loaded, is_demo: bool):
    """Token windows from --text, or the demo's held-out text."""
    import torch

    from .profiler.calibration import text_file_batches

    if args.text is None:
        if is_demo:
            from .demo.data import text_windows

            return text_windows("test")
        raise InputError(f"--text: required for --task {args.task}")
    if is_demo:
        from .demo.data import WINDOW
        from .demo.model import BOS_ID
        from .profiler.calibration import read_texts

        data = "\n".join(read_texts(args.text)).encode()
        n = len(data) // WINDOW
        if n == 0:
            raise InputError(f"{args.text}: shorter than one {WINDOW}-byte window")
        rows = torch.tensor(list(data[: n * WINDOW])).view(n, WINDOW)
        return torch.cat([torch.full((n, 1), BOS_ID), rows], 1)
    return torch.cat([b["input_ids"] for b in text_file_batches(args.text, _tokenizer(loaded.directory))])


def cmd_pareto(args) -> None:
    from .pareto import run_pareto

    scopes = [x.strip() for x in args.scopes.split(",") if x.strip()]
    if not scopes or any(x not in ("global", "layer") for x in scopes):
        raise InputError(f"--scopes: got {args.scopes!r}, expected global and/or layer")
    methods = None if args.methods is None else [x.strip() for x in args.methods.split(",") if x.strip()]
    for name in ("eval_windows", "eval_questions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected a positive integer")
    result = run_pareto(args.spec, args.output, methods, scopes, text_windows=args.eval_windows,
                        questions=args.eval_questions)
    print(f"wrote {args.output}/points.csv, points.json, pareto.png, report.md ({len(result['points'])} points)")


def cmd_demo(args) -> None:
    from .demo.run import run_demo

    run_demo(args.spec, args.output)


def cmd_estimate(args) -> None:
    from .estimate import estimate

    r = estimate(args.model, args.spec, args.seed, args.calib_tokens)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['model']}: {r['moe_layers']} MoE layers x {r['experts_per_layer']} experts (top-{r['top_k']}); "
          f"experts {r['experts_bf16_gb']:.2f} GB bf16 -> {r['experts_planned_gb']:.2f} GB at {r['avg_bits']:.2f} bits; "
          f"whole model {r['total_bf16_gb']:.2f} GB -> {r['total_planned_gb']:.2f} GB ({r['solver']})")
    m = r["memory_gb"]
    print(f"memory (GB, calibration of {args.calib_tokens} tokens): profile in memory {m['profile_in_memory']:.2f} "
          f"(with curvature {m['profile_in_memory_curvature']:.2f}), layer-streamed {m['profile_streamed']:.2f} "
          f"(with curvature {m['profile_streamed_curvature']:.2f}, or {m['profile_streamed_curvature_disk']:.2f} with "
          f"layer inputs on disk); compile {m['compile']:.2f}; run {m['run']:.2f}")
    keys = {source: "profile_streamed_" + source.replace("-", "_") for source in ("fisher", "gauss-newton", "hessian")}
    print("layer-streamed per curvature source (GB, layer inputs in RAM / on disk): " +
          ", ".join(f"{source} {m[key]:.2f} / {m[key + '_disk']:.2f}" for source, key in keys.items()))


COMMANDS = {"profile": cmd_profile, "plan": cmd_plan, "compile": cmd_compile, "run": cmd_run,
            "eval": cmd_eval, "pareto": cmd_pareto, "demo": cmd_demo,
            "estimate": cmd_estimate}


def _quiet_transformers() -> None:
    """transformers' warnings and load reports stay off stderr (bad input is one line of mopeq's own);
    ``TRANSFORMERS_VERBOSITY=warning`` brings them back."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity(logging.get_verbosity() if os.environ["TRANSFORMERS_VERBOSITY"] != "error"
                              else logging.ERROR)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _quiet_transformers()
    start = time.time()
    try:
        COMMANDS[args.command](args)
    except InputError as exc:
        print(f"mopeq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable/unwritable files (permissions, a directory where a file was expected, disk full)
        print(f"mopeq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mopeq {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.command != "demo":
        print(f"done in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
