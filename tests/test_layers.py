"""The floors of the tree (DESIGN.md): every import points down, and the ML core runs without orchestration.

flows/      Prefect, the CLI, deployments          may import tasks/ and loraflow/
tasks/      one module per stage                   may import loraflow/, never another stage
loraflow/   the core                               never imports flows/ or tasks/
loraflow/ml the ML core                            torch/transformers/peft/bitsandbytes only
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("prefect", "mlflow", "great_expectations", "datasets")
# What the ML core may import from the rest of loraflow: the shared vocabulary at the package's top.
ML_MAY_IMPORT = {"loraflow", "loraflow.config", "loraflow.errors", "loraflow.hashing", "loraflow.records"}
ML_MAY_IMPORT |= {"loraflow.tracking", "loraflow.tags"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports, at any depth (lazy imports inside functions count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)]
            # `from loraflow.ml import memory` imports the submodule loraflow.ml.memory
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module.startswith("loraflow")]
    return out


def _violations() -> list[str]:
    found = []
    for path in sorted((ROOT / "loraflow").rglob("*.py")):
        rel = path.relative_to(ROOT)
        in_ml = rel.parts[:2] == ("loraflow", "ml")
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            if top in ("flows", "tasks"):
                found.append(f"{rel}:{line} imports {mod} (the core never imports the layers above it)")
            if in_ml and top in ORCHESTRATION:
                found.append(f"{rel}:{line} imports {mod} (the ML core runs without orchestration)")
            if in_ml and top == "loraflow" and not mod.startswith("loraflow.ml"):
                known = mod in ML_MAY_IMPORT or mod.rsplit(".", 1)[0] in ML_MAY_IMPORT - {"loraflow"}
                if not known:
                    found.append(f"{rel}:{line} imports {mod} (the ML core imports only the shared vocabulary)")
    for path in sorted((ROOT / "tasks").rglob("*.py")):
        rel = path.relative_to(ROOT)
        for line, mod in _imports(path):
            if mod.split(".")[0] == "tasks":
                found.append(f"{rel}:{line} imports {mod} (a stage never imports another stage)")
            if mod.split(".")[0] == "flows":
                found.append(f"{rel}:{line} imports {mod} (tasks never import flows)")
    return found


def test_every_import_points_down():
    assert _violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an import that runs up is reported (so the test above can fail)."""
    fake = tmp_path / "loraflow" / "ml"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from flows.finetune import finetune\n    import mlflow\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "a.py").write_text("from tasks.b import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = _violations()
    assert any("imports flows.finetune" in v for v in found)
    assert any("imports mlflow" in v for v in found)
    assert any("tasks/a.py:1 imports tasks.b" in v for v in found)


def test_ml_core_and_gpu_stages_import_without_orchestration():
    """What the GPU image runs (no Prefect, MLflow, GX or datasets there) imports with those made unimportable."""
    ml = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "loraflow" / "ml").glob("*.py")
        if p.name != "__init__.py"
    )
    modules = [*ml, "tasks.quantize", "tasks.train", "tasks.evaluate", "tasks.merge"]
    code = textwrap.dedent(
        f"""
        import importlib, sys
        BLOCKED = {ORCHESTRATION!r}
        for name in BLOCKED:  # as if not installed: `import` raises, importlib.util.find_spec says None
            sys.modules[name] = None
        for m in {modules!r}:
            importlib.import_module(m)
        leaked = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in BLOCKED and mod is not None)
        assert not leaked, leaked
        print("ok", len({modules!r}))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"ok {len(modules)}"
