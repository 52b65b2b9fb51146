"""loraflow: workflow-orchestrated QLoRA fine-tuning (the shared core; no Prefect flows here)."""

__version__ = "0.1.0"
