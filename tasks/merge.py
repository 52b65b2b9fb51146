"""merge: adapter + dequantized 4-bit base -> MergedModel (standard Hugging Face format), verified.

The adapter was trained against the *4-bit* weights, so it is merged into those weights
dequantized, not into the original full-precision base: that reproduces the trained model to
~1e-6 in fp32, where merging into the original base drifts by ~0.15 in the logits (DESIGN.md).

The merge streams (loraflow/streaming_merge.py): the 4-bit checkpoint is read tensor by tensor,
each weight dequantized and given its LoRA delta in fp32, cast to ``merge.dtype`` and written to
safetensors shards of at most ``merge.max_shard_gb``, so host memory holds about one shard, never
the whole model (an 8B model in fp32 is 32 GB). It writes into a temporary folder; the check then
loads that *saved* model back in fp32 on the GPU when there is one (else the CPU) and compares its
logits with 4-bit base + adapter computed in fp32, one model at a time. Only a model within
``merge.tolerance`` is renamed to ``merged``; otherwise nothing is left behind.
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraflow.config import MergeConfig
from loraflow.errors import StageError
from loraflow.models import DTYPES, default_device, load_quantized, load_tokenizer
from loraflow.prompts import prompt_text, reference
from loraflow.records import Adapter, MergedModel, QuantizedBase, ValidatedData
from loraflow.streaming_merge import stream_merge
from loraflow.tracking import NULL_TRACKER, Tracker
from tasks.train import read_jsonl


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
    merged_dir: Path, base: QuantizedBase, adapter: Adapter, batch: dict[str, torch.Tensor], device: str
) -> float:
    """Max abs logit diff between the saved merged model and 4-bit base + adapter, both in fp32.

    The two models are loaded one after the other, so the check holds one of them at a time.
    """
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map={"": device}).eval()
    got = masked_logits(merged, batch)
    del merged
    reference_model = PeftModel.from_pretrained(
        load_quantized(base.path, device=device, compute_dtype="float32"), adapter.path
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


def merge(
    base: QuantizedBase,
    adapter: Adapter,
    data: ValidatedData,
    cfg: MergeConfig,
    run_dir: Path,
    tracker: Tracker = NULL_TRACKER,
) -> MergedModel:
    """Stream-merge into a temporary folder, verify the saved model against 4-bit base + adapter, then publish it."""
    start = time.perf_counter()
    tok = load_tokenizer(adapter.path)
    records = read_jsonl(data.eval_path)[: cfg.verify_rows]
    texts = [prompt_text(tok, r) + reference(r) for r in records]
    batch = dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))

    out = run_dir / "merged"
    tmp = run_dir / ".merged-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = stream_merge(
            base.path, adapter.path, tmp, dtype=DTYPES[cfg.dtype], max_shard_bytes=int(cfg.max_shard_gb * 1e9)
        )
        tok.save_pretrained(tmp)
        write_seconds = time.perf_counter() - start
        diff = verify(tmp, base, adapter, batch, default_device())
        tracker.log_metrics(
            {
                "merge/max_abs_logit_diff": diff,
                "merge/tolerance": cfg.tolerance,
                "merge/write_seconds": write_seconds,
                "merge/shards": len(written.files),
                "merge/output_gb": written.total_bytes / 1e9,
                # The process's high-water mark: the merge's own peak when the stage runs in its own
                # process (a work-pool run), else the larger of it and the earlier stages' peaks.
                "merge/peak_rss_gb": peak_rss_gb(),
            }
        )
        if not diff <= cfg.tolerance:  # written this way so that NaN fails too
            raise StageError(
                f"merge check failed: the merged model's logits differ from 4-bit base + adapter by up to {diff:.3g} "
                f"(tolerance merge.tolerance={cfg.tolerance:g}) on {len(records)} held-out prompts. Nothing was "
                "saved or registered. A large difference usually means the adapter was trained on a different base "
                "checkpoint than the one merged into; with merge.dtype bfloat16 or float16 the saved weights' "
                "rounding shows too (see merge.tolerance)."
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    result = MergedModel(
        path=str(out),
        dtype=cfg.dtype,
        max_abs_logit_diff=diff,
        tolerance=cfg.tolerance,
        seconds=time.perf_counter() - start,
    )
    tracker.log_metrics({"merge/seconds": result.seconds})
    return result
