"""merge: adapter + dequantized 4-bit base -> MergedModel (standard Hugging Face format), verified.

The adapter was trained against the *4-bit* weights, so it is merged into those weights
dequantized, not into the original full-precision base: that reproduces the trained model to
~1e-6 in fp32, where merging into the original base drifts by ~0.15 in the logits (DESIGN.md).
The check compares logits of the merged model with 4-bit base + adapter, both computed in fp32
so that the figure measures the merge and not bf16 rounding.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel

from loraflow.config import MergeConfig
from loraflow.errors import StageError
from loraflow.models import DTYPES, dequantize, load_quantized, load_tokenizer
from loraflow.prompts import prompt_text, reference
from loraflow.records import Adapter, MergedModel, QuantizedBase, ValidatedData
from loraflow.tracking import NULL_TRACKER, Tracker
from tasks.train import read_jsonl


def merge_adapter(base: QuantizedBase, adapter: Adapter) -> torch.nn.Module:
    """The 4-bit base dequantized to fp32 with the adapter folded into its weights (in host memory)."""
    plain = dequantize(load_quantized(base.path, device="cpu"), torch.float32)
    return PeftModel.from_pretrained(plain, adapter.path).merge_and_unload()


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Largest absolute logit difference over the non-padding positions of ``batch``."""
    mask = batch["attention_mask"].bool()
    la = a(**batch).logits.float()[mask]
    lb = b(**batch).logits.float()[mask]
    return (la - lb).abs().max().item()


def merge(
    base: QuantizedBase,
    adapter: Adapter,
    data: ValidatedData,
    cfg: MergeConfig,
    run_dir: Path,
    tracker: Tracker = NULL_TRACKER,
) -> MergedModel:
    """Merge, verify against 4-bit base + adapter on held-out prompts, and save."""
    start = time.perf_counter()
    tok = load_tokenizer(adapter.path)
    merged = merge_adapter(base, adapter)
    merged.eval()
    reference_model = PeftModel.from_pretrained(
        load_quantized(base.path, device="cpu", compute_dtype="float32"), adapter.path
    )
    reference_model.eval()

    records = read_jsonl(data.eval_path)[: cfg.verify_rows]
    texts = [prompt_text(tok, r) + reference(r) for r in records]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    diff = max_logit_diff(merged, reference_model, dict(batch))
    del reference_model
    tracker.log_metrics({"merge/max_abs_logit_diff": diff, "merge/tolerance": cfg.tolerance})
    if not diff <= cfg.tolerance:  # written this way so that NaN fails too
        raise StageError(
            f"merge check failed: the merged model's logits differ from 4-bit base + adapter by up to {diff:.3g} "
            f"(tolerance merge.tolerance={cfg.tolerance:g}) on {len(records)} held-out prompts. Nothing was saved "
            "or registered. A large difference usually means the adapter was trained on a different base "
            "checkpoint than the one merged into."
        )

    out = run_dir / "merged"
    tmp = run_dir / ".merged-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.to(DTYPES[cfg.dtype]).save_pretrained(tmp)
    tok.save_pretrained(tmp)
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
