"""`loraflow history` output: terminal tables, a version's lineage, and an HTML report with a metrics plot."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from loraflow.registry.audit import AuditRecord
from loraflow.registry.history import History, VersionRow

_VERSION_COLUMNS = ("version", "registered", "aliases", "loss", "rouge_l", "base loss", "merge dev", "data", "contract")
_MOVE_COLUMNS = ("seq", "when (UTC)", "action", "champion", "who", "gate", "reason", "flow run")


def _num(d: dict[str, float], key: str) -> str:
    return f"{d[key]:.4f}" if key in d else "-"


def version_cells(row: VersionRow) -> list[str]:
    lin = row.lineage
    return [
        row.version,
        row.created[:19].replace("T", " "),
        ",".join(row.aliases) or "-",
        _num(row.metrics, "loss"),
        _num(row.metrics, "rouge_l"),
        _num(row.base_metrics, "loss"),
        lin["merge_max_abs_logit_diff"] or "-",
        lin["data_digest"][:12] or "-",
        f"{lin['contract']}@{lin['contract_version']}" if lin["contract"] else "-",
    ]


def move_cells(m: AuditRecord) -> list[str]:
    if m.verdict is None:
        gate = "-"
    else:
        gate = "passed" if m.verdict.passed else "failed"
        gate += " (re-scored)" if m.verdict.reevaluated else ""
    if m.forced:
        gate = f"FORCED, {gate}"
    return [
        str(m.seq) if m.seq is not None else "-",
        m.at[:19].replace("T", " "),
        m.action,
        f"{m.from_version or 'none'} -> {m.to_version or 'none'}" if m.seq is not None else f"{m.version} refused",
        m.who,
        gate,
        m.reason,
        m.flow_run_id or "-",
    ]


def _table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def history_text(h: History) -> str:
    """Versions with their metrics, then every alias move (and refused attempt) in order."""
    champ = h.aliases.get("champion", "none")
    prev = h.aliases.get("previous-champion", "none")
    parts = [
        f"{h.model}: champion {champ}, previous-champion {prev}",
        "",
        _table(_VERSION_COLUMNS, [version_cells(r) for r in h.versions]),
        "",
        "alias moves:" if h.moves else "alias moves: none yet",
    ]
    if h.moves:
        parts.append(_table(_MOVE_COLUMNS, [move_cells(m) for m in h.moves]))
    if h.refusals:
        parts += ["", "refused promotions:", _table(_MOVE_COLUMNS, [move_cells(m) for m in h.refusals])]
    return "\n".join(parts)


def lineage_text(row: VersionRow) -> str:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in row.metrics.items())
    base = ", ".join(f"{k} {v:.4f}" for k, v in row.base_metrics.items())
    lines = [f"version {row.version} (registered {row.created}, aliases: {', '.join(row.aliases) or 'none'})"]
    lines += [f"  {k:<26}{v}" for k, v in row.lineage.items()]
    lines += [f"  {'eval metrics':<26}{metrics}", f"  {'base model metrics':<26}{base}"]
    return "\n".join(lines)


def metrics_png(h: History) -> bytes:
    """Held-out loss and ROUGE-L across versions; champions (past and present) marked."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    champions = {m.to_version for m in h.moves}
    xs = [int(r.version) for r in h.versions]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for ax, metric in zip(axes, ("loss", "rouge_l"), strict=True):
        ys = [r.metrics.get(metric, float("nan")) for r in h.versions]
        ax.plot(xs, ys, marker="o", lw=1.2, label="version")
        marked = [(x, y) for x, y, r in zip(xs, ys, h.versions, strict=True) if r.version in champions]
        if marked:
            ax.scatter(
                *zip(*marked, strict=True), s=140, marker="*", color="tab:orange", zorder=3, label="was champion"
            )
        current = h.aliases.get("champion")
        if current is not None and int(current) in xs:
            i = xs.index(int(current))
            ax.annotate("champion", (xs[i], ys[i]), textcoords="offset points", xytext=(0, 10), ha="center")
        ax.set_xlabel("model version")
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(h.model)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _html_table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html_report(h: History, out: Path) -> Path:
    """A self-contained HTML page (plot embedded as PNG): versions, alias moves, refusals, lineage."""
    png = base64.b64encode(metrics_png(h)).decode()
    lineage = "".join(
        f"<h3>version {html.escape(r.version)}</h3>"
        + _html_table(("field", "value"), [[k, v] for k, v in r.lineage.items()])
        for r in h.versions
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(h.model)}: history</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}</style></head><body>
<h1>{html.escape(h.model)}</h1>
<p>champion: <b>{html.escape(h.aliases.get("champion", "none"))}</b>,
previous-champion: {html.escape(h.aliases.get("previous-champion", "none"))}</p>
<img alt="held-out metrics by version" src="data:image/png;base64,{png}">
<h2>Versions</h2>{_html_table(_VERSION_COLUMNS, [version_cells(r) for r in h.versions])}
<h2>Alias moves</h2>{_html_table(_MOVE_COLUMNS, [move_cells(m) for m in h.moves])}
<h2>Refused promotions</h2>{_html_table(_MOVE_COLUMNS, [move_cells(m) for m in h.refusals])}
<h2>Lineage</h2>{lineage}
</body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
