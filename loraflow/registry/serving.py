"""The MLflow pyfunc flavour of a loraflow adapter: 4-bit base + LoRA adapter that answers prompts.

    model = mlflow.pyfunc.load_model("models:/NAME@candidate")
    model.predict(["Define the noun \\"friendship\\"."])  # or a DataFrame with a 'prompt' column

The adapter files travel as the model's artifacts; the base is referenced by path and digest
(``model_config``), not copied into every version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

PROMPT_COLUMN = "prompt"


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from peft import PeftModel

        from loraflow.ml.models import load_quantized, load_tokenizer

        cfg = context.model_config
        base_path = Path(cfg["quantized_base_path"])
        if not (base_path / "config.json").is_file():
            raise FileNotFoundError(
                f"the 4-bit base this adapter needs is not at {base_path} (base model {cfg['base_model']}, "
                f"digest {cfg['base_digest']}). Run the quantize stage for that base on this machine, "
                "or download the adapter and load it on your own copy of the base."
            )
        # The base's code runs only if its config allowed it when this version was registered (older versions
        # did not record it: never).
        trust = bool(cfg.get("trust_remote_code", False))
        self.tokenizer = load_tokenizer(context.artifacts["adapter"], trust_remote_code=trust)
        base = load_quantized(base_path, trust_remote_code=trust, cpu_repack=True)  # inference only
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()
        self.max_new_tokens = int(cfg["max_new_tokens"])  # EvalConfig.max_new_tokens of the run that registered it
        self.batch_size = int(cfg.get("batch_size", 8))

    # `pd.DataFrame` is what MLflow hands over after enforcing the logged signature (a list or a string
    # arrives as a one-column frame), and a hint MLflow infers no schema from: the logged signature,
    # with its `max_new_tokens` param, stays the one schema. (A `list[str]` hint would replace it and
    # drop the param; no hint at all makes MLflow warn on every load.)
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """Greedy answers to the prompts: a DataFrame's 'prompt' (or first) column; a list or string called directly."""
        from loraflow.ml.prompts import prompt_text
        from loraflow.ml.scoring import generate_answers

        prompts = _prompts(model_input)
        texts = [prompt_text(self.tokenizer, {"instruction": p, "input": "", "output": ""}) for p in prompts]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return generate_answers(self.model, self.tokenizer, texts, self.batch_size, max_new)


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        column = PROMPT_COLUMN if PROMPT_COLUMN in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[column]]
    return [str(x) for x in model_input]
