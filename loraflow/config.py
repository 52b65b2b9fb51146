"""The one validated configuration object of a loraflow run.

A run is described by a YAML file (``configs/demo.yaml`` is the embedded default) that loads
into :class:`PipelineConfig`. It is validated once, at the entry point (CLI, deployment
parameter or UI form); every stage then receives only its own sub-config.

    cfg = load_config("configs/demo.yaml", overrides=["train.max_steps=10"])

Every dump of it (the run's config.yaml, MLflow params, Prefect flow-run and deployment parameters,
the config hash) hides a credential in a URL-valued setting (loraflow/credentials.py); the live
object keeps it for the entry point, which hands it to MLflow through the environment.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from loraflow.credentials import redact
from loraflow.errors import UsageError


class ConfigError(UsageError):
    """A configuration file or override is invalid; the message lists every problem."""


class _Section(BaseModel):
    # coerce_numbers_to_str: `--set registry.model_name=2024` means the string "2024".
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    @model_serializer(mode="wrap")
    def _without_credentials(self, handler: SerializerFunctionWrapHandler):
        # Dumps travel (run files, MLflow params, Prefect parameters): none shows a credential in a URL.
        return redact(handler(self))


class BaseModelConfig(_Section):
    """Which pretrained model to fine-tune and where its files are."""

    name: str = Field(
        description="Human-readable model id recorded in lineage, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'."
    )
    source: Literal["hf", "gguf"] = Field(
        "hf", description="'hf': a local Hugging Face model folder; 'gguf': a GGUF file, converted once."
    )
    path: str = Field(
        description="Local model folder, or 'pkg:<module>' for an installed package's folder; never a Hub id."
    )
    gguf_file: str | None = Field(
        None, description="File name of the GGUF checkpoint inside `path` (required when source is 'gguf')."
    )
    trust_remote_code: bool = Field(
        False, description="Let this model run Python code shipped in its folder (auto_map); only for code you trust."
    )
    allowed_roots: list[str] | None = Field(
        None, description="Folders the model folder must lie in (a config file's default: its project; None: anywhere)."
    )

    @model_validator(mode="after")
    def _gguf_needs_file(self) -> BaseModelConfig:
        if self.source == "gguf" and not self.gguf_file:
            raise ValueError("base_model.gguf_file is required when base_model.source is 'gguf'")
        return self


class DataConfig(_Section):
    """The instruction dataset, its contract and the train/eval split."""

    path: str = Field(
        description="Dataset file (JSONL, JSON, CSV or Parquet); relative paths resolve against the config file."
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = Field(
        "auto", description="File format; 'auto' picks it from the file extension."
    )
    contract: str = Field(
        "instruction_v1", description="Name of the data contract in data_contracts/ the data must pass."
    )
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of rows held out for evaluation (deterministic split)."
    )
    eval_max_rows: int = Field(
        64, ge=1, description="Upper bound on held-out rows, so evaluation time stays bounded on big datasets."
    )
    max_train_rows: int | None = Field(
        None, ge=1, description="Optional cap on training rows after the split (None: all)."
    )
    split_seed: int = Field(0, description="Seed of the deterministic train/eval split.")
    policy: Literal["fail", "quarantine"] = Field(
        "fail", description="On a violation: 'fail' stops the run; 'quarantine' sets failing rows aside, up to a share."
    )
    allowed_roots: list[str] | None = Field(
        None, description="Folders the dataset must lie in (a config file's default: its project; None: anywhere)."
    )


class QuantConfig(_Section):
    """bitsandbytes 4-bit quantization of the base model."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is the QLoRA default.")
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (QLoRA's double quantization)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for matrix products."
    )


class LoraConfig(_Section):
    """The LoRA adapter trained on top of the frozen 4-bit base.

    ``init`` 'loftq' and 'cloq' start A and B at a rank-r fit of what 4-bit rounding took from the weights
    (loraflow/ml/lora_init.py): LoftQ fits the weights themselves, CLoQ the layers' outputs on
    ``calibration_rows`` training examples. Both read the full-precision base; neither changes the 4-bit one.
    """

    r: int = Field(8, ge=1, le=1024, description="Rank of the low-rank update.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the output head."
    )
    init: Literal["default", "gaussian", "loftq", "cloq"] = Field(
        "default",
        description="How A and B start: 'default' (peft's), 'gaussian', 'loftq' or 'cloq' (fit the 4-bit residual).",
    )
    calibration_rows: int = Field(
        64, ge=1, description="Training examples whose layer inputs calibrate lora.init='cloq' (seeded draw)."
    )

    def identity(self) -> dict[str, Any]:
        """The settings that change what training computes: ``calibration_rows`` only with init 'cloq'."""
        return self.model_dump(mode="json", exclude=None if self.init == "cloq" else {"calibration_rows"})


