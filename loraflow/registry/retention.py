"""Retention: a home that runs every night for a year stays the size of a few runs.

What goes, oldest first, within the ``retention`` settings:

- run folders beyond ``keep_runs`` (each holds the split, reports, adapter, merged model, samples);
- merged models beyond ``keep_merged`` in the run folders that stay (an fp32 model is the largest file
  of a run);
- checkpoints of trainings that finished (their adapter is in the run folder), and stage-cache
  entries that point at removed folders.

What never goes: the run folders of every version that a ``champion``, ``previous-champion`` or
``candidate`` alias points at (the gate checks their merged model, rollback needs it), runs that
are still going (no ``summary.json`` and touched within ``active_hours``), the model caches (4-bit
and converted bases), and anything in MLflow: the audit ledger, lineage, metrics and the adapters
logged with each version are never pruned.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import tags as T
from loraflow.config import RetentionConfig
from loraflow.registry.versions import CANDIDATE, CHAMPION, PREVIOUS

PROTECTING_ALIASES = (CHAMPION, PREVIOUS, CANDIDATE)


@dataclass
class Plan:
    """What a collection removes (or, dry, would remove), and what it keeps on purpose."""

    remove: list[Path] = field(default_factory=list)
    protected: dict[Path, str] = field(default_factory=dict)  # run folder -> why it stays

    @property
    def bytes(self) -> int:
        return sum(_size(p) for p in self.remove)

    def format(self) -> str:
        lines = [f"remove {_human(_size(p)):>9}  {p}" for p in self.remove]
        lines += [f"keep              {p}  ({why})" for p, why in sorted(self.protected.items())]
        lines.append(f"{'would free' if self.remove else 'frees'} {_human(self.bytes)} in {len(self.remove)} path(s)")
        return "\n".join(lines)


def protected_runs(client) -> dict[Path, str]:
    """Run folders that a champion, previous-champion or candidate version of a loraflow model needs."""
    out: dict[Path, str] = {}
    for model in client.search_registered_models(filter_string=f"tags.`{T.MANAGED}` = 'true'"):
        for alias, version in client.get_registered_model(model.name).aliases.items():
            if alias not in PROTECTING_ALIASES:
                continue
            merged = client.get_model_version(model.name, version).tags.get(T.MERGED_PATH)
            if merged:
                out[Path(merged).parent] = f"{model.name} version {version} is {alias}"
    return out


def plan(home: Path, rules: RetentionConfig, protected: dict[Path, str], now: float | None = None) -> Plan:
    """What to remove under ``home`` (nothing is touched here)."""
    now = time.time() if now is None else now
    result = Plan(protected={p: why for p, why in protected.items() if p.exists()})
    runs_dir = home / "runs"
    found = [d for d in runs_dir.iterdir() if d.is_dir()] if runs_dir.is_dir() else []
    runs = sorted(found, key=_started, reverse=True)
    active = {d for d in runs if not (d / "summary.json").exists() and now - _touched(d) < rules.active_hours * 3600}
    for d in active:
        result.protected.setdefault(d, "still running")
    unprotected = [d for d in runs if d not in result.protected]
    keep = [d for d in runs if d in result.protected] + unprotected[: rules.keep_runs]
    for d in runs:
        if d not in keep:
            result.remove.append(d)
    kept_merged = 0
    for d in sorted(keep, key=_started, reverse=True):
        if not (d / "merged").is_dir() or d in result.protected:
            continue
        kept_merged += 1
        if kept_merged > rules.keep_merged:
            result.remove.append(d / "merged")
    result.remove += _finished_checkpoints(home / "cache" / "train")
    gone = set(result.remove)
    result.remove += _dead_cache_entries(home / "cache" / "stages", gone)
    return result


def collect(home: Path, rules: RetentionConfig, client, dry_run: bool = False) -> Plan:
    """Plan and (unless ``dry_run``) remove; returns the plan that was carried out."""
    p = plan(home, rules, protected_runs(client))
    if not dry_run:
        for path in p.remove:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return p


def _finished_checkpoints(train_cache: Path) -> list[Path]:
    if not train_cache.is_dir():
        return []
    done = (d for d in train_cache.iterdir() if (d / "finished.json").is_file())
    return [d / "checkpoints" for d in done if (d / "checkpoints").is_dir()]


def _dead_cache_entries(stages: Path, removed: set[Path]) -> list[Path]:
    """Stage-cache records whose files are all in removed folders (a later run would miss them anyway)."""
    dead = []
    for entry in stages.glob("*/*.json") if stages.is_dir() else []:
        try:
            text = json.loads(entry.read_text())
        except (OSError, ValueError):
            dead.append(entry)
            continue
        paths = [Path(v) for k, v in text.items() if k == "path" and isinstance(v, str)]
        if paths and all(any(p == r or r in p.parents for r in removed) or not p.exists() for p in paths):
            dead.append(entry)
    return dead


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _started(run: Path) -> float:
    """When a run began: its config.yaml is the first file it writes."""
    return _mtime(run / "config.yaml") or _mtime(run)


def _touched(run: Path) -> float:
    """The last sign of life of a run: its folder, its stage folders, the trainer's event log."""
    return max([_mtime(run), *(_mtime(c) for c in run.iterdir()), _mtime(run / "train" / "events.jsonl")])


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
