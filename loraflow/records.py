"""Typed records that stages hand to each other.

Stages never pass live models: they pass these small, JSON-serialisable records (paths,
digests, metrics) so that a stage can run in another process or on another machine (the train
flow on the GPU work pool) and hand its result back through the shared run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from loraflow import tags as T
from loraflow.credentials import redact


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_serializer(mode="wrap")
    def _without_credentials(self, handler: SerializerFunctionWrapHandler):
        # Records go to run files, Prefect parameters and artifacts: a URL in one never shows a credential.
        return redact(handler(self))

    def save(self, path: Path) -> Path:
        """Write the record as JSON (atomically: a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)
        return path


R = TypeVar("R", bound=Record)


def load_record(cls: type[R], path: Path) -> R:
    return cls.model_validate_json(Path(path).read_text())


class ValidatedData(Record):
    """A dataset that passed its contract, split into train and eval JSONL files."""

    source: str = Field(description="The dataset file as given.")
    digest: str = Field(
        description="sha256 of the dataset's canonical content (row order and format independent of file layout)."
    )
    file_sha256: str = Field(description="sha256 of the dataset file's bytes.")
    contract: str = Field(description="'<name>@<version>' of the contract it passed.")
    style: str = Field(description="'alpaca' (instruction/input/output) or 'chat' (messages).")
    rows: int
    train_rows: int
    eval_rows: int
    train_path: str
    eval_path: str
    report_path: str = Field(description="Validation report (JSON) in the run directory.")
    html_report_path: str | None = Field(None, description="The same report as a self-contained HTML page.")
    quarantined_rows: int = Field(0, description="Rows set aside by the quarantine policy (not trained on).")
    quarantine_path: str | None = Field(None, description="JSONL of the rows set aside, each with its reasons.")


class BaseModelRef(Record):
    """A full-precision base model on local disk, in Hugging Face format."""

    name: str
    path: str
    digest: str = Field(description="sha256 over the source files (GGUF file, or the model directory's files).")
    trust_remote_code: bool = Field(
        False, description="base_model.trust_remote_code: loads of it and of what derives from it may run its code."
    )


class QuantizedBase(Record):
    """A 4-bit quantized base model saved as a Hugging Face checkpoint."""

    base: BaseModelRef
    path: str = Field(description="Directory of the saved 4-bit checkpoint (tokenizer included).")
    quant_hash: str = Field(description="sha256 of the quantization settings; with base.digest it keys the cache.")
    compute_dtype: str
    bytes_before: int = Field(description="Parameter + buffer bytes of the full-precision model.")
    bytes_after: int = Field(description="Parameter + buffer bytes of the 4-bit model.")
    reused: bool = Field(description="True when an existing checkpoint was reused instead of quantizing again.")
    seconds: float


class Adapter(Record):
    """A trained LoRA adapter in standard PEFT format."""

    path: str = Field(description="Adapter directory (adapter_config.json + adapter_model.safetensors).")
    digest: str = Field(description="sha256 over the adapter folder's files (keys the evaluate and merge caches).")
    steps: int
    epochs: float
    train_examples: int
    trained_tokens: int = Field(description="Non-padding tokens seen in training.")
    final_loss: float = Field(description="Mean training loss over the last logging window.")
    seconds: float
    checkpoints: list[str] = Field(default_factory=list)
    loss_curve_path: str = Field(description="JSON list of (step, loss, lr) in the run directory.")


class ExampleScores(Record):
    """One model's scores example by example, in the order of the split (the gate bootstraps over them)."""

    loss: list[float] = Field(description="Mean response-token cross-entropy of each example (0 without tokens).")
    tokens: list[int] = Field(description="Response tokens scored in each example.")
    rouge_l: list[float] = Field(description="ROUGE-L F1 of the greedy answer of each of the first examples answered.")

    def mean_loss(self) -> float:
        return sum(x * t for x, t in zip(self.loss, self.tokens, strict=True)) / max(sum(self.tokens), 1)

    def mean_rouge_l(self) -> float:
        return sum(self.rouge_l) / max(len(self.rouge_l), 1)


Interval = tuple[float, float]


class ModelMetrics(Record):
    loss: float = Field(description="Mean cross-entropy per response token on the held-out split.")
    perplexity: float
    rouge_l: float = Field(description="Mean ROUGE-L F1 of greedy answers against the references.")
    tokens: int = Field(description="Response tokens scored.")
    generated: int = Field(description="Held-out prompts answered for ROUGE-L.")
    loss_interval: Interval | None = Field(None, description="Bootstrap interval of loss over examples.")
    rouge_l_interval: Interval | None = Field(None, description="Bootstrap interval of rouge_l over examples.")


