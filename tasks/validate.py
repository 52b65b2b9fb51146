"""validate: dataset file + data contract -> ValidatedData (split files, digest, reports).

    from tasks.validate import validate
    validate(cfg.data, Path("runs/demo"), tokenizer_path=base.path, max_seq_length=cfg.train.max_seq_length)

The passes live in loraflow.data.validation; this stage resolves the contract and the file, counts
example lengths with the run's tokenizer and turns a passing check into the record the next stages
read. The JSON report, its HTML page and the quarantine file are written whether the data passes
or not. Great Expectations and transformers are imported lazily: the CLI imports this module.
"""

from __future__ import annotations

from pathlib import Path

from loraflow.config import DataConfig
from loraflow.data.contracts import DEFAULT_CONTRACTS_DIR, load_contract
from loraflow.data.files import check_source
from loraflow.data.validation import CHUNK_ROWS, check_file
from loraflow.errors import UsageError
from loraflow.records import ValidatedData


def validate(
    cfg: DataConfig,
    run_dir: Path,
    tokenizer_path: str | Path | None = None,
    max_seq_length: int | None = None,
    contracts_dir: Path = DEFAULT_CONTRACTS_DIR,
    chunk_rows: int = CHUNK_ROWS,
    *,
    trust_remote_code: bool = False,
) -> ValidatedData:
    """Check cfg.path against its contract and write the train/eval split into run_dir/data.

    With ``tokenizer_path`` (the base model's folder) and ``max_seq_length``, example lengths are
    counted in that tokenizer's tokens through the training template (loraflow.ml.prompts);
    ``trust_remote_code`` is that model's ``base_model.trust_remote_code``.

    Raises:
        UsageError: the contract is unknown or invalid, or the path is wrong (missing, a directory,
            outside data.allowed_roots, of an unknown or unaccepted format).
        DataError: the file is empty, binary, too large or malformed (the message names the line).
        ContractViolation: the data fails the contract under the configured policy (reports written first).
    """
    if (tokenizer_path is None) != (max_seq_length is None):
        raise UsageError("give both tokenizer_path and max_seq_length to check example lengths, or neither")
    contract = load_contract(cfg.contract, contracts_dir)
    source, kind = check_source(
        Path(cfg.path), cfg.format, cfg.allowed_roots, contract.max_file_bytes, contract.meta["format"].get("accepted")
    )
    tok = _load_tokenizer(tokenizer_path, trust_remote_code) if tokenizer_path is not None else None
    out = Path(run_dir).resolve() / "data"
    done = check_file(source, kind, contract, cfg, out, tok, max_seq_length, str(tokenizer_path), chunk_rows)
    quarantine = done.report.quarantine
    return ValidatedData(
        source=str(source),
        digest=done.split.digest,
        file_sha256=done.file_sha256,
        contract=contract.ref,
        style=contract.style,
        rows=done.split.rows,
        train_rows=done.split.train_rows,
        eval_rows=done.split.eval_rows,
        train_path=str(done.outputs.train),
        eval_path=str(done.outputs.eval),
        report_path=done.report.report_path,
        html_report_path=done.report.html_path,
        quarantined_rows=quarantine.rows if quarantine else 0,
        quarantine_path=quarantine.path if quarantine else None,
    )


def validate_file(
    path: str,
    contract: str,
    run_dir: Path,
    policy: str = "fail",
    tokenizer_path: str | None = None,
    max_seq_length: int | None = None,
    contracts_dir: Path = DEFAULT_CONTRACTS_DIR,
) -> ValidatedData:
    """`loraflow validate DATA --contract NAME`: the stage with default split settings, any path allowed."""
    cfg = DataConfig(path=str(path), contract=contract, policy=policy)  # type: ignore[arg-type]
    return validate(cfg, run_dir, tokenizer_path, max_seq_length, contracts_dir)


def _load_tokenizer(path: str | Path, trust_remote_code: bool):
    from loraflow.ml.models import load_tokenizer

    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UsageError(f"cannot load a tokenizer from {path}: {e}; pass the base model's folder") from e