CompileMode = Literal["auto", "on", "off"]
AttentionMode = Literal["auto", "sdpa", "flex"]
# TrainConfig fields that do not change what a run computes: changing them keeps its checkpoints and cache.
RUN_BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "retries", "resume_across_versions", "log_every")
# ... nor do these: a data-parallel run computes the same steps on any number of ranks (the global batch is
# split, never multiplied), so a run checkpointed on 2 GPUs resumes on 1 (loraflow/ml/distributed.py).
RUN_PLACEMENT = ("distributed", "gpus")
Distributed = Literal["none", "ddp", "fsdp"]


class TrainConfig(_Section):
    """Optimisation of the adapter."""

    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training split; exclusive with max_steps.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; exclusive with epochs.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch, all ranks together (split across them).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_seq_length: int = Field(
        128, ge=8, description="Tokens per example after templating; longer examples are truncated."
    )
    memory_profile: Literal["fast", "balanced", "lean"] = Field(
        "balanced", description="Activations: 'fast' keeps all, 'balanced' recomputes layers, 'lean' also offloads."
    )
    compile: CompileMode = Field("auto", description="torch.compile each decoder layer; 'auto': on a GPU only.")
    packing: bool = Field(
        False, description="Pack several examples into each row of max_seq_length tokens; batch_size counts rows."
    )
    attention: AttentionMode = Field(
        "auto", description="Packed rows' attention: 'flex' document mask, 'sdpa' dense mask; 'auto': flex on a GPU."
    )
    seed: int = Field(0, description="Seed for adapter init, dropout and data order.")
    checkpoint_every: int | None = Field(
        50, ge=1, description="Write a checkpoint that a killed run resumes from every N steps (None: never)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")
    retries: int = Field(
        2, ge=0, description="Attempts after a crashed trainer; each resumes from the last checkpoint."
    )
    resume_across_versions: bool = Field(
        False, description="Resume a checkpoint written with other torch/transformers/peft/bitsandbytes/loraflow."
    )
    log_every: int = Field(1, ge=1, description="Log the training loss to the tracker every N steps.")
    distributed: Distributed = Field(
        "none",
        description="'none': one process; 'ddp': ranks via torchrun; 'fsdp': ranks sharding base and adapter (FSDP2).",
    )
    gpus: int | None = Field(
        None,
        ge=1,
        description="Ranks torchrun starts for 'ddp'/'fsdp' (None: every GPU the worker sees, 1 without one).",
    )

    def identity(self) -> dict[str, Any]:
        """The settings that change what training computes (bookkeeping and placement left out)."""
        return self.model_dump(mode="json", exclude={*RUN_BOOKKEEPING, *RUN_PLACEMENT})

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("set exactly one of train.epochs and train.max_steps")
        return self

    @model_validator(mode="after")
    def _placement(self) -> TrainConfig:
        problems = []
        if self.distributed == "none" and self.gpus not in (None, 1):
            problems.append(f"train.gpus={self.gpus} needs train.distributed='ddp' or 'fsdp' (or 1 GPU with 'none')")
        if self.gpus is not None and self.batch_size < self.gpus:
            problems.append(
                f"train.batch_size={self.batch_size} is split across train.gpus={self.gpus} ranks: "
                "raise it to at least the number of ranks"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class EvalConfig(_Section):
    """Held-out evaluation of base and fine-tuned models."""

    batch_size: int = Field(16, ge=1, description="Prompts per batch for loss and generation.")
    max_new_tokens: int = Field(32, ge=1, description="Greedy tokens generated per held-out prompt for ROUGE-L.")
    generation_rows: int | None = Field(
        None, ge=1, description="Held-out rows used for generation metrics (None: all held-out rows)."
    )
    general_text: str | None = Field(
        None, description="JSONL of general-text passages scored as perplexity: the forgetting guard (None: off)."
    )
    confidence: float = Field(
        0.9, gt=0.5, lt=1.0, description="Two-sided level of the bootstrap intervals reported with each metric."
    )


class MergeConfig(_Section):
    """Merging the adapter into the dequantized base, and checking it."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the saved merged model.")
    tolerance: float = Field(
        1e-3, gt=0, description="Largest max |logit diff| of merged vs 4-bit base + adapter in fp32 (16-bit: raise)."
    )
    verify_rows: int = Field(8, ge=1, description="Held-out prompts used for the numerical check.")
    max_shard_gb: float = Field(
        2.0, gt=0, description="Largest weight file of the merged model (GB); the merge holds about one in memory."
    )


class RegisterConfig(_Section):
    """Where the adapter goes in the MLflow model registry."""

    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registered model name.")
    alias: str = Field("candidate", pattern=r"^[a-z][a-z0-9_-]*$", description="Alias set on the new version.")


class TrackingConfig(_Section):
    """MLflow tracking."""

    experiment: str = Field("loraflow", min_length=1, description="MLflow experiment for the run.")
    uri: str | None = Field(None, description="MLflow tracking URI, e.g. a team server (None: the local stack's).")
    outage_timeout_s: float = Field(
        600.0, gt=0, description="How long a run waits for an unreachable MLflow server before it fails."
    )


class OrchestrationConfig(_Section):
    """Where stages run."""

    train_on: Literal["deployment", "in_process"] = Field(
        "deployment", description="'deployment': the train flow runs on the gpu work pool; 'in_process': right here."
    )
    train_deployment: str = Field("train/gpu", description="'<flow>/<deployment>' of the train flow.")
    train_timeout_s: float = Field(6 * 3600, gt=0, description="Give up waiting for the train flow after this long.")


GateMetric = Literal["loss", "rouge_l"]  # held-out metrics the gate compares; loss lower is better, rouge_l higher


class PromotionConfig(_Section):
    """The promotion gate (flows/promote.py): when a registered version may become the `champion`."""

    enabled: bool = Field(
        False, description="Run the gate at the end of the finetune flow and promote the new version if it passes."
    )
    required_metrics: list[GateMetric] = Field(
        ["loss", "rouge_l"], min_length=1, description="Metrics compared with the champion on the same held-out data."
    )
    min_improvement: dict[GateMetric, float] = Field(
        {"loss": 0.001},
        description="Per metric, how much better than the champion the candidate must be (absolute units).",
    )
    max_regression: dict[GateMetric, float] = Field(
        {"rouge_l": 0.02}, description="Per metric, how much worse than the champion the candidate may be (absent: 0)."
    )
    thresholds: dict[GateMetric, float] = Field(
        {}, description="Absolute bounds for every promoted version: an upper one for loss, a lower one for rouge_l."
    )
    beat_base: bool = Field(
        True, description="The candidate must be at least as good as its own base model on every required metric."
    )
    confidence: float = Field(
        0.9,
        gt=0.5,
        lt=1.0,
        description="Level of the paired bootstrap intervals; rules hold at their unfavourable end.",
    )
    max_general_regression: float | None = Field(
        0.05, ge=0.0, description="Largest rise of general-text perplexity over the base (0.05: +5%; None: unchecked)."
    )
    max_merge_deviation: float | None = Field(
        None,
        gt=0,
        description="Largest merge max |dlogit| accepted (None: the merge.tolerance the version was merged with).",
    )
    contract: str | None = Field(
        None, description="Data contract name the candidate's data must have passed (None: any loraflow contract)."
    )
    identity: str | None = Field(
        None, description="Who moves aliases, as written in the audit trail (None: the OS user running loraflow)."
    )
    lock_timeout_s: float = Field(
        60.0, gt=0, description="How long to wait while another promotion or rollback of the same model runs."
    )

    @model_validator(mode="after")
    def _rules_on_required_metrics(self) -> PromotionConfig:
        problems = [
            f"promotion.{rule}.{metric}: not in promotion.required_metrics {self.required_metrics}"
            for rule in ("min_improvement", "max_regression", "thresholds")
            for metric in getattr(self, rule)
            if metric not in self.required_metrics
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RetentionConfig(_Section):
    """What LORAFLOW_HOME keeps of old runs; what a champion, previous-champion or candidate needs always stays."""

    keep_runs: int = Field(10, ge=1, description="Run folders kept, newest first (plus those the aliases need).")
    keep_merged: int = Field(2, ge=0, description="Merged models kept in those folders, newest first (plus aliases').")
    active_hours: float = Field(12.0, gt=0, description="An unfinished run touched this recently is still going: kept.")
    on_finish: bool = Field(True, description="Collect at the end of every finetune run (else only `loraflow gc`).")


class PipelineConfig(_Section):
    """A whole fine-tuning run: data, base model, quantization, LoRA, training, evaluation, merge, registry."""

    run_name: str | None = Field(None, description="Name of the run directory and MLflow run (None: generated).")
    base_model: BaseModelConfig
    data: DataConfig
    quant: QuantConfig = QuantConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig
    eval: EvalConfig = EvalConfig()
    merge: MergeConfig = MergeConfig()
    registry: RegisterConfig
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    promotion: PromotionConfig = PromotionConfig()
    retention: RetentionConfig = RetentionConfig()

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the config (run name, promotion and retention excluded): same recipe, same
        hash."""
        payload = self.model_dump(mode="json", exclude={"run_name", "promotion", "retention"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def section_hash(self, *names: str) -> str:
        """sha256 over the named sections only, used as a cache key for a stage."""
        payload = {n: getattr(self, n).model_dump(mode="json") for n in names}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. train.max_steps=20)")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r} has an empty key")
    # YAML parsing gives ints, floats, bools, null and lists the way they read in the config file;
    # but no field is a date, so a value YAML would read as one stays the string it was written as.
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, dt.date):
        value = raw.strip()
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.path=value`` overrides applied."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        keys, value = _parse_override(item)
        node = out
        for k in keys[:-1]:
            if node.get(k) is None:  # absent, or left empty in the YAML (`eval:`)
                node[k] = {}
            child = node[k]
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return out


