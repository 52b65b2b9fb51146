"""Model and tokenizer loading: local directories and GGUF files only, never the Hub.

Every load of the base model and of what derives from it (the 4-bit checkpoint, the merged model, their
tokenizers) says ``trust_remote_code`` explicitly: the value of ``base_model.trust_remote_code``, carried by
:class:`~loraflow.records.BaseModelRef`, False unless the config turns it on for that model.

Everything here is the ML core: it imports torch, transformers and bitsandbytes, never Prefect,
MLflow or datasets, so that it runs on the GPU image as it is.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from loraflow.config import BaseModelConfig, QuantConfig
from loraflow.errors import UsageError
from loraflow.hashing import sha256_dir, sha256_file
from loraflow.ml.paths import check_remote_code, resolve_model_path
from loraflow.records import BaseModelRef

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prepare_base(cfg: BaseModelConfig, cache_dir: Path) -> BaseModelRef:
    """Make the base model available as a local Hugging Face directory and fingerprint it.

    A GGUF checkpoint is dequantized once into ``cache_dir/models/<digest>``: transformers refuses
    ``save_pretrained`` on a GGUF-loaded model, so a plain model is built from its config and
    given its state dict.
    """
    src = resolve_model_path(cfg.path, cfg.allowed_roots)
    trust = cfg.trust_remote_code
    if cfg.source == "hf":
        if not (src / "config.json").is_file():
            raise UsageError(f"{src} has no config.json: it is not a Hugging Face model directory.")
        check_remote_code(src, cfg)
        return BaseModelRef(name=cfg.name, path=str(src), digest=sha256_dir(src), trust_remote_code=trust)

    assert cfg.gguf_file is not None  # enforced by BaseModelConfig
    gguf = src / cfg.gguf_file
    if not gguf.is_file():
        found = sorted(p.name for p in src.glob("*.gguf"))
        raise UsageError(f"GGUF file {gguf} not found; {src} holds: {found or 'no .gguf files'}.")
    digest = sha256_file(gguf)
    out = cache_dir / "models" / digest[:16]
    if not (out / "config.json").is_file():
        _convert_gguf(src, cfg.gguf_file, out, trust)
    return BaseModelRef(name=cfg.name, path=str(out), digest=digest, trust_remote_code=trust)


def _convert_gguf(src: Path, gguf_file: str, out: Path, trust_remote_code: bool) -> None:
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    loaded = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    config = loaded.config
    # The GGUF quantization marker would make from_pretrained expect GGUF tensors in the new folder.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so a crash never leaves a half-converted cache entry.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bnb_config(q: QuantConfig) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
    )


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    bitsandbytes 0.49/0.50 on CPUs with AVX512-BF16 repacks each Linear4bit weight in place on the
    first eval-mode no-grad forward; that layout's kernel has no backward, so training after an
    eval pass gets silently wrong gradients. Returns the number of layers changed.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def set_quant_storage(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every 4-bit weight in ``dtype``: the same packed bytes, viewed as ``dtype`` elements.

    This is what ``BitsAndBytesConfig(bnb_4bit_quant_storage=dtype)`` gives at quantization time
    (bitsandbytes packs into uint8 and views the result as the storage dtype), done to a loaded
    checkpoint instead, so that the quantize stage's one checkpoint serves every placement. FSDP
    shards parameters along their first dimension whatever their dtype; a floating storage equal to
    the compute dtype is the FSDP-QLoRA setup of PEFT's guide and Answer.AI's fsdp_qlora.
    Returns the number of weights changed.

    Raises:
        UsageError: a weight's packed bytes do not fill whole ``dtype`` elements.
    """
    import bitsandbytes as bnb

    size = torch.empty(0, dtype=dtype).element_size()
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        w = module.weight
        packed = w.data.view(torch.uint8).view(-1)
        if packed.numel() % size:
            raise UsageError(
                f"{name}: {packed.numel()} bytes of 4-bit weights do not fill whole {dtype} elements; "
                "use train.distributed='ddp' for this model"
            )
        w.data = packed.view(dtype).unsqueeze(1)
        w.quant_storage = module.quant_storage = dtype
        n += 1
    return n


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer in ``path`` (a model, 4-bit checkpoint or adapter folder), with a pad token."""
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def default_device() -> str:
    """The first CUDA GPU when there is one (the gpu work pool), else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def load_quantized(
    path: str | Path,
    *,
    trust_remote_code: bool = False,
    device: str | None = None,
    cpu_repack: bool = False,
    compute_dtype: str | None = None,
) -> torch.nn.Module:
    """Load a saved 4-bit checkpoint.

    Args:
        path: directory written by the quantize stage.
        trust_remote_code: the base model's ``base_model.trust_remote_code`` (``BaseModelRef.trust_remote_code``).
        device: where to put the model (default: :func:`default_device`).
        cpu_repack: allow bitsandbytes' faster CPU inference layout. Only for models that are
            never trained afterwards (see :func:`disable_cpu_weight_repacking`).
        compute_dtype: run the whole model in this dtype instead of the saved compute dtype:
            4-bit matmuls and every non-quantized weight (the merge check uses float32). By
            default the saved one, except on a CPU without bfloat16 instructions, where a 16-bit
            compute dtype becomes float32 (:func:`cpu_compute_dtype`).
    """
    import bitsandbytes as bnb

    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": device}, trust_remote_code=trust_remote_code)
    if compute_dtype is None and torch.device(device).type == "cpu":
        compute_dtype = cpu_compute_dtype(model.get_input_embeddings().weight.dtype)
    if compute_dtype is not None:
        dtype = DTYPES[compute_dtype]
        for p in model.parameters():
            if p.is_floating_point():  # 4-bit weights are uint8 and stay as they are
                p.data = p.data.to(dtype)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.compute_dtype = dtype
                module.compute_type_is_set = True
    if not cpu_repack:
        disable_cpu_weight_repacking(model)
    return model


