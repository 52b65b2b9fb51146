"""The one validated configuration object of a loraflow run.

A run is described by a YAML file (``configs/demo.yaml`` is the embedded default) that loads
into :class:`PipelineConfig`. It is validated once, at the entry point (CLI, deployment
parameter or UI form); every stage then receives only its own sub-config.

    cfg = load_config("configs/demo.yaml", overrides=["train.max_steps=10"])
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraflow.errors import UsageError


class ConfigError(UsageError):
    """A configuration file or override is invalid; the message lists every problem."""


class _Section(BaseModel):
    # coerce_numbers_to_str: `--set registry.model_name=2024` means the string "2024".
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class BaseModelConfig(_Section):
    """Which pretrained model to fine-tune and where its files are."""

    name: str = Field(
        description="Human-readable model id recorded in lineage, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'."
    )
    source: Literal["hf", "gguf"] = Field(
        "hf",
        description="'hf': a local Hugging Face model directory; 'gguf': a GGUF file that is "
        "converted once into a Hugging Face directory under LORAFLOW_HOME.",
    )
    path: str = Field(
        description="Local directory holding the model, or 'pkg:<module>' for the folder of an "
        "installed Python package (found without importing it). Never a Hub id: loraflow "
        "does not download at run time."
    )
    gguf_file: str | None = Field(
        None, description="File name of the GGUF checkpoint inside `path` (required when source is 'gguf')."
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
        "fail",
        description="What a contract violation does. 'fail': any failed expectation stops the run (nothing is "
        "trained or registered). 'quarantine': rows failing row-level expectations are set aside in "
        "data/quarantine.jsonl with their reasons, and the run continues only while their share stays under "
        "the contract's quarantine.max_share; table-level failures (row count, missing column) still stop it.",
    )
    allowed_roots: list[str] | None = Field(
        None,
        description="Directories the dataset file must lie in (symlinks resolved; relative entries resolve "
        "against the config file). When a config file leaves it out, it defaults to the project holding that "
        "file (the nearest folder above it with a pyproject.toml or .git, else the file's own folder). None "
        "(a config built in code, or `loraflow validate` on a path typed by the user) allows any path: set it "
        "explicitly for configs that arrive as deployment parameters.",
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
    """The LoRA adapter trained on top of the frozen 4-bit base."""

    r: int = Field(8, ge=1, le=1024, description="Rank of the low-rank update.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the output head."
    )
    init: Literal["default", "gaussian", "loftq"] = Field(
        "default",
        description="How A and B start: 'default' (peft's: B zero), 'gaussian' (A normal, B zero) or 'loftq' "
        "(rank-r SVD of the 4-bit base's quantization residual; loraflow/ml/lora_init.py).",
    )


CompileMode = Literal["auto", "on", "off"]


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
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_seq_length: int = Field(
        128, ge=8, description="Tokens per example after templating; longer examples are truncated."
    )
    memory_profile: Literal["fast", "balanced", "lean"] = Field(
        "balanced",
        description="Activation memory: 'fast' keeps all activations; 'balanced' recomputes each decoder "
        "layer in the backward pass; 'lean' also keeps the layer inputs in host memory until then "
        "(loraflow/ml/memory.py; peaks and tokens/s in docs/benchmarks.md).",
    )
    compile: CompileMode = Field(
        "auto",
        description="Compile each decoder layer with torch.compile (one compilation, reused by every layer): "
        "1.37x tokens/s on an 8B shape on an H200. 'auto' compiles on a GPU only, where it pays for its "
        "compile time; on a CPU the demo's 30 steps would not.",
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each row of max_seq_length tokens (kept apart by their "
        "position ids), so that a batch holds real tokens instead of padding; batch_size then counts rows.",
    )
    seed: int = Field(0, description="Seed for adapter init, dropout and data order.")
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="Save the adapter and optimizer state every N steps into the run directory "
        "(None: only the final adapter).",
    )
    log_every: int = Field(1, ge=1, description="Log the training loss to the tracker every N steps.")

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("set exactly one of train.epochs and train.max_steps")
        return self


class EvalConfig(_Section):
    """Held-out evaluation of base and fine-tuned models."""

    batch_size: int = Field(16, ge=1, description="Prompts per batch for loss and generation.")
    max_new_tokens: int = Field(32, ge=1, description="Greedy tokens generated per held-out prompt for ROUGE-L.")
    generation_rows: int | None = Field(
        None, ge=1, description="Held-out rows used for generation metrics (None: all held-out rows)."
    )
    general_text: str | None = Field(
        None,
        description="JSONL of general-text passages ({'text': ...}) scored as perplexity by base and fine-tuned "
        "model, the forgetting guard; relative paths resolve against the config file (None: not scored).",
    )
    confidence: float = Field(
        0.9, gt=0.5, lt=1.0, description="Two-sided level of the bootstrap intervals reported with each metric."
    )


class MergeConfig(_Section):
    """Merging the adapter into the dequantized base, and checking it."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the saved merged model.")
    tolerance: float = Field(
        1e-3,
        gt=0,
        description="Largest allowed max-abs logit difference between the saved merged model and 4-bit base + "
        "adapter, both run in fp32. A float32 merge matches to about 1e-6 (tiny test Llama) to 2e-4 (SmolLM2-135M, "
        "random r=8 adapter). A bfloat16 or float16 merge also carries its weights' rounding, which the check sees: "
        "measured 4e-3 / 3e-4 on the tiny Llama and 0.53 / 0.07 on SmolLM2-135M. With those dtypes raise the "
        "tolerance to what the base model shows (e.g. 1.0 for bfloat16 on SmolLM2-135M); read it from the "
        "merge/max_abs_logit_diff metric of a run with a generous tolerance.",
    )
    verify_rows: int = Field(8, ge=1, description="Held-out prompts used for the numerical check.")
    max_shard_gb: float = Field(
        2.0,
        gt=0,
        description="Largest weight file of the merged model (GB); the merge holds about one in host memory.",
    )


