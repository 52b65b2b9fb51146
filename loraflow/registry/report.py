"""`loraflow history` output: terminal tables, a version's lineage, and an HTML report with a metrics plot."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from loraflow.registry.audit import AuditRecord
from loraflow.registry.history import History, VersionRow

_VERSION_COLUMNS = (
    "version", "registered", "aliases", "loss", "rouge_l", "base loss", "general ppl", "base general ppl",
    "merge dev", "data", "contract",
)  # fmt: skip
# Panels of the report's plot: metric, axis label, higher is better.
_PANELS = (
    ("loss", "held-out loss", False),
    ("rouge_l", "held-out ROUGE-L", True),
    ("general_perplexity", "general-text perplexity", False),
)
_MOVE_COLUMNS = ("seq", "when (UTC)", "action", "champion", "who", "gate", "reason", "flow run")
_GATE_COLUMNS = ("version", "rule", "result", "better by", "interval", "detail")


def _num(d: dict[str, float], key: str, intervals: dict[str, tuple[float, float]] | None = None) -> str:
    if key not in d:
        return "-"
    interval = (intervals or {}).get(key)
    return f"{d[key]:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def version_cells(row: VersionRow) -> list[str]:
    lin = row.lineage
    return [
        row.version,
        row.created[:19].replace("T", " "),
        ",".join(row.aliases) or "-",
        _num(row.metrics, "loss", row.intervals),
        _num(row.metrics, "rouge_l", row.intervals),
        _num(row.base_metrics, "loss"),
        _num(row.metrics, "general_perplexity"),
        _num(row.base_metrics, "general_perplexity"),
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
    intervals = ", ".join(f"{k} [{lo:.4f}, {hi:.4f}]" for k, (lo, hi) in row.intervals.items())
    lines += [f"  {'eval metrics':<26}{metrics}", f"  {'base model metrics':<26}{base}"]
    lines += [f"  {'intervals (bootstrap)':<26}{intervals}"] if intervals else []
    return "\n".join(lines)


def _span(row: VersionRow, metric: str) -> tuple[float, float] | None:
    """The interval drawn around a version's metric: the general-text perplexity's comes from the paired
    interval of its rise over the base (perplexity ratio - 1)."""
    if metric != "general_perplexity":
        return row.intervals.get(metric)
    rise, base = row.intervals.get("general_increase"), row.base_metrics.get(metric)
    return (base * (1 + rise[0]), base * (1 + rise[1])) if rise and base else None


def metrics_png(h: History) -> bytes:
    """Held-out loss and ROUGE-L (with their bootstrap intervals) and general-text perplexity (fine-tuned and
    base) across versions; champions (past and present) marked."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    champions = {m.to_version for m in h.moves}
    xs = [int(r.version) for r in h.versions]
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(13, 3.8), dpi=100)
    for ax, (metric, label, _) in zip(axes, _PANELS, strict=True):
        ys = [r.metrics.get(metric, float("nan")) for r in h.versions]
        spans = [_span(r, metric) for r in h.versions]
        low = [y - s[0] if s else 0.0 for y, s in zip(ys, spans, strict=True)]
        high = [s[1] - y if s else 0.0 for y, s in zip(ys, spans, strict=True)]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", lw=1.2, capsize=3, label="version (bootstrap interval)")
        if metric == "general_perplexity":
            base = [r.base_metrics.get(metric, float("nan")) for r in h.versions]
            ax.plot(xs, base, marker=".", ls="--", lw=1, color="gray", label="its base model")
        marked = [(x, y) for x, y, r in zip(xs, ys, h.versions, strict=True) if r.version in champions]
        if marked:
            ax.scatter(
                *zip(*marked, strict=True), s=140, marker="*", color="tab:orange", zorder=3, label="was champion"
            )
        current = h.aliases.get("champion")
        if current is not None and int(current) in xs:
            i = xs.index(int(current))
            ax.annotate("champion", (xs[i], ys[i]), textcoords="offset points", xytext=(0, 10), ha="center")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("model version")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(h.model)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _gate_rows(moves: list[AuditRecord]) -> list[list[str]]:
    """Every comparison a recorded gate made, with its interval when it had one."""
    rows = []
    for m in moves:
        for c in m.verdict.checks if m.verdict else []:
            if c.kind == "metric":
                interval = f"[{c.interval[0]:+.4f}, {c.interval[1]:+.4f}]" if c.interval else "means only"
                estimate = f"{c.estimate:+.4f}" if c.estimate is not None else "-"
                rows.append([m.version, c.name, "passed" if c.passed else "FAILED", estimate, interval, c.detail])
    return rows


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
<h2>Gate comparisons</h2><p>Paired bootstrap intervals over held-out examples of how much better the candidate
was; a rule holds at the interval's unfavourable end.</p>
{_html_table(_GATE_COLUMNS, _gate_rows(sorted(h.moves + h.refusals, key=lambda m: m.at)))}
<h2>Lineage</h2>{lineage}
</body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
