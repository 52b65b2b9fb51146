"""merge: adapter + dequantized 4-bit base -> MergedModel (standard Hugging Face format), verified.

The adapter was trained against the *4-bit* weights, so it is merged into those weights
dequantized, not into the original full-precision base: that reproduces the trained model to
~1e-6 in fp32, where merging into the original base drifts by ~0.15 in the logits (DESIGN.md).

The merge streams (loraflow/ml/merge.py): the 4-bit checkpoint is read tensor by tensor,
each weight dequantized and given its LoRA delta in fp32, cast to ``merge.dtype`` and written to
safetensors shards of at most ``merge.max_shard_gb``, so host memory holds about one shard, never
the whole model (an 8B model in fp32 is 32 GB). It writes into a temporary folder; the check then
loads that *saved* model back in fp32 on the GPU when there is one (else the CPU) and compares its
logits with 4-bit base + adapter computed in fp32, one model at a time. Only a model within
``merge.tolerance`` is renamed to ``merged``; otherwise nothing is left behind.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from loraflow.config import MergeConfig
from loraflow.errors import StageError
from loraflow.ml.examples import read_jsonl
from loraflow.ml.merge import peak_rss_gb, stream_merge, verify
from loraflow.ml.models import DTYPES, default_device, load_tokenizer
from loraflow.ml.prompts import prompt_text, reference
from loraflow.records import Adapter, MergedModel, QuantizedBase, ValidatedData
from loraflow.tracking import NULL_TRACKER, Tracker


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
    trust = base.base.trust_remote_code
    tok = load_tokenizer(adapter.path, trust_remote_code=trust)
    records = read_jsonl(data.eval_path)[: cfg.verify_rows]
    texts = [prompt_text(tok, r) + reference(r) for r in records]
    batch = dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))

    out = run_dir / "merged"
    tmp = run_dir / ".merged-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = stream_merge(
            base.path,
            adapter.path,
            tmp,
            dtype=DTYPES[cfg.dtype],
            max_shard_bytes=int(cfg.max_shard_gb * 1e9),
            trust_remote_code=trust,
        )
        tok.save_pretrained(tmp)
        write_seconds = time.perf_counter() - start
        diff = verify(tmp, base.path, adapter.path, batch, default_device(), trust_remote_code=trust)
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