class GeneralTextMetrics(Record):
    """Base and fine-tuned model on the general-text set: what the fine-tune forgot (the forgetting guard)."""

    path: str = Field(description="The general-text JSONL scored.")
    sha256: str = Field(description="sha256 of that file.")
    passages: int
    tokens: int = Field(description="Tokens scored (every token of each passage but its first).")
    base_perplexity: float
    finetuned_perplexity: float
    increase: float = Field(description="finetuned_perplexity / base_perplexity - 1 (positive: forgot).")
    increase_interval: Interval = Field(description="Bootstrap interval of increase over passages.")


class EvalReport(Record):
    base: ModelMetrics
    finetuned: ModelMetrics
    general: GeneralTextMetrics | None = Field(
        None, description="The forgetting guard (None: eval.general_text unset)."
    )
    samples_path: str = Field(description="JSONL of prompts, references and both models' answers.")
    examples_path: str = Field(description="JSONL of per-example scores of both models (loraflow.scores).")
    seconds: float

    @property
    def improved(self) -> bool:
        return self.finetuned.loss < self.base.loss and self.finetuned.rouge_l > self.base.rouge_l


class MergedModel(Record):
    path: str = Field(description="Directory of the merged model in standard Hugging Face format.")
    dtype: str
    max_abs_logit_diff: float
    tolerance: float
    seconds: float


class Lineage(Record):
    """Everything needed to say where a model version came from."""

    data_digest: str
    data_source: str
    contract: str
    base_model: str
    base_digest: str
    config_hash: str
    code_version: str
    flow_run_id: str
    mlflow_run_id: str
    eval_split: str = Field(
        "", description="Artifact URI of the held-out split the version was evaluated on (the gate re-scores on it)."
    )
    eval_examples: str = Field(
        "", description="Artifact URI of the per-example scores of the evaluation (the gate's paired comparison)."
    )

    def as_tags(self) -> dict[str, str]:
        """The registered version's lineage tags (redacted, like every writer's output)."""
        return redact(
            {
                T.DATA_DIGEST: self.data_digest,
                T.DATA_SOURCE: self.data_source,
                T.CONTRACT: self.contract,
                T.BASE_MODEL: self.base_model,
                T.BASE_DIGEST: self.base_digest,
                T.CONFIG_HASH: self.config_hash,
                T.CODE_VERSION: self.code_version,
                T.FLOW_RUN_ID: self.flow_run_id,
                T.MLFLOW_RUN_ID: self.mlflow_run_id,
                T.EVAL_SPLIT: self.eval_split,
                T.EVAL_EXAMPLES: self.eval_examples,
            }
        )


class RegisteredVersion(Record):
    name: str
    version: str
    alias: str
    model_uri: str = Field(description="'models:/<name>@<alias>'")
    run_id: str


class RunSummary(Record):
    """What a finetune run produced, as printed at its end."""

    version: RegisteredVersion
    evaluation: EvalReport
    merged: MergedModel
    run_dir: str
    mlflow_run_url: str
    flow_run_id: str
    stage_seconds: dict[str, float]
    promotion: PromotionResult | None = Field(None, description="The promotion gate's outcome, when it ran.")


class GateCheck(Record):
    """One rule of the promotion gate and how the candidate fared."""

    name: str = Field(description="e.g. 'files', 'merge', 'loss >= champion + 0.001', 'rouge_l vs base'.")
    kind: Literal["integrity", "metric"] = Field(
        description="'integrity' checks (lineage, files, merge, contract) hold even for a forced promotion."
    )
    passed: bool
    detail: str
    estimate: float | None = Field(None, description="The compared quantity (e.g. how much better), when numeric.")
    interval: Interval | None = Field(
        None, description="Its paired bootstrap interval over examples (None: compared on means only)."
    )


class Verdict(Record):
    """The promotion gate's decision on a candidate, with the numbers it decided on."""

    passed: bool
    checks: list[GateCheck]
    candidate: dict[str, float] = Field(description="Candidate's held-out metrics.")
    champion: dict[str, float] | None = Field(description="Champion's metrics on the same held-out data (None: none).")
    champion_version: str | None
    reevaluated: bool = Field(description="True when the champion was re-scored on the candidate's held-out split.")

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


class PromotionResult(Record):
    """What a promote or rollback did to the aliases, and why."""

    model: str
    action: Literal["promote", "rollback"]
    version: str = Field(description="The version promoted, restored, or refused.")
    promoted: bool = Field(description="True when `champion` now points at `version`.")
    forced: bool = False
    champion: str | None = Field(description="`champion` after the operation.")
    previous_champion: str | None = Field(description="`previous-champion` after the operation.")
    message: str = Field(description="One line: what happened, or why it was refused.")
    verdict: Verdict | None = None
    audit_seq: int | None = Field(None, description="Sequence number of the alias move in the audit ledger.")