class RegisterConfig(_Section):
    """Where the adapter goes in the MLflow model registry."""

    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registered model name.")
    alias: str = Field("candidate", pattern=r"^[a-z][a-z0-9_-]*$", description="Alias set on the new version.")


class TrackingConfig(_Section):
    """MLflow tracking."""

    experiment: str = Field("loraflow", min_length=1, description="MLflow experiment for the run.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI, e.g. a team server (None: the local stack's MLflow server).",
    )


class OrchestrationConfig(_Section):
    """Where stages run."""

    train_on: Literal["deployment", "in_process"] = Field(
        "deployment",
        description="'deployment': run the train flow on the GPU work pool via its deployment; "
        "'in_process': run it inside the finetune flow (tests, single machine without a worker).",
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
        ["loss", "rouge_l"],
        min_length=1,
        description="Metrics compared between candidate and champion on the same held-out data; each may regress "
        "at most max_regression[metric] (0 when absent).",
    )
    min_improvement: dict[GateMetric, float] = Field(
        {"loss": 0.001},
        description="Per metric, how much better than the champion the candidate must be (absolute units).",
    )
    max_regression: dict[GateMetric, float] = Field(
        {"rouge_l": 0.02}, description="Per metric, how much worse than the champion the candidate may be (absent: 0)."
    )
    thresholds: dict[GateMetric, float] = Field(
        {},
        description="Absolute bounds every promoted version must meet, first champion included: an upper bound "
        "for loss, a lower bound for rouge_l.",
    )
    beat_base: bool = Field(
        True, description="The candidate must be at least as good as its own base model on every required metric."
    )
    confidence: float = Field(
        0.9,
        gt=0.5,
        lt=1.0,
        description="Two-sided level of the paired bootstrap intervals; a comparison rule must hold at the "
        "interval's unfavourable end (a one-sided test at (1 + confidence) / 2).",
    )
    max_general_regression: float | None = Field(
        0.05,
        ge=0.0,
        description="Largest rise of general-text perplexity over the candidate's base, as a fraction "
        "(0.05: +5%), at the interval's upper end (None: forgetting not checked).",
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

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the config (run_name, promotion rules excluded): same recipe, same hash."""
        payload = self.model_dump(mode="json", exclude={"run_name", "promotion"})
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
    node = data.get("data")
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
