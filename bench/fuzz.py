"""Bounded fuzzing campaign over every reader of untrusted files.

Targets: the spec parser (``mopeq.planner.load_spec``), the profile and plan readers
(``mopeq.schemas.read_profile`` / ``read_plan``), the artifact loader (``mopeq.runtime.load.load``, then a
forward pass of what it accepted) and
image calibration folders (``images``: ``index.jsonl`` + PNG/JPEG/npy files, read by
``mopeq.profiler.calibration.read_qa_jsonl`` and ``load_rgb``, as ``--calib FOLDER`` reads them for
DeepSeek-VL2 and MolmoE), and source checkpoints (``checkpoint``: a damaged model directory compiled by
``mopeq.compiler.artifact.compile_artifact``, whose RTN runs the native kernel).
Inputs are mutations of valid seed files: bit flips, truncations, spliced bytes, line edits, and
structural edits of the parsed YAML/JSON (a value replaced by a hostile one, a key dropped); for
artifacts also rewritten safetensors headers, escaping shard names and symlinks, with the manifest's
checksums recomputed half the time so the mutation reaches the parsers behind the checksum check.

Each input runs in a worker process under a per-input time limit. Outcomes: ``accepted``,
``rejected`` (``InputError`` with a one-line message), ``traceback`` (any other exception, or an
empty / multi-line ``InputError``) and ``hang`` (over the limit; the worker is killed and restarted).

    OMP_NUM_THREADS=1 python bench/fuzz.py --inputs 10000 --minutes 4 --targets spec,profile,plan,artifact
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOSTILE = [None, True, False, 0, -1, 1, 2, 3, 5, 7, 8, 16, 2**31, 2**63, -2**63, 10**30, 1e308, -0.0, 0.5, 2.5,
           float("nan"), float("inf"), "", "x", "L0.E0", "L*.S*", "../../etc/passwd", "/etc/passwd", "\x00",
           "é" * 50, [], [1], [2, 3, 4], {}, {"a": 1}, [[[[[]]]]], "3.5 GB", "-5MB", "1e999"]
YAML_VALUES = ["-1", "0", "1e309", ".nan", ".inf", "null", "[]", "{}", "'x'", "true", "99999999999999999999",
               "*a", "&a [1, *a]", "!!python/object/apply:os.system ['echo pwned']", "!!binary AAAA", "x" * 5000,
               "[" * 200 + "]" * 200, "{a: {b: {c: [1, 2]}}}", "- 1\n- 2", "\"\\x00\"", "2.5", "[2, 3, 4, 8, 9]"]


# --- seed corpus --------------------------------------------------------------------------------------

def build_corpus(workdir: Path) -> dict[str, Path]:
    """Valid seed files: the shipped specs, a small profile and plan, and a compiled tiny artifact."""
    import torch

    from mopeq.compiler.artifact import compile_artifact
    from mopeq.demo.model import DemoConfig, DemoVLM, save_demo
    from mopeq.models import read_config, skeleton
    from mopeq.schemas import ExpertPlan, Plan, SolverReport, config_hash, write_plan

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = DemoConfig(hidden_size=32, num_hidden_layers=1, n_routed_experts=2, moe_intermediate_size=16,
                     vision_dim=16, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8,
                     num_attention_heads=2)
    model_dir = workdir / "model"
    save_demo(DemoVLM(cfg), model_dir)
    config = read_config(model_dir)
    refs = skeleton(config, model_dir).experts()
    plan = Plan(model_id="fuzz", family=config["model_type"], config_hash=config_hash(config), profile_sha256="0" * 64,
                spec={}, group_size=8, symmetric=False, experts={r.id: ExpertPlan(bits=(2, 3, 4)[i % 3], cluster=r.id)
                                                               for i, r in enumerate(refs)},
                layers={}, totals={}, solver=SolverReport(backend="test", status="optimal", objective=0.0, bound=0.0,
                                                          gap=0.0, seconds=0.0))
    write_plan(plan, workdir / "plan.json")
    compile_artifact(model_dir, plan, workdir / "artifact", progress=False)
    _write_profile(workdir / "profile.json")
    _write_images(workdir / "images")
    return {"spec": REPO / "specs" / "demo.yaml", "profile": workdir / "profile.json", "plan": workdir / "plan.json",
            "artifact": workdir / "artifact", "images": workdir / "images", "checkpoint": model_dir}


def _write_images(folder: Path) -> None:
    """A calibration folder: a PNG, a JPEG and an ``.npy`` image, and their ``index.jsonl``."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    pixels = (np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    Image.fromarray(pixels).save(folder / "b.jpg")
    np.save(folder / "c.npy", pixels)
    (folder / "index.jsonl").write_text("".join(json.dumps({"image": n, "question": "what?", "answer": "this"}) + "\n"
                                                for n in ("a.png", "b.jpg", "c.npy")))