# Settings that were renamed: an old config gets told what to write instead.
REPLACED = {
    "train.gradient_checkpointing": "replaced by train.memory_profile: true -> 'balanced', false -> 'fast' "
    "(or 'lean' to also move layer inputs to host memory)",
}


def format_validation_error(err: ValidationError, source: str) -> str:
    """One readable message listing every invalid field and what is allowed."""
    lines = [f"{source}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = REPLACED.get(loc, "unknown key (check the spelling; see `loraflow config-schema`)")
        elif e["type"] == "missing":
            msg = "required, but missing"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from e


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load, override and validate a YAML config; relative data/model paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (try configs/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    _resolve_relative_paths(data, path.parent.resolve())
    return config_from_dict(data, source=str(path))


def _resolve_relative_paths(data: dict[str, Any], root: Path) -> None:
    for section, key in (("data", "path"), ("base_model", "path"), ("eval", "general_text")):
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            p = node[key]
            if not p.startswith("pkg:") and not Path(p).is_absolute():
                node[key] = str((root / p).resolve())
    # Where the data and the model may come from: by default the config file's project.
    for section in ("data", "base_model"):
        node = data.get(section)
        if isinstance(node, dict):
            roots = node.get("allowed_roots", [str(_project_root(root))])
            if isinstance(roots, list):
                node["allowed_roots"] = [str((root / r).resolve()) if isinstance(r, str) else r for r in roots]


def _project_root(folder: Path) -> Path:
    """The nearest folder at or above ``folder`` holding pyproject.toml or .git; else ``folder`` itself."""
    for candidate in (folder, *folder.parents):
        if (candidate / "pyproject.toml").exists() or (candidate / ".git").exists():
            return candidate
    return folder


def check_inside_roots(path: Path, roots: list[str] | None, *, what: str, kind: str, setting: str) -> Path:
    """``path`` with every symlink resolved, so that a link cannot lead out of a root; UsageError when it lies in
    none of ``roots`` (an ``allowed_roots`` setting; None: anywhere).

    Args:
        what: the path's name in the message ("dataset file").
        kind: the roots' name in the message ("data").
        setting: the setting that lists the roots ("data.allowed_roots").
    """
    resolved = Path(path).expanduser().resolve()
    if roots is None:
        return resolved
    allowed = [Path(r).expanduser().resolve() for r in roots]
    if not any(resolved.is_relative_to(r) for r in allowed):
        raise UsageError(
            f"{what} {resolved} is outside the allowed {kind} roots ({', '.join(map(str, allowed)) or 'none'}); "
            f"move it under one of them or add its folder to {setting}"
        )
    return resolved
