"""Write a quantized artifact from a checkpoint directory and a plan, streaming and atomically.

Layout of ``ARTIFACT_DIR``::

    model-00001-of-0000N.safetensors ...   expert matrices packed, everything else as in the source
    model.safetensors.index.json           weight_map
    config.json                            the source config + a compressed-tensors quantization_config
    mopeq.json                             the plan, sha256 of every shard, versions
    tokenizer / processor files            copied

Each planned expert matrix ``P`` (e.g. ``...mlp.experts.3.gate_proj``) becomes ``P.weight_packed``
(int32), ``P.weight_scale``, ``P.weight_zero_point`` (uint8, asymmetric only) and ``P.weight_shape``
(int64 ``[out, in]``). The source is read one shard at a time (headers checked, expert tensors mapped
zero-copy, everything else copied byte for byte in the kernel); each output shard's layout is fixed
up front and filled front to back while a background thread hashes it; everything is written under
a temporary directory renamed into place at the end.

Quantizers: ``rtn`` (group-wise round-to-nearest, ``compiler/quantize.py``) or ``gptq`` (error
compensation from each expert's routed-input Gram, ``compiler/gptq.py``; the Grams come from a
``grams.safetensors`` file written by ``mopeq.profiler.gram``). The manifest records which, with its
settings and the Gram file's sha256.

Target ``vllm`` (``plan.spec["target"] == "vllm"``): the plan is checked against what stock vLLM's
compressed-tensors fused-MoE loader accepts (``check_vllm``) before anything is written.

Determinism: the same source, plan, quantizer and Gram file give a byte-identical artifact (no
timestamps; the manifest's versions are those of the installed packages).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..models import read_config, resolve_dir, skeleton
from ..models.base import DiskTensor, ExpertRef
from ..safety import check_safetensors, checkpoint_shards
from ..schemas import InputError, Plan, plan_record, config_hash, sha256_file
from .gptq import GPTQSettings, GramFile, Quantizer, gptq_quantize
from .pack import pack_int32, packed_words
from .quantize import NonFiniteWeights, QuantizedWeight, check_finite, num_groups, quantize, quantize_packed

ARTIFACT_VERSION = 1
MANIFEST = "mopeq.json"
SKIP_FILES = {"config.json", "model.safetensors.index.json", MANIFEST}
VLLM_BITS = (4, 8)
VLLM_GROUP_SIZE = 128


@dataclass
class Job:
    """One expert matrix to quantize: where it is on disk and what it becomes."""

    ref: ExpertRef
    matrix: str
    source: DiskTensor
    name: str  # artifact prefix, e.g. "language.model.layers.0.mlp.experts.3.gate_proj"
    bits: int
    shape: tuple[int, int] | None = None  # [out, in] the config implies; checked against the checkpoint


def source_shards(directory: Path) -> dict[str, Path]:
    """tensor name -> shard file of a safetensors checkpoint (single file or index).

    Shard names must stay inside ``directory`` and every header is checked against its file size
    (``mopeq.safety``) before any tensor is read.
    """
    return checkpoint_shards(directory)


def plan_jobs(plan: Plan, adapter, keys: set[str]) -> dict[str, list[Job]]:
    """Source tensor name -> the expert matrices to cut from it."""
    jobs: dict[str, list[Job]] = defaultdict(list)
    known = {ref.id: ref for ref in adapter.experts()}
    for expert_id, choice in plan.experts.items():
        if expert_id not in known:
            raise InputError(f"plan: expert {expert_id} does not exist in this model")
        ref = known[expert_id]
        for matrix, src in adapter.disk_tensors(ref, keys).items():
            if src.key not in keys:
                raise InputError(f"checkpoint: tensor {src.key} (expert {expert_id}) not found")
            shape = tuple(adapter.expert_weights(ref)[matrix].shape)
            jobs[src.key].append(Job(ref, matrix, src, adapter.packed_name(ref, matrix), choice.bits, shape))
    return jobs


@dataclass
class MatrixQuantizer:
    """The quantizer a compile uses: RTN, or GPTQ with Grams read lazily from a file."""

    method: Quantizer = Quantizer.RTN
    grams: GramFile | None = None
    settings: GPTQSettings = GPTQSettings()

    def __call__(self, job: "Job", w: torch.Tensor, plan: Plan, scale_dtype: torch.dtype) -> QuantizedWeight:
        if self.method == Quantizer.RTN:
            return quantize(w, job.bits, plan.group_size, plan.symmetric, plan.clip_search, scale_dtype)
        gram = self.grams.gram(job.ref.id, job.matrix)
        return gptq_quantize(w.float(), gram, job.bits, plan.group_size, plan.symmetric, plan.clip_search,
                             self.grams.tokens.get(job.ref.id, 0), self.settings, scale_dtype)

    def describe(self) -> dict:
        out = {"method": self.method.value}
        if self.method == Quantizer.GPTQ:
            out.update(self.settings.to_dict(), grams_sha256=sha256_file(self.grams.path),
                       weighting=self.grams.meta.get("weighting"))
        return out


def make_quantizer(method: str = "rtn", grams: Path | None = None, settings: GPTQSettings = GPTQSettings(),
                   config_hash_: str | None = None) -> MatrixQuantizer:
    """``rtn``, or ``gptq`` (needs ``grams``: a ``grams.safetensors`` from ``mopeq.profiler.gram``)."""
    try:
        method = Quantizer(method)
    except ValueError:
        raise InputError(f"quantizer: got {method!r}, expected one of {[q.value for q in Quantizer]}") from None
    if method == Quantizer.RTN:
        return MatrixQuantizer()
    if grams is None:
        raise InputError("quantizer gptq: needs a Gram file (--grams grams.safetensors, or --calib to collect one)")
    gram_file = GramFile(grams)
    if config_hash_ is not None:
        gram_file.check_model(config_hash_)
    return MatrixQuantizer(method, gram_file, settings)


def quantize_job(job: Job, tensor: torch.Tensor, plan: Plan,
                 quantizer: MatrixQuantizer | None = None) -> dict[str, torch.Tensor]:
    w = _take(job, tensor)
    scale_dtype = _scale_dtype(tensor.dtype)
    quantizer = quantizer or MatrixQuantizer()
    try:
        if quantizer.method == Quantizer.RTN:  # the same bits as quantize + pack_int32, without [N, K] temporaries
            packed, scale, zero = quantize_packed(w, job.bits, plan.group_size, plan.symmetric, plan.clip_search,
                                                  scale_dtype)
        else:
            qw = quantizer(job, w, plan, scale_dtype)
            check_finite(qw.scale, scale_dtype)
            packed, scale, zero = pack_int32(qw.codes, job.bits), qw.scale, qw.zero
    except NonFiniteWeights as e:
        raise InputError(f"checkpoint: tensor {job.source.key} (expert {job.ref.id}, {job.matrix}): {e}; "
                         f"expected finite weights") from None
    out = {
        f"{job.name}.weight_packed": packed,
        f"{job.name}.weight_scale": scale.contiguous(),
        f"{job.name}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }
    if zero is not None:
        out[f"{job.name}.weight_zero_point"] = zero.contiguous()
    return out


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def job_outputs(job: Job, dtype: torch.dtype, shape: list[int], plan: Plan) -> list[tuple[str, str, list[int]]]:
    """``(name, safetensors dtype, shape)`` of what ``quantize_job`` makes from a source tensor, in its order.

    Checks the source shape and dtype the way ``quantize_job`` does (on a meta tensor, no data read).
    """
    n, k = _take(job, torch.empty(shape, dtype=dtype, device="meta")).shape
    g = num_groups(k, min(plan.group_size, k))
    out = [(f"{job.name}.weight_packed", "I32", [n, packed_words(k, job.bits)]),
           (f"{job.name}.weight_scale", ST_DTYPES[_scale_dtype(dtype)], [n, g]),
           (f"{job.name}.weight_shape", "I64", [2])]
    if not plan.symmetric:
        out.append((f"{job.name}.weight_zero_point", "U8", [n, g]))
    return out


def _take(job: Job, tensor: torch.Tensor) -> torch.Tensor:
    """The expert matrix ``job`` cuts from ``tensor``, refused when the checkpoint disagrees with the config."""
    try:
        w = job.source.take(tensor)
    except IndexError:
        w = None
    if w is None or (job.shape is not None and tuple(w.shape) != job.shape) or w.dim() != 2:
        raise InputError(f"checkpoint: tensor {job.source.key} has shape {tuple(tensor.shape)}; config.json implies "
                         f"expert matrix {job.ref.id}.{job.matrix} of shape {job.shape}")
    if not w.is_floating_point():
        raise InputError(f"checkpoint: tensor {job.source.key} is {w.dtype}, expected floating-point weights")
    return w


def shard_name(i: int, count: int) -> str:
    """File name of output shard ``i`` (0-based) of ``count``."""
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def rename_shards(directory: Path, shards: list[tuple[Path, list[str]]]) -> dict[str, str]:
    """Rename finished shards to ``model-0000K-of-0000N.safetensors``; return tensor name -> file."""
    weight_map = {}
    for i, (path, names) in enumerate(shards):
        final = shard_name(i, len(shards))
        path.rename(directory / final)
        weight_map.update({n: final for n in names})
    return weight_map


ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
ST_METADATA = {"format": "pt"}


def safetensors_header(tensors: list[tuple[str, str, list[int]]], metadata: dict | None = None) -> tuple[bytes, dict]:
    """A safetensors header for ``(name, dtype, shape)`` tensors stored in that order, and each tensor's
    data offset: 8-byte little-endian length, compact JSON, space padding to 8 bytes, as
    ``safetensors.torch.save_file`` writes it (which stores tensors by dtype, then name; readers take
    every offset from the header, so any order is valid).
    """
    header, offsets, pos = ({"__metadata__": metadata} if metadata else {}), {}, 0
    for name, dtype, shape in tensors:
        end = pos + ST_BYTES[dtype] * _numel(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, end]}
        offsets[name], pos = pos, end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


# safetensors dtype names; ``save_file`` stores a file's tensors by this list (last first), then by name,
# which puts every tensor at a multiple of its element size.
ST_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32",
            "F32", "F64", "I64", "U64"]


def _save_file_order(spec: tuple[str, str, list[int]]):
    return -ST_ORDER.index(spec[1]), spec[0].encode()


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


class _ShardHash:
    """sha256 of one shard, fed region by region in file order (on the writer's hashing thread); the file
    and the read buffer are released after the last region."""

    def __init__(self, path: Path, header: bytes):
        self.path, self.sha, self.fd, self.buffer = path, hashlib.sha256(header), None, None

    def update(self, offset: int, nbytes: int, last: bool = False) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
            self.buffer = bytearray(min(max(nbytes, 1), 8 << 20))
        view = memoryview(self.buffer)
        while nbytes:
            got = os.preadv(self.fd, [view[: min(nbytes, len(view))]], offset)
            if got <= 0:
                raise OSError(f"compile: {self.path} ends before its header says")
            self.sha.update(view[:got])
            offset, nbytes = offset + got, nbytes - got
        if last:
            self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.buffer = None, None

    def hexdigest(self) -> str:
        self.release()
        return self.sha.hexdigest()


class StreamingShardWriter:
    """Shard writer for a layout known up front: no shard is ever held in memory.

    ``tensors`` lists every output ``(name, dtype, shape)`` in the order they will arrive, and they
    must arrive in that order. Shards are cut greedily (a shard closes when the next tensor would take
    it past ``max_bytes``); each shard's header is written first and every tensor's bytes follow in
    arrival order (``add``, or ``copy`` straight from a source file), so a shard fills front to back.

    Every tensor starts at a multiple of its element size (as ``save_file`` guarantees by storing
    tensors by dtype): a shard whose arrival order would misalign one (an odd-sized uint8 zero point
    before an int32 tensor, say) is laid out in ``save_file``'s dtype order instead.

    Writes happen in the caller's thread; the sha256 of each finished region is computed on one
    background thread that reads it back from the page cache, in file order, while the caller goes
    on quantizing (``sha256`` after ``finish``); a dtype-ordered shard is hashed once it is complete.
    Moving the writes to that thread as well measured slower: the GIL hand-offs cost the quantizer's
    many short torch calls more than the writes take. ``drain`` waits for the hashing; a failed read
    is raised by the next call.
    """

    HASH_CHUNK = 8 << 20  # bytes written before a region is handed to the hashing thread

    def __init__(self, directory: Path, max_bytes: int, tensors: list[tuple[str, str, list[int]]]):
        self.directory = directory
        groups, size = [], 0
        for spec in tensors:
            nbytes = ST_BYTES[spec[1]] * _numel(spec[2])
            if not groups or (groups[-1] and size + nbytes > max_bytes):
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += nbytes
        self.shards: list[tuple[Path, list[str]]] = []
        self.where: dict[str, tuple[int, str, list[int], int, int]] = {}  # name -> shard, dtype, shape, offset, bytes
        self.order = [spec[0] for spec in tensors]
        self.next = 0
        self.left: list[int] = []
        self.digests: list[_ShardHash] = []
        self.in_order: list[bool] = []  # data in arrival order (hashed as it fills) or dtype order
        self.data_span: list[tuple[int, int]] = []  # (first data byte, size in bytes) of each shard
        for i, group in enumerate(groups):
            path = directory / f"shard-{i:05d}.tmp"
            header, offsets = safetensors_header(group, ST_METADATA)
            aligned = all(offsets[name] % ST_BYTES[dtype] == 0 for name, dtype, _ in group)
            if not aligned:
                header, offsets = safetensors_header(sorted(group, key=_save_file_order), ST_METADATA)
            self.in_order.append(aligned)
            self.data_span.append((len(header), sum(ST_BYTES[d] * _numel(s) for _, d, s in group)))
            for name, dtype, shape in group:
                self.where[name] = (i, dtype, list(shape), len(header) + offsets[name],
                                    ST_BYTES[dtype] * _numel(shape))
            self.shards.append((path, sorted(n for n, _, _ in group)))
            self.left.append(len(group))
            self.digests.append(_ShardHash(path, header))
            with open(path, "wb") as f:
                f.write(header)
                f.truncate(sum(self.data_span[-1]))
        self.fds: dict[int, int] = {}
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="mopeq-sha256")
        self.queued: deque[Future] = deque()
        self.error: BaseException | None = None
        self.unhashed: dict[int, tuple[int, int]] = {}  # shard -> written region not yet hashed
        self.sha256: dict[str, str] = {}  # final shard name -> hex digest, filled by ``finish``

    def _slot(self, name: str) -> tuple[int, int, int]:
        if self.error is not None:
            raise self.error
        if name not in self.where:
            raise RuntimeError(f"compile: tensor {name} was not in the planned layout (or written twice)")
        if self.order[self.next] != name:
            raise RuntimeError(f"compile: tensor {name} arrived out of the planned order "
                               f"(expected {self.order[self.next]})")
        self.next += 1
        shard, dtype, shape, offset, nbytes = self.where.pop(name)
        if shard not in self.fds:
            self.fds[shard] = os.open(self.shards[shard][0], os.O_WRONLY)
        return shard, offset, nbytes

    def _hash(self, shard: int, offset: int, nbytes: int, last: bool = False) -> None:
        self.queued.append(self.hasher.submit(self._guard, self.digests[shard].update, offset, nbytes, last))
        while self.queued and self.queued[0].done():
            self.queued.popleft()

    def _guard(self, fn, *args) -> None:
        if self.error is None:
            try:
                fn(*args)
            except BaseException as e:  # kept for the main thread: raised by its next call
                self.error = e

    def _done(self, shard: int, offset: int, nbytes: int) -> None:
        self.left[shard] -= 1
        last = not self.left[shard]
        if not self.in_order[shard]:  # dtype order: the file fills out of order, hash it whole at the end
            if last:
                self._hash(shard, *self.data_span[shard], True)
        else:
            start, size = self.unhashed.get(shard, (offset, 0))
            size += nbytes
            if size >= self.HASH_CHUNK or last:
                self._hash(shard, start, size, last)
                start, size = start + size, 0
            self.unhashed[shard] = (start, size)
        if last:
            os.close(self.fds.pop(shard))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.where.get(name)
        if spec is not None and (ST_DTYPES.get(tensor.dtype) != spec[1] or list(tensor.shape) != spec[2]):
            raise RuntimeError(f"compile: tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                               f"planned {spec[1]} {spec[2]}")
        shard, offset, nbytes = self._slot(name)
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        _pwrite_all(self.fds[shard], data, offset)
        self._done(shard, offset, nbytes)

    def copy(self, name: str, src_fd: int, src_offset: int) -> None:
        """Copy ``name``'s bytes from an open file, in the kernel where it can (``copy_file_range``)."""
        shard, offset, nbytes = self._slot(name)
        _copy_range(name, src_fd, src_offset, self.fds[shard], offset, nbytes)
        self._done(shard, offset, nbytes)

    def drain(self) -> None:
        """Wait until every region handed over is hashed; raise the first read error."""
        while self.queued:
            self.queued.popleft().result()
        if self.error is not None:
            raise self.error

    def finish(self) -> dict[str, str]:
        """Rename shards to ``model-0000K-of-0000N.safetensors``; return the weight map."""
        if self.where:
            raise RuntimeError(f"compile: {len(self.where)} planned tensors never written, e.g. {next(iter(self.where))}")
        self.drain()
        digests = [d.hexdigest() for d in self.digests]
        weight_map = rename_shards(self.directory, self.shards)
        self.sha256 = {shard_name(i, len(digests)): d for i, d in enumerate(digests)}
        return weight_map

    def close(self) -> None:
        """Stop the hashing thread and close every descriptor (also after an error)."""
        self.hasher.shutdown(wait=True, cancel_futures=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        for digest in self.digests:
            digest.release()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _copy_range(name: str, src_fd: int, src_offset: int, fd: int, offset: int, nbytes: int) -> None:
    """Copy bytes between files, in the kernel where it can (``copy_file_range``)."""
    while nbytes:
        try:
            done = os.copy_file_range(src_fd, fd, nbytes, src_offset, offset)
        except (AttributeError, OSError):
            done = os.pwrite(fd, os.pread(src_fd, min(nbytes, 64 << 20), src_offset), offset)
        if done <= 0:
            raise OSError(f"compile: short copy of tensor {name}")
        nbytes, src_offset, offset = nbytes - done, src_offset + done, offset + done


def check_vllm(plan: Plan, jobs: dict[str, list[Job]], adapter) -> None:
    """Refuse a plan stock vLLM's compressed-tensors fused-MoE loader would reject (rules in tests/compiler)."""
    if plan.spec.get("target") != "vllm":
        return
    if not plan.symmetric or plan.group_size != VLLM_GROUP_SIZE:
        raise InputError(f"plan: target vllm needs symmetric quantization with group size {VLLM_GROUP_SIZE}, "
                         f"got symmetric={plan.symmetric}, group_size={plan.group_size}")
    by_layer: dict[int, set[int]] = defaultdict(set)
    for job in (j for js in jobs.values() for j in js):
        if job.bits not in VLLM_BITS:
            raise InputError(f"plan: target vllm allows bits {VLLM_BITS}, expert {job.ref.id} has {job.bits}")
        if not job.ref.shared:
            by_layer[job.ref.layer].add(job.bits)
        k = adapter.expert_weights(job.ref)[job.matrix].shape[1]
        if k % VLLM_GROUP_SIZE:
            raise InputError(f"plan: target vllm needs input dims divisible by {VLLM_GROUP_SIZE}; "
                             f"{job.name} has {k}")
    for layer, widths in sorted(by_layer.items()):
        if len(widths) > 1:
            raise InputError(f"plan: target vllm needs one bit width per layer; layer {layer} mixes {sorted(widths)}")


def quantization_config(plan: Plan, jobs: dict[str, list[Job]], ignore: list[str] | None = None) -> dict:
    """compressed-tensors style: one config group per bit width, targets are module names."""
    targets: dict[int, list[str]] = defaultdict(list)
    for job in (j for js in jobs.values() for j in js):
        targets[job.bits].append(job.name)
    groups = {
        f"group_{bits}bit": {
            "targets": sorted(names),
            "weights": {"num_bits": bits, "type": "int", "symmetric": plan.symmetric, "strategy": "group",
                        "group_size": plan.group_size, "dynamic": False, "actorder": None},
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
        for bits, names in sorted(targets.items())
    }
    return {"quant_method": "compressed-tensors", "format": "mixed-precision" if len(groups) > 1 else "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups, "ignore": sorted(ignore or []),
            "mopeq": {"version": ARTIFACT_VERSION, "layout": "int32 little-endian, LSB-first along input dim"}}


def compile_artifact(model: str | Path, plan: Plan, output: Path, overwrite: bool = False,
                     max_shard_bytes: int = 2 << 30, progress: bool = True,
                     quantizer: MatrixQuantizer | None = None) -> Path:
    """Quantize and pack every planned expert of ``model`` into ``output``. Returns ``output``.

    Example: ``compile_artifact("demo", plan, Path("out"), quantizer=make_quantizer("gptq", grams))``.
    """
    quantizer = quantizer or MatrixQuantizer()
    directory = resolve_dir(model)
    config = read_config(directory)
    if config_hash(config) != plan.config_hash:
        raise InputError(f"plan was made for another model (config hash {plan.config_hash}, "
                         f"{directory} has {config_hash(config)}); re-run `mopeq profile` and `mopeq plan`")
    output = check_output(output, overwrite, directory)
    adapter = skeleton(config, directory)
    shard_of = source_shards(directory)
    jobs = plan_jobs(plan, adapter, set(shard_of))
    check_vllm(plan, jobs, adapter)
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map, ignore, digests = _write_tensors(shard_of, jobs, plan, tmp, max_shard_bytes, progress, quantizer)
        _write_metadata(tmp, directory, config, plan, jobs, weight_map, ignore, quantizer, digests)
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def check_output(output: Path, overwrite: bool, source: Path) -> Path:
    """The artifact folder ``output`` as an absolute path, or a one-line ``InputError``: it must have a name, must
    not hold (or be inside) the model being read, and ``--overwrite`` replaces only a folder holding a mopeq
    artifact (its ``mopeq.json``) or an empty one, never a user's other files."""
    out = Path(os.path.abspath(output))
    if out.name in ("", ".", ".."):
        raise InputError(f"-o {output}: not a folder name an artifact can be written to; give a new folder, e.g. "
                         f"{Path(output) / 'artifact'}")
    real, src = out.resolve(), Path(source).resolve()
    if real == src or real in src.parents or src in real.parents:
        raise InputError(f"-o {output}: is or overlaps the model being read ({source}); write the artifact elsewhere")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"{output}: already exists (pass --overwrite to replace it)")
        if not out.is_dir() or out.is_symlink():
            raise InputError(f"{output}: not a folder; --overwrite replaces only a mopeq artifact folder")
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise InputError(f"{output}: not a mopeq artifact (no {MANIFEST}); --overwrite replaces only a folder "
                             f"mopeq wrote; move its files away or choose another -o")
    return out


def _replace(tmp: Path, output: Path) -> None:
    """Rename ``tmp`` to ``output``; an existing ``output`` is moved aside first and removed after."""
    old = output.with_name(f".{output.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def _write_tensors(shard_of, jobs, plan, tmp: Path, max_shard_bytes: int, progress: bool,
                   quantizer: MatrixQuantizer) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Stream every source tensor into the output shards; returns the weight map, the unquantized 2-D
    modules and the sha256 of every output shard.

    The output layout is computed from the source headers before anything is quantized; unquantized
    tensors are copied byte for byte (never decoded), expert tensors are read zero-copy from a private
    mapping of their shard, one source tensor at a time.
    """
    ignore = []
    by_shard: dict[Path, list[str]] = defaultdict(list)
    for key, path in shard_of.items():
        by_shard[path].append(key)
    sources, layout = [], []
    for path in sorted(by_shard):
        header = check_safetensors(path)
        with open(path, "rb") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
        keys = sorted(by_shard[path], key=_natural)
        sources.append((path, start, header, keys))
        for key in keys:
            entry = header[key]
            if key in jobs:
                dtype = TORCH_DTYPES.get(entry["dtype"])
                if dtype is None or not dtype.is_floating_point:
                    raise InputError(f"checkpoint: tensor {key} is {entry['dtype']}, expected floating-point weights")
                for job in jobs[key]:
                    layout += job_outputs(job, dtype, entry["shape"], plan)
            else:
                layout.append((key, entry["dtype"], entry["shape"]))
                if len(entry["shape"]) == 2 and key.endswith(".weight"):
                    ignore.append(key[: -len(".weight")])
    writer = StreamingShardWriter(tmp, max_shard_bytes, layout)
    bar = tqdm(total=len(shard_of), desc="compile", unit="tensor", disable=not progress)
    try:
        for path, start, header, keys in sources:
            with open(path, "rb") as f:
                _stream_source(f, start, header, keys, jobs, plan, quantizer, writer, bar)
        weight_map = writer.finish()
    finally:
        writer.close()
        bar.close()  # also before an error is printed: the message gets its own line
    return weight_map, ignore, writer.sha256


def _stream_source(f, start: int, header: dict, keys: list[str], jobs, plan: Plan, quantizer: MatrixQuantizer,
                   writer: StreamingShardWriter, bar) -> None:
    """Quantize or copy every tensor of one open source shard into ``writer``."""
    mapped = None
    for key in keys:
        begin, end = header[key]["data_offsets"]
        if key in jobs:
            if mapped is None:  # private and read-only in use: pages stay file-backed
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            entry = header[key]
            dtype = TORCH_DTYPES[entry["dtype"]]
            tensor = torch.frombuffer(mapped, dtype=dtype, count=_numel(entry["shape"]),
                                      offset=start + begin).view(entry["shape"]) \
                if end > begin else torch.empty(entry["shape"], dtype=dtype)
            for job in jobs[key]:
                for name, t in quantize_job(job, tensor, plan, quantizer).items():
                    writer.add(name, t)
            del tensor
        else:
            writer.copy(key, f.fileno(), start + begin)
        bar.update()


def _natural(key: str):
    """Sort key with numeric parts in number order (``layers.2`` before ``layers.10``); any two keys compare."""
    return [(0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p) for p in key.split(".")]


def _write_metadata(tmp: Path, source: Path, config: dict, plan: Plan, jobs, weight_map: dict,
                    ignore: list[str], quantizer: MatrixQuantizer, digests: dict[str, str]) -> None:
    config = dict(config, quantization_config=quantization_config(plan, jobs, ignore))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for extra in source.iterdir():
        if extra.is_file() and extra.name not in SKIP_FILES and not extra.name.endswith(".safetensors") \
                and (extra.suffix in (".json", ".txt", ".model", ".jinja") or extra.name.startswith("tokenizer")):
            shutil.copy2(extra, tmp / extra.name)
    shards = sorted(set(weight_map.values()))
    manifest = {"version": ARTIFACT_VERSION, "config_hash": plan.config_hash, "plan": plan_record(plan),
                "shards": {s: digests[s] for s in shards},
                "versions": _versions(), "source_config_hash": config_hash(config),
                "quantizer": quantizer.describe()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n")


def _versions() -> dict:
    import safetensors

    from .. import __version__

    return {"mopeq": __version__, "torch": torch.__version__.split("+")[0], "safetensors": safetensors.__version__}