def _write_profile(path: Path) -> None:
    from mopeq.schemas import ExpertNode, Profile, ProfileMeta, Trace, write_profile

    nodes = [ExpertNode(id=f"L0.E{j}", layer=0, expert=j, params=96, shapes={"gate": [4, 8], "up": [4, 8], "down": [8, 4]},
                        bytes={"2": 30, "4": 54}, bf16_bytes=192, tokens=10 * j, frequency=0.1 * j,
                        trace={"hessian-local": Trace(mean=1.0 + j)}, perturbation={"2": 0.5, "4": 0.1},
                        sensitivity={"hessian-local": {"2": 0.01, "4": 0.001}}) for j in range(3)]
    meta = ProfileMeta(model_id="fuzz", family="mopeq_demo_vlm", config_hash="0" * 16, calibration={"tokens": 30},
                       settings={"bits": [2, 4], "group_size": 8}, top_k=2)
    write_profile(Profile(meta=meta, experts=nodes, edges=[("L0.E0", "L0.E1", 0.5)]), path)


# --- mutators -------------------------------------------------------------------------------------------

def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def splice(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data) + 1)
    junk = rng.choice([os.urandom(0) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16))),
                       b"\xff\xfe", b"\x00" * 8, b"{", b"]", b"\n- ", b": ", b"\"", b"\\u0000"])
    return data[:at] + junk + data[at + rng.randint(0, 4):]


