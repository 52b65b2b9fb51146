"""reevaluate: a registered version on another version's held-out split -> its metrics there.

The promotion gate compares candidate and champion on the same held-out data. When the champion
was evaluated on other data (new dataset, contract or eval settings), its recorded numbers say
nothing about the candidate's split, so it is scored again here with the same functions as the
evaluate stage: the version's adapter from the registry on its 4-bit base, example by example, so
that the gate's comparison stays paired.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from peft import PeftModel

from loraflow.config import EvalConfig
from loraflow.errors import StageError
from loraflow.ml.examples import read_jsonl
from loraflow.ml.models import load_quantized, load_tokenizer
from loraflow.ml.scoring import score
from loraflow.records import ExampleScores


def score_version(tracking_uri: str, model_uri: str, split_uri: str, cfg: EvalConfig, max_length: int) -> ExampleScores:
    """Held-out loss and ROUGE-L of the registered ``model_uri`` (models:/NAME/N) on the split at ``split_uri``,
    example by example (the gate pairs them with the candidate's)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=f"{tmp}/model", tracking_uri=tracking_uri))
        split = mlflow.artifacts.download_artifacts(split_uri, dst_path=f"{tmp}/split", tracking_uri=tracking_uri)
        model_config = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["config"]
        base_path = Path(model_config["quantized_base_path"])
        if not (base_path / "config.json").is_file():
            raise StageError(
                f"cannot re-score {model_uri}: its 4-bit base ({model_config['base_model']}) is not at {base_path} "
                "on this machine; run the quantize stage for that base here, or promote where it is"
            )
        adapter = local / "artifacts" / "adapter"
        records = read_jsonl(split)
        gen_records = records[: cfg.generation_rows] if cfg.generation_rows else records
        # Inference only, never trained: bitsandbytes' faster CPU layout is safe here.
        # The base's code runs only if the version recorded that its config allowed it (older ones: never).
        trust = bool(model_config.get("trust_remote_code", False))
        quantized = load_quantized(base_path, trust_remote_code=trust, cpu_repack=True)
        model = PeftModel.from_pretrained(quantized, str(adapter)).eval()
        tok = load_tokenizer(adapter, trust_remote_code=trust)
        _, _, examples = score(model, tok, records, gen_records, cfg, max_length)
    return examples
