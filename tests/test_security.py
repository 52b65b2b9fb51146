"""Security defaults, checked where a run starts: what a config file may load, and what a run records.

The stack's bind address is tested in tests/stack/test_bind.py, a model's own code and the model roots at the ML
level in tests/ml/test_models.py, credentials in URLs in tests/test_credentials.py (and over a whole pipeline run
in tests/flows/test_credentials.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flows.preflight import preflight, raise_if_any
from loraflow.config import load_config
from loraflow.errors import UsageError
from tests.conftest import tiny_records, write_jsonl
from tests.ml.test_models import with_own_code


def _config(path: Path, model: str, **base_model) -> Path:
    cfg = {
        "base_model": {"name": "tiny-test", "path": model, **base_model},
        "data": {"path": "../data/train.jsonl"},
        "train": {"max_steps": 1},
        "registry": {"model_name": "tiny-adapter"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_preflight_refuses_a_model_outside_the_project_or_with_untrusted_code(tiny_model_dir, tmp_path) -> None:
    """Before any work starts, a config file's model must lie in its project, and run no code it did not allow."""
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    write_jsonl(project / "data" / "train.jsonl", tiny_records())
    elsewhere = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "tiny")
    with_code = with_own_code(tiny_model_dir, project / "models" / "custom")
    configs = project / "configs"

    def problems(config: Path) -> list[str]:
        found = preflight(load_config(config), tmp_path / "home", f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert all(p.usage for p in found)  # the config's to fix: exit 2
        return [p.what for p in found]

    outside = _config(configs / "outside.yaml", str(elsewhere))
    assert problems(outside) == [
        f"base model: model folder {elsewhere} is outside the allowed model roots ({project}); "
        "move it under one of them or add its folder to base_model.allowed_roots"
    ]
    with pytest.raises(UsageError, match=r"^preflight found a problem:\n  - base model: model folder"):
        raise_if_any(preflight(load_config(outside), tmp_path / "home", "sqlite:///x.db"))
    assert problems(_config(configs / "listed.yaml", str(elsewhere), allowed_roots=[str(elsewhere.parent)])) == []

    [code] = problems(_config(configs / "code.yaml", "../models/custom"))
    assert code.startswith(f"base model 'tiny-test' ({with_code}) ships its own Python code")
    assert problems(_config(configs / "trusted.yaml", "../models/custom", trust_remote_code=True)) == []
