"""quantize: base model -> QuantizedBase (bitsandbytes NF4 + double quantization, saved 4-bit checkpoint).

The checkpoint is cached under ``cache_dir/quantized/<base digest>-<quant hash>`` and reused while
neither the base model's files nor the quantization settings change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from loraflow.config import QuantConfig
from loraflow.ml.models import (
    DTYPES,
    bnb_config,
    checkpoint_bytes,
    default_device,
    load_tokenizer,
    model_bytes,
)
from loraflow.records import BaseModelRef, QuantizedBase, load_record
from loraflow.tracking import NULL_TRACKER, Tracker

RECORD = "quantized.json"


def quant_hash(q: QuantConfig) -> str:
    return hashlib.sha256(json.dumps(q.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def quantize(base: BaseModelRef, q: QuantConfig, cache_dir: Path, tracker: Tracker = NULL_TRACKER) -> QuantizedBase:
    """Quantize the base model (from :func:`loraflow.ml.models.prepare_base`) to 4 bits and save it, or reuse the
    cached checkpoint."""
    start = time.perf_counter()
    qh = quant_hash(q)
    out = cache_dir / "quantized" / f"{base.digest[:16]}-{qh[:8]}"
    if (out / RECORD).is_file():
        cached = load_record(QuantizedBase, out / RECORD)
        result = cached.model_copy(
            update={"path": str(out), "reused": True, "seconds": time.perf_counter() - start, "base": base}
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            base.path,
            quantization_config=bnb_config(q),
            dtype=DTYPES[q.compute_dtype],
            device_map={"": default_device()},
            trust_remote_code=base.trust_remote_code,
        )
        tok = load_tokenizer(base.path, trust_remote_code=base.trust_remote_code)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".quantize-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            result = QuantizedBase(
                base=base,
                path=str(out),
                quant_hash=qh,
                compute_dtype=q.compute_dtype,
                bytes_before=checkpoint_bytes(base.path),
                bytes_after=model_bytes(model),
                reused=False,
                seconds=time.perf_counter() - start,
            )
            result.save(tmp / RECORD)  # written last: its presence marks a complete checkpoint
            try:
                tmp.rename(out)
            except OSError:
                if not (out / RECORD).is_file():  # not a concurrent run that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tracker.log_params({"quant": q.model_dump(mode="json"), "base_model": base.name, "base_digest": base.digest})
    tracker.log_metrics(
        {
            "quantize/bytes_before": result.bytes_before,
            "quantize/bytes_after": result.bytes_after,
            "quantize/compression": result.bytes_before / max(result.bytes_after, 1),
            "quantize/reused": float(result.reused),
            "quantize/seconds": result.seconds,
        }
    )
    return result
