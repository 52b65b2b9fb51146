"""Streaming merge: a saved 4-bit checkpoint + a PEFT LoRA adapter -> a merged checkpoint, one tensor at a time.

The in-memory merge (dequantize the whole model, ``merge_and_unload``, ``save_pretrained``) holds
the whole model in fp32 in host memory, twice over while the plain model is built: about 64 GB
for an 8B model. This module holds one output shard plus the tensor being processed. For each
output tensor it reads the 4-bit checkpoint's tensors with ``safe_open``, dequantizes 4-bit
weights in fp32 with bitsandbytes exactly as :func:`loraflow.ml.models.dequantize` does, adds
``(B @ A) * scaling`` in fp32 for each module the adapter targets (peft's own merge arithmetic),
casts to the output dtype, and writes safetensors shards of bounded size with the standard
``model.safetensors.index.json``, a ``config.json`` without ``quantization_config`` and the
generation config, so that ``from_pretrained`` loads the result as a plain model.

ML core: torch, safetensors, transformers and bitsandbytes only (no Prefect, MLflow or datasets).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from loraflow.errors import StageError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
# bitsandbytes serializes a 4-bit weight as "<name>" (packed uint8) beside "<name>.absmax",
# "<name>.quant_map", "<name>.nested_absmax", "<name>.nested_quant_map" and
# "<name>.quant_state.bitsandbytes__<nf4|fp4>" (the non-tensor fields, JSON packed into uint8):
# see QuantState.as_dict(packed=True) in bitsandbytes/functional.py.
QUANT_STATE_MARK = ".quant_state.bitsandbytes__"
# PEFT saves "base_model.model.<module>.lora_A.weight" (the adapter name is stripped).
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# peft adapter_config.json options whose model is more than W + (B @ A) * scaling (LoRA variants, extra
# trained tensors, changed layers): refused rather than merged wrongly.
UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "kasa_config",
    "monteclora_config",
    "use_qalora",
)
SAFETENSORS_FLOAT = {"F16", "BF16", "F32", "F64"}
SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


@dataclass(frozen=True)
class StreamMergeResult:
    """What :func:`stream_merge` wrote."""

    path: str
    files: list[str]  # weight files, in order
    tensors: int
    adapted_modules: int
    total_bytes: int  # tensor bytes over all shards (headers excluded)
    largest_shard_bytes: int


@dataclass(frozen=True)
class _Lora:
    a: str  # adapter tensor keys
    b: str
    scaling: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class _Entry:
    """One output tensor and how to make it."""

    name: str
    shape: tuple[int, ...]
    nbytes: int  # in the output dtype
    quantized: bool
    sources: tuple[str, ...]  # checkpoint keys it is built from
    lora: _Lora | None = None


class _Tensors:
    """Tensors of safetensors files, read a few at a time.

    ``safe_open`` maps a file into memory, and every page read through an open handle stays in the
    process's resident set until the handle closes. So each read opens and closes its file (a
    header parse, well under a millisecond), which keeps the input out of the resident set.
    """

    def __init__(self, file_of: dict[str, Path]):
        self.file_of = file_of

    @classmethod
    def of_checkpoint(cls, folder: Path) -> _Tensors:
        index = folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls({k: folder / f for k, f in weight_map.items()})
        if not (folder / WEIGHTS).is_file():
            raise StageError(f"{folder} holds neither {WEIGHTS} nor {INDEX}: not a safetensors checkpoint.")
        return cls.of_file(folder / WEIGHTS)

    @classmethod
    def of_file(cls, path: Path) -> _Tensors:
        with safe_open(path, framework="pt") as f:
            keys = f.keys()  # a safe_open handle is not iterable
        return cls(dict.fromkeys(keys, path))

    def names(self) -> list[str]:
        return list(self.file_of)

    def meta(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype such as "BF16", shape) from the header alone."""
        with safe_open(self.file_of[key], framework="pt") as f:
            s = f.get_slice(key)
            return s.get_dtype(), tuple(s.get_shape())

    @contextlib.contextmanager
    def read(self, keys: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
        """The tensors of ``keys``; valid inside the ``with`` block only (they may be file-backed)."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        with contextlib.ExitStack() as stack:
            out: dict[str, torch.Tensor] = {}
            for path, ks in by_file.items():
                f = stack.enter_context(safe_open(path, framework="pt"))
                out.update({k: f.get_tensor(k) for k in ks})
            yield out
            out.clear()


def dequantize_weight(name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A 4-bit weight dequantized to fp32 from its serialized tensors (``name`` and ``name.*``).

    Same call as :func:`loraflow.ml.models.dequantize`: the quant state built by bitsandbytes' own
    ``QuantState.from_dict`` (what ``Params4bit.from_prequantized`` does on load), its dtype set to
    fp32 so that the weights are not rounded to the saved compute dtype.
    """
    import bitsandbytes as bnb

    stats = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
    qs = bnb.functional.QuantState.from_dict(stats, device=torch.device("cpu"))
    qs.dtype = torch.float32
    return bnb.functional.dequantize_4bit(tensors[name], qs)


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup (``peft.utils.other.get_pattern_key``): first key ending the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _output_bytes(st_dtype: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = math.prod(shape)
    if st_dtype in SAFETENSORS_FLOAT:
        return n * dtype.itemsize
    return n * SAFETENSORS_BYTES.get(st_dtype, 8)


def _plan_base(ckpt: _Tensors, expected: dict[str, tuple[int, ...]], tied: set[str], dtype: torch.dtype):
    """Output entries (in the model's own order) from the checkpoint, checked against the model's state dict."""
    from bitsandbytes.utils import unpack_tensor_to_dict

    keys = ckpt.names()
    quantized = {k[: k.index(QUANT_STATE_MARK)] for k in keys if QUANT_STATE_MARK in k}
    found: dict[str, _Entry] = {}
    stats_of = {q: [k for k in keys if k.startswith(q + ".")] for q in quantized}
    stats = {k for ks in stats_of.values() for k in ks}
    for q in sorted(quantized):
        marker = next(k for k in stats_of[q] if QUANT_STATE_MARK in k)
        with ckpt.read([marker]) as t:
            shape = tuple(unpack_tensor_to_dict(t[marker])["shape"])
        found[q] = _Entry(q, shape, math.prod(shape) * dtype.itemsize, True, (q, *stats_of[q]))
    for k in keys:
        if k in quantized or k in stats or k in tied:
            continue
        st_dtype, shape = ckpt.meta(k)
        found[k] = _Entry(k, shape, _output_bytes(st_dtype, shape, dtype), False, (k,))

    problems = []
    wanted = [k for k in expected if k not in tied]
    if missing := [k for k in wanted if k not in found]:
        problems.append(f"missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected := [k for k in found if k not in expected]:
        problems.append(f"not part of the model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k} {e.shape} != {expected[k]}" for k, e in found.items() if k in expected and e.shape != expected[k]]
    if wrong:
        problems.append(f"wrong shapes: {wrong[:5]}")
    return [found[k] for k in wanted if k in found], problems


def _plan_adapter(adapter_dir: Path, entries: list[_Entry], tied: set[str]) -> tuple[_Tensors | None, list[str]]:
    """Attach each adapted module's LoRA factors to its weight's entry (in place); returns the adapter's tensors."""
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        return None, [f"{adapter_dir} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT, saved as safetensors)"]
    cfg = json.loads(cfg_path.read_text())
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be merged")
    if used := [k for k in UNSUPPORTED if cfg.get(k)]:
        problems.append(f"adapter options the streaming merge does not support: {used}")
    tensors = _Tensors.of_file(weights)
    factors: dict[str, dict[str, str]] = {}
    for key in tensors.names():
        m = LORA_KEY.match(key)
        if m is None:
            problems.append(f"adapter tensor {key!r} is not a LoRA factor of a linear layer")
            continue
        factors.setdefault(m["module"], {})[m["ab"]] = key
    index = {e.name: i for i, e in enumerate(entries)}
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    for module, ab in sorted(factors.items()):
        weight = f"{module}.weight"
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: lora_A or lora_B missing")
            continue
        if weight in tied:
            problems.append(f"{module}: adapted, but its weight is tied to the input embeddings")
            continue
        if weight not in index:
            problems.append(f"{module}: the adapter targets a module the base checkpoint does not have")
            continue
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        (_, a_shape), (_, b_shape) = tensors.meta(ab["A"]), tensors.meta(ab["B"])
        entry = entries[index[weight]]
        out_f, in_f = entry.shape[::-1] if fan_in_fan_out else entry.shape
        if a_shape != (r, in_f) or b_shape != (out_f, r):
            problems.append(f"{module}: lora_A {a_shape}, lora_B {b_shape} do not fit r={r}, weight {entry.shape}")
            continue
        lora = _Lora(ab["A"], ab["B"], scaling, fan_in_fan_out)
        entries[index[weight]] = _Entry(entry.name, entry.shape, entry.nbytes, entry.quantized, entry.sources, lora)
    return tensors, problems


def _shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Greedy, in order; a tensor larger than the limit gets a shard of its own (as transformers does)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _make(e: _Entry, base: _Tensors, adapter: _Tensors | None, dtype: torch.dtype) -> torch.Tensor:
    with base.read(e.sources) as t:
        if e.quantized:
            w = dequantize_weight(e.name, t)
        elif e.lora is not None:
            w = t[e.name].to(torch.float32, copy=True)  # never write into the file-backed tensor
        else:
            w = t[e.name]
        if e.lora is not None:
            assert adapter is not None
            with adapter.read((e.lora.a, e.lora.b)) as ab:
                # peft's get_delta_weight + merge, in fp32 and in the same order (bit-equal results):
                # W += transpose(B @ A) * scaling; in place, so that no third weight-sized tensor exists.
                delta = ab[e.lora.b].float() @ ab[e.lora.a].float()
                if e.lora.fan_in_fan_out:
                    delta = delta.T
                w += delta.mul_(e.lora.scaling)
        # A tensor still backed by the input file is copied, so that no mapping outlives the read.
        fresh = e.quantized or e.lora is not None
        return w.to(dtype, copy=not fresh) if w.is_floating_point() else w.clone()


def merge_in_memory(
    base_dir: str | Path, adapter_dir: str | Path | None, *, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The in-memory merge that :func:`stream_merge` replaced: the whole 4-bit model dequantized to
    fp32 and peft's ``merge_and_unload``. It holds the whole model in fp32 twice over (small models
    only); kept as the reference the streaming merge is tested and benchmarked against."""
    from peft import PeftModel

    from loraflow.ml.models import dequantize, load_quantized

    quantized = load_quantized(base_dir, trust_remote_code=trust_remote_code, device="cpu")
    plain = dequantize(quantized, torch.float32, trust_remote_code=trust_remote_code)
    return plain if adapter_dir is None else PeftModel.from_pretrained(plain, str(adapter_dir)).merge_and_unload()


def stream_merge(
    base_dir: str | Path,
    adapter_dir: str | Path | None,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    trust_remote_code: bool = False,
) -> StreamMergeResult:
    """Write the 4-bit checkpoint in ``base_dir``, dequantized and with the adapter folded in, to ``out_dir``.

    Args:
        base_dir: a checkpoint saved by the quantize stage (bitsandbytes 4-bit, transformers
            format); non-quantized checkpoints work too (their weights are copied and merged).
        adapter_dir: a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``),
            or None to write the dequantized base alone.
        out_dir: created; must not exist or be empty. Removed again if the merge fails.
        dtype: dtype of every floating-point tensor written (the merge itself is computed in fp32).
        max_shard_bytes: largest weight file; a single tensor larger than this gets a file of its own.
        trust_remote_code: the base model's ``base_model.trust_remote_code`` (its config may name its own code).

    Raises:
        StageError: the checkpoint does not fit its config, or the adapter does not fit the
            checkpoint or uses features this merge does not implement (every problem listed).
    """
    base_dir, out = Path(base_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    del model

    base = _Tensors.of_checkpoint(base_dir)
    entries, problems = _plan_base(base, expected, tied, dtype)
    adapter = None
    if adapter_dir is not None:
        adapter, adapter_problems = _plan_adapter(Path(adapter_dir), entries, tied)
        problems += adapter_problems
    if problems:
        raise StageError(
            f"cannot merge {adapter_dir} into {base_dir}:\n  - "
            + "\n  - ".join(problems)
            + "\nMerge a plain LoRA adapter (no DoRA or other variant, bias, modules_to_save or trainable "
            "tokens) trained on this base checkpoint."
        )

    if out.exists() and any(out.iterdir()):
        raise StageError(f"{out} is not empty; stream_merge writes into a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    try:
        shards = _shards(entries, max_shard_bytes)
        names = (
            [WEIGHTS]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map: dict[str, str] = {}
        for name, shard in zip(names, shards, strict=True):
            tensors = {e.name: _make(e, base, adapter, dtype) for e in shard}
            save_file(tensors, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        total = sum(e.nbytes for e in entries)
        if len(shards) > 1:
            index = {
                "metadata": {"total_parameters": sum(math.prod(e.shape) for e in entries), "total_size": total},
                "weight_map": weight_map,
            }
            (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.dtype = dtype
        config.save_pretrained(out)
        if trust_remote_code:  # a model with code of its own (auto_map) loads only with that code beside it
            for code in base_dir.glob("*.py"):
                shutil.copyfile(code, out / code.name)
        if (base_dir / "generation_config.json").is_file():
            shutil.copyfile(base_dir / "generation_config.json", out / "generation_config.json")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return StreamMergeResult(
        path=str(out),
        files=names,
        tensors=len(entries),
        adapted_modules=sum(e.lora is not None for e in entries),
        total_bytes=total,
        largest_shard_bytes=max(sum(e.nbytes for e in s) for s in shards),
    )


# --- checking a merge ----------------------------------------------------------------------------


@torch.no_grad()
def masked_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of the non-padding positions of ``batch``, on the CPU."""
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
    return logits.float()[batch["attention_mask"].bool().to(device)].cpu()


def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Largest absolute logit difference over the non-padding positions of ``batch``."""
    return (masked_logits(a, batch) - masked_logits(b, batch)).abs().max().item()


def verify(
    merged_dir: Path,
    quantized_path: str | Path,
    adapter_path: str | Path,
    batch: dict[str, torch.Tensor],
    device: str,
    *,
    trust_remote_code: bool = False,
) -> float:
    """Max abs logit diff between the saved merged model and 4-bit base + adapter, both in fp32.

    The two models are loaded one after the other, so the check holds one of them at a time.
    """
    merged = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float32, device_map={"": device}, trust_remote_code=trust_remote_code
    ).eval()
    got = masked_logits(merged, batch)
    del merged
    from peft import PeftModel

    from loraflow.ml.models import load_quantized

    reference_model = PeftModel.from_pretrained(
        load_quantized(quantized_path, trust_remote_code=trust_remote_code, device=device, compute_dtype="float32"),
        adapter_path,
    ).eval()
    want = masked_logits(reference_model, batch)
    del reference_model
    return (got - want).abs().max().item()


def peak_rss_gb() -> float:
    """This process's resident-memory high-water mark since it started (VmHWM), in GB.

    Not ``ru_maxrss`` where /proc is there: Linux folds the peak of the image a process replaced at
    exec into it, so a worker started by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
