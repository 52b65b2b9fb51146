"""Where the code came from: recorded on every run and every registered version."""

from __future__ import annotations

import subprocess
from pathlib import Path

import loraflow

REPO_ROOT = Path(__file__).resolve().parents[1]


def code_version(root: Path = REPO_ROOT) -> str:
    """'git:<sha>' (with '+dirty' for uncommitted changes) or 'loraflow==<version>' outside a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"loraflow=={loraflow.__version__}"
    return f"git:{sha}{'+dirty' if dirty else ''}"