def cpu_compute_dtype(saved: torch.dtype) -> str | None:
    """float32 where a 16-bit model would run on a CPU without bfloat16 instructions, else None.

    Without AVX512-BF16 or AMX, PyTorch's bfloat16 matrix products on the CPU take a slow generic
    path: measured on a 2-core AVX2 EPYC, one training step of the demo model took 131 s in bf16
    and 6.7 s in float32 (2.6 s in bf16 on an AVX512-BF16 CPU). The 4-bit weights and what they
    dequantize to are the same; only the products are computed at higher precision.
    """
    from bitsandbytes.functional import has_avx512bf16

    if saved not in (torch.bfloat16, torch.float16) or has_avx512bf16():
        return None
    _warn_cpu_fp32(saved)
    return "float32"


@functools.cache  # once per process and dtype
def _warn_cpu_fp32(saved: torch.dtype) -> None:
    logging.getLogger(__name__).warning(
        "this CPU has no bfloat16 instructions (AVX512-BF16): computing in float32 instead of %s", saved
    )


def dequantize(
    model: torch.nn.Module, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False
) -> torch.nn.Module:
    """A plain (non-quantized) copy of a 4-bit model: every 4-bit weight dequantized to ``dtype``.

    Built from the config and a state dict, so the result carries no quantization state and
    saves as a standard Hugging Face checkpoint.
    """
    import bitsandbytes as bnb

    state: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            # Dequantize at full precision (the saved quant state says bf16, which would round the
            # weights); bitsandbytes' own fp32 matmul sees exactly these values.
            qs = copy.copy(w.quant_state)
            qs.dtype = torch.float32
            state[f"{name}.weight"] = bnb.functional.dequantize_4bit(w.data, qs).to(dtype)
            quantized.add(f"{name}.weight")
    for name, p in model.named_parameters():
        if name not in quantized:
            state[name] = p.detach().to(dtype)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"dequantized state does not fit the model: missing={missing}, unexpected={unexpected}")
    plain.tie_weights()
    return plain


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (quantization constants included)."""
    return model.get_memory_footprint()


def checkpoint_bytes(path: str | Path, prefix: str = "") -> int:
    """Bytes of a safetensors checkpoint's tensors (those whose names start with ``prefix``), read from
    headers only (no weights loaded)."""
    total = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(
            v["data_offsets"][1] - v["data_offsets"][0]
            for k, v in header.items()
            if k != "__metadata__" and k.startswith(prefix)
        )
    return total