def edit_lines(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    kind = rng.randrange(3)
    if kind == 0:
        del lines[i]
    elif kind == 1:
        lines.insert(i, lines[rng.randrange(len(lines))])
    elif b":" in lines[i]:
        key = lines[i].split(b":", 1)[0]
        lines[i] = key + b": " + rng.choice(YAML_VALUES).encode()
    return b"\n".join(lines)


def mutate_tree(value, rng: random.Random, depth: int = 0):
    """Replace, drop or retype one node of a parsed JSON/YAML tree (returns a new tree)."""
    if isinstance(value, (dict, list)) and value and rng.random() < 0.75 and depth < 12:
        value = copy.copy(value)
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        k = rng.choice(keys)
        roll = rng.random()
        if roll < 0.1:
            del value[k]
        elif roll < 0.15 and isinstance(value, dict):
            value[rng.choice(["extra", "version", "bits", "weight_map", "shards", "plan", "nodes", "1e3"])] = \
                rng.choice(HOSTILE)
        else:
            value[k] = mutate_tree(value[k], rng, depth + 1)
        return value
    return rng.choice(HOSTILE)


def mutate_text(data: bytes, rng: random.Random, structured) -> bytes:
    """One mutation of a YAML/JSON file: structural (via ``structured``: load, dump) or byte-level."""
    roll = rng.random()
    if roll < 0.5 and structured is not None:
        load, dump = structured
        try:
            tree = load(data)
        except Exception:  # an earlier mutation already broke the syntax: mutate bytes instead
            tree = None
        if tree is not None:
            return dump(mutate_tree(tree, rng))
    return rng.choice([flip_bits, truncate, splice, edit_lines])(data, rng)


def _json_codec():
    return (lambda b: json.loads(b), lambda v: json.dumps(v, allow_nan=True).encode())


def _yaml_codec():
    import yaml

    return (lambda b: yaml.safe_load(b), lambda v: yaml.safe_dump(v, allow_unicode=True).encode())


# --- artifact mutations ----------------------------------------------------------------------------------

def mutate_artifact(src: Path, dst: Path, rng: random.Random) -> None:
    """Copy artifact ``src`` to ``dst`` and damage it once; half the time re-sign the manifest checksums."""
    shutil.copytree(src, dst, symlinks=True)
    shard = sorted(dst.glob("*.safetensors"))[0]
    kind = rng.choice(["shard_bytes", "shard_header", "shard_header", "tensor", "manifest", "config", "index",
                       "escape"])
    if kind in SHARD_DAMAGE:
        SHARD_DAMAGE[kind](shard, rng)
    elif kind == "escape":
        _escape(dst, shard, rng)
    else:
        name = {"manifest": "mopeq.json", "config": "config.json", "index": "model.safetensors.index.json"}[kind]
        path = dst / name
        path.write_bytes(mutate_text(path.read_bytes(), rng, _json_codec()))
        if kind == "config" and rng.random() < 0.5:
            _resign_config(dst)
    if rng.random() < 0.5:
        _resign_shards(dst)


def _mutate_header(shard: Path, rng: random.Random) -> None:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    roll = rng.random()
    if roll < 0.3:
        data = struct.pack("<Q", rng.choice([0, 1, n + 1, n - 1, 2**40, 2**64 - 1, len(data)])) + data[8:]
        shard.write_bytes(data)
        return
    header = mutate_tree(header, rng)
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _mutate_tensor(shard: Path, rng: random.Random) -> None:
    """Rewrite one tensor with another shape, dtype or values (a well-formed file with wrong content)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(shard))
    key = rng.choice(sorted(state))
    t = state[key]
    roll = rng.randrange(5)
    if roll == 0:
        state[key] = torch.zeros(t.numel() + 1, dtype=t.dtype)
    elif roll == 1:
        state[key] = t.to(rng.choice([torch.float32, torch.int64, torch.uint8, torch.int32, torch.float16]))
    elif roll == 2 and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30])
        state[key] = t
    elif roll == 3 and t.numel():
        t = t.clone()
        info = torch.finfo(t.dtype) if t.is_floating_point() else torch.iinfo(t.dtype)
        t.view(-1)[rng.randrange(t.numel())] = min(max(rng.choice([0, -1, 2**31 - 1, 7, 1000]), info.min), info.max)
        state[key] = t
    else:
        del state[key]
    save_file(state, str(shard), metadata={"format": "pt"})


def _damage_bytes(shard: Path, rng: random.Random) -> None:
    shard.write_bytes(rng.choice([flip_bits, truncate, splice])(shard.read_bytes(), rng))


SHARD_DAMAGE = {"shard_bytes": _damage_bytes, "shard_header": _mutate_header, "tensor": _mutate_tensor}


def _escape(dst: Path, shard: Path, rng: random.Random) -> None:
    outside = dst.parent / "outside.safetensors"
    shutil.copy(shard, outside)
    manifest = json.loads((dst / "mopeq.json").read_text())
    digest = manifest["shards"].pop(shard.name)
    name = rng.choice(["../outside.safetensors", str(outside), "link.safetensors", "sub/../../outside.safetensors"])
    if name == "link.safetensors":
        (dst / name).symlink_to(outside)
    manifest["shards"][name] = digest
    (dst / "mopeq.json").write_text(json.dumps(manifest))


def _resign_shards(dst: Path) -> None:
    from mopeq.schemas import sha256_file

    try:
        manifest = json.loads((dst / "mopeq.json").read_text())
        shards = manifest["shards"]
        for name in list(shards):
            if (dst / name).is_file() and not (dst / name).is_symlink():
                shards[name] = sha256_file(dst / name)
        (dst / "mopeq.json").write_text(json.dumps(manifest))
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        pass  # the manifest itself was mutated beyond re-signing; the loader sees it as it is


def _resign_config(dst: Path) -> None:
    from mopeq.schemas import config_hash

    try:
        config = json.loads((dst / "config.json").read_text())
        manifest = json.loads((dst / "mopeq.json").read_text())
        manifest["config_hash"] = config_hash(config)
        (dst / "mopeq.json").write_text(json.dumps(manifest))
    except (ValueError, TypeError, AttributeError):
        pass  # config no longer JSON or not an object: nothing to re-sign


# --- targets ----------------------------------------------------------------------------------------------

def mutate_checkpoint(src: Path, dst: Path, rng: random.Random) -> None:
    """Copy model directory ``src`` to ``dst`` and damage one shard or its config once."""
    shutil.copytree(src, dst)
    kind = rng.choice(["shard_bytes", "shard_header", "tensor", "tensor", "config"])
    if kind in SHARD_DAMAGE:
        SHARD_DAMAGE[kind](sorted(dst.glob("*.safetensors"))[0], rng)
    else:
        (dst / "config.json").write_bytes(mutate_text((dst / "config.json").read_bytes(), rng, _json_codec()))


def _compile_checkpoint(corpus, scratch: Path, rng: random.Random) -> None:
    """Compile a mutated source checkpoint; half the time the plan is re-made for its (mutated) config so the
    mutation gets past the config-hash check."""
    from mopeq.compiler.artifact import compile_artifact
    from mopeq.schemas import config_hash, read_plan

    mutate_checkpoint(corpus["checkpoint"], scratch / "model", rng)
    plan = read_plan(corpus["plan"])
    if rng.random() < 0.5:
        try:
            plan.config_hash = config_hash(json.loads((scratch / "model" / "config.json").read_text()))
        except (ValueError, TypeError, AttributeError):
            pass  # config no longer a JSON object: the compiler sees it as it is
    compile_artifact(scratch / "model", plan, scratch / "out", progress=False)


def run_one(target: str, corpus: dict[str, Path], rng: random.Random, scratch: Path) -> None:
    """Build one mutated input for ``target`` under ``scratch`` and feed it to the reader."""
    if target == "checkpoint":
        _compile_checkpoint(corpus, scratch, rng)
        return
    if target == "artifact":
        from mopeq.runtime.load import load

        import torch

        mutate_artifact(corpus["artifact"], scratch / "artifact", rng)
        qmodel = load(scratch / "artifact")
        with torch.no_grad():  # what was accepted must also run: the experts dequantize natively on CPU
            qmodel.model(input_ids=torch.tensor([[1, 2, 3, 4]]))
        return
    if target == "images":
        _read_images(corpus["images"], scratch / "images", rng)
        return
    from mopeq.planner import load_spec
    from mopeq.schemas import read_plan, read_profile

    reader, codec = {"spec": (load_spec, _yaml_codec()), "profile": (read_profile, _json_codec()),
                     "plan": (read_plan, _json_codec())}[target]
    data = corpus[target].read_bytes()
    for _ in range(rng.choice([1, 1, 2, 3])):
        data = mutate_text(data, rng, codec) if data else data
    path = scratch / corpus[target].name
    path.write_bytes(data)
    reader(path)


def _read_images(src: Path, dst: Path, rng: random.Random) -> None:
    """Mutate one file of a calibration folder (an image's bytes, or the index) and read every record."""
    from mopeq.profiler.calibration import load_rgb, read_qa_jsonl

    shutil.copytree(src, dst)
    victim = dst / rng.choice(["a.png", "b.jpg", "c.npy", "index.jsonl"])
    data = victim.read_bytes()
    for _ in range(rng.choice([1, 1, 2, 3])):
        data = mutate_text(data, rng, _json_codec() if victim.suffix == ".jsonl" else None) if data else data
    victim.write_bytes(data)
    for where, record in read_qa_jsonl(dst / "index.jsonl"):
        load_rgb(dst / record["image"], where).size


def classify(target: str, corpus, seed: int, scratch: Path) -> tuple[str, str]:
    """``(outcome, detail)`` of input ``seed`` of ``target``."""
    from mopeq.schemas import InputError

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        run_one(target, corpus, random.Random(f"{target}-{seed}"), scratch)
    except InputError as exc:
        msg = str(exc)
        if not msg.strip() or "\n" in msg:
            return "traceback", f"unclear InputError: {msg!r}"
        return "rejected", msg
    except Exception:  # the campaign's job: count anything that is not a clean rejection
        return "traceback", "".join(traceback.format_exc(limit=-3).splitlines(keepends=True)[-8:])
    return "accepted", ""


def _worker(conn, target: str, corpus, scratch: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    while True:
        seed = conn.recv()
        if seed is None:
            return
        conn.send(classify(target, corpus, seed, scratch))


class Campaign:
    """Feeds seeds to a worker process; a seed that overruns ``limit_s`` is a hang (worker restarted)."""

    def __init__(self, target: str, corpus, scratch: Path, limit_s: float):
        self.target, self.corpus, self.scratch, self.limit_s = target, corpus, scratch, limit_s
        self.ctx = mp.get_context("fork")
        self.proc = None

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.target, self.corpus, self.scratch), daemon=True)
        self.proc.start()

    def run(self, seed: int) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(seed)
        if self.conn.poll(self.limit_s):
            try:
                return self.conn.recv()
            except EOFError:
                self.proc = None
                return "traceback", "worker died"
        self.proc.kill()
        self.proc.join()
        self.proc = None
        return "hang", f"over {self.limit_s} s"

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(5)


def campaign(target: str, corpus, scratch: Path, inputs: int, seconds: float, limit_s: float,
             first_seed: int = 0) -> dict:
    """Run up to ``inputs`` inputs (or until ``seconds`` pass) and count outcomes."""
    counts, failures = Counter(), []
    runner = Campaign(target, corpus, scratch, limit_s)
    start = time.time()
    try:
        for seed in range(first_seed, first_seed + inputs):
            if time.time() - start > seconds:
                break
            outcome, detail = runner.run(seed)
            counts[outcome] += 1
            if outcome in ("traceback", "hang") and len(failures) < 20:
                failures.append({"seed": seed, "outcome": outcome, "detail": detail})
    finally:
        runner.close()
    return {"target": target, "inputs": sum(counts.values()), "accepted": counts["accepted"],
            "rejected": counts["rejected"], "tracebacks": counts["traceback"], "hangs": counts["hang"],
            "seconds": round(time.time() - start, 1), "failures": failures}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="spec,profile,plan,artifact,images,checkpoint")
    p.add_argument("--inputs", type=int, default=10000, help="most inputs per target (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=4.0, help="most minutes per target (default: %(default)s)")
    p.add_argument("--limit-s", type=float, default=10.0, help="per-input time limit (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first input seed (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp) / "corpus")
        for target in args.targets.split(","):
            r = campaign(target, corpus, Path(tmp) / f"scratch-{target}", args.inputs, 60 * args.minutes,
                         args.limit_s, args.seed)
            reports.append(r)
            print(f"{target:9s} inputs {r['inputs']:6d}  accepted {r['accepted']:6d}  rejected {r['rejected']:6d}  "
                  f"tracebacks {r['tracebacks']}  hangs {r['hangs']}  ({r['seconds']} s)", flush=True)
            for f in r["failures"][:5]:
                print(f"  seed {f['seed']} {f['outcome']}: {f['detail'][-1500:]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
    return 0 if all(r["tracebacks"] == 0 and r["hangs"] == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
