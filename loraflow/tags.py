"""Every MLflow tag name loraflow writes, in one table: runs, registered models and model versions.

    from loraflow import tags as T
    run.data.tags[T.FLOW_RUN_ID]

Records (:class:`loraflow.records.Lineage`), the register stage, the registry and the tests read
these names from here; none of them spells a ``loraflow.*`` tag itself.
"""

from __future__ import annotations

# Lineage: on the parent run of a finetune flow and on every registered version.
DATA_DIGEST = "loraflow.data_digest"
DATA_SOURCE = "loraflow.data_source"
CONTRACT = "loraflow.contract"
BASE_MODEL = "loraflow.base_model"
BASE_DIGEST = "loraflow.base_digest"
CONFIG_HASH = "loraflow.config_hash"
CODE_VERSION = "loraflow.code_version"
FLOW_RUN_ID = "loraflow.flow_run_id"
MLFLOW_RUN_ID = "loraflow.mlflow_run_id"
EVAL_SPLIT = "loraflow.eval_split"
# What a version must carry to be promoted (data source and eval split are informative).
REQUIRED_LINEAGE = (
    DATA_DIGEST,
    CONTRACT,
    BASE_MODEL,
    BASE_DIGEST,
    CONFIG_HASH,
    CODE_VERSION,
    FLOW_RUN_ID,
    MLFLOW_RUN_ID,
)

# A version's adapter, merge check and held-out figures (the gate reads them back).
ADAPTER_DIGEST = "loraflow.adapter_digest"  # registering the same adapter of the same run again finds it
MERGED_PATH = "loraflow.merged_path"
MERGE_MAX_ABS_LOGIT_DIFF = "loraflow.merge_max_abs_logit_diff"
MERGE_TOLERANCE = "loraflow.merge_tolerance"
EVAL_LOSS = "loraflow.eval_loss"
EVAL_ROUGE_L = "loraflow.eval_rouge_l"
BASE_EVAL_LOSS = "loraflow.base_eval_loss"
BASE_EVAL_ROUGE_L = "loraflow.base_eval_rouge_l"
EVAL_LOSS_INTERVAL = "loraflow.eval_loss_interval"  # "low,high": bootstrap interval over held-out examples
EVAL_ROUGE_L_INTERVAL = "loraflow.eval_rouge_l_interval"
EVAL_GENERAL_PERPLEXITY = "loraflow.eval_general_perplexity"  # the forgetting guard's general text
BASE_EVAL_GENERAL_PERPLEXITY = "loraflow.base_eval_general_perplexity"
EVAL_GENERAL_INCREASE_INTERVAL = "loraflow.eval_general_increase_interval"  # "low,high" of ppl ratio - 1
EVAL_EXAMPLES = "loraflow.eval_examples"  # artifact URI of the per-example scores (loraflow/scores.py)

# Registered models.
MANAGED = "loraflow.managed"  # "true" on the registered models loraflow created; only those are changed
AUDIT_RUN_ID = "loraflow.audit_run_id"  # the model's audit-ledger run

# Experiments.
PREFLIGHT = "loraflow.preflight"  # written by the preflight check: the experiment accepts writes

# Runs.
AUDIT_MODEL = "loraflow.audit.model"  # on a ledger run: the model it audits
FAILED_STAGE = "loraflow.failed_stage"  # on a failed parent run: the stage that raised
FAILURE = "loraflow.failure"  # on a failed parent run: the reason
CLOSED_BY = "loraflow.closed_by"  # on a run a crashed attempt left RUNNING: why reconciliation ended it
REGISTERED_MODEL = "loraflow.registered_model"
REGISTERED_VERSION = "loraflow.registered_version"
RESUMED_FROM = "loraflow.resumed_from"  # on a train run: the checkpoint it resumed from
RESUMED_ACROSS_VERSIONS = "loraflow.resumed_across_versions"  # ... and the library versions that changed
CACHED_PREFIX = "loraflow.cached."  # + stage: the stage's output was reused from this path

# The promotion lock (tags of the lock experiment).
LOCK_TOKEN = "loraflow.lock.token"
LOCK_OWNER = "loraflow.lock.owner"
LOCK_EXPIRES = "loraflow.lock.expires"


def cached(stage: str) -> str:
    """The tag that marks a reused stage output on the parent run."""
    return CACHED_PREFIX + stage
