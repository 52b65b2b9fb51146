"""The validation report for people: terminal text, Markdown (Prefect artifact) and an HTML page.

All three render the JSON report that the validate stage writes. The HTML page is one file with
inline CSS and no scripts or remote assets (GX's Data Docs pull CSS/JS from CDNs and render
unstyled offline), so it opens the same from an MLflow artifact, a CI log or a laptop on a plane.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from loraflow.data.contracts import DATASET_COLUMNS, ROW_COLUMNS, Contract


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _where(example: dict[str, Any]) -> str:
    return f"line {example['line']}" if example.get("line") else f"row {example['row']}"


def _examples(f: dict[str, Any], width: int = 40) -> list[str]:
    """'line 4: value', with rows sharing one value (e.g. a repeated answer) listed together."""
    groups: dict[str, list[str]] = {}
    for e in f["examples"]:
        groups.setdefault(_clip(repr(e["value"]), width), []).append(_where(e))
    return [f"{', '.join(where)}: {value}" for value, where in groups.items()]


def _expected(f: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in f["expected"].items()) or "-"


def _percent(f: dict[str, Any]) -> str:
    p = f.get("unexpected_percent")
    return "" if p is None or not f.get("unexpected_count") else f" ({p:.2f}%)"


def _headline(report: dict[str, Any]) -> str:
    head = f"{report['source']} against {report['contract']} ({report['rows']} rows, policy {report['policy']}): "
    if report["status"] == "passed":
        return head + f"passed all {report['evaluated']} expectations"
    if report["status"] == "passed with quarantine":
        return head + f"passed; {report['failed']} of {report['evaluated']} expectations failed on rows set aside"
    return head + f"FAILED: {report['failed']} of {report['evaluated']} expectations failed"


def _extras(report: dict[str, Any]) -> list[str]:
    lines = []
    if report["not_evaluated"]:
        lines.append(f"not evaluated (column missing): {', '.join(report['not_evaluated'])}")
    skipped = [r for r in report["results"] if r["skipped"] and not r["skipped"].startswith("column")]
    if skipped:
        names = ", ".join(f"{r['expectation']}({r['column']})" for r in skipped)
        lines.append(f"skipped: {names}: {skipped[0]['skipped']}")
    q = report.get("quarantine")
    if q:
        where = f" -> {q['path']}" if q.get("path") else ""
        verb = "would be set aside" if report["status"] == "failed" else "set aside"
        lines.append(f"quarantine: {q['rows']} rows ({q['share']:.2%}) {verb}, limit {q['max_share']:.2%}{where}")
    t = report.get("tokens")
    if t:
        lines.append(
            f"tokens: mean {t['mean']}, p95 {t['p95']}, max {t['max']}; {t['truncated_rows']} rows "
            f"({t['truncated_share']:.2%}) longer than max_seq_length {t['max_seq_length']} would be truncated"
        )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal: a header and one table row per failed expectation."""
    lines = [_headline(report)]
    if report["failures"]:
        table = [("expectation", "column", "expected", "observed", "examples")]
        for f in report["failures"]:
            observed = f"{f['observed']}{_percent(f)}"
            table.append((f["expectation"], f["column"], _expected(f), observed, "; ".join(_examples(f))))
        widths = [min(max(len(row[i]) for row in table), 44) for i in range(4)]
        for row in table:
            cells = [_clip(row[i], widths[i]).ljust(widths[i]) for i in range(4)] + [_clip(row[4], 110)]
            lines.append("  " + "  ".join(cells).rstrip())
    lines += [f"  {x}" for x in _extras(report)]
    if report.get("reason"):
        lines.append(f"Stopped: {report['reason']}.")
    if report["status"] == "failed":
        other = "data.policy 'quarantine' to set bad rows aside" if report["policy"] == "fail" else "another contract"
        lines.append(f"Fix the data (or choose {other}); nothing was trained or registered.")
    if report.get("html_path"):
        lines.append(f"Report: {report['html_path']} (JSON: {report['report_path']})")
    return "\n".join(lines)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any], mlflow_run_url: str | None = None) -> str:
    """The Prefect artifact: status, failed expectations with counts and examples, link to the run."""
    lines = [
        f"## Data contract `{report['contract']}`: {report['status'].upper()}",
        "",
        f"`{report['source']}`: {report['rows']} rows, policy `{report['policy']}`, "
        f"{report['failed']} of {report['evaluated']} expectations failed.",
    ]
    if mlflow_run_url:
        lines.append(f"MLflow run: [{mlflow_run_url}]({mlflow_run_url}) (artifacts `data/validation_report.html`).")
    if report.get("reason"):
        lines += ["", f"**Stopped:** {_md(report['reason'])}."]
    if report["failures"]:
        lines += ["", "| expectation | column | expected | observed | examples |", "|---|---|---|---|---|"]
        for f in report["failures"]:
            lines.append(
                f"| {_md(f['expectation'])} | {_md(f['column'])} | {_md(_expected(f))} | "
                f"{_md(str(f['observed']) + _percent(f))} | {_md('; '.join(_examples(f, 60))) or '-'} |"
            )
    extras = _extras(report)
    if extras:
        lines += ["", *[f"- {_md(x)}" for x in extras]]
    return "\n".join(lines)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1f2328;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;width:100%;margin:.5rem 0}th,td{border:1px solid #d0d7de;padding:.3rem .5rem;
text-align:left;vertical-align:top}th{background:#f6f8fa}code{background:#f6f8fa;padding:0 .2rem;border-radius:3px}
.badge{display:inline-block;padding:.15rem .6rem;border-radius:1rem;color:#fff;font-weight:600}
.passed{background:#1a7f37}.failed{background:#cf222e}.quarantine{background:#9a6700}.skipped{background:#6e7781}
.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:600}.muted{color:#6e7781}
.bar{background:#0969da;height:.8rem;display:inline-block}ul{margin:0;padding-left:1.1rem}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def render_html(report: dict[str, Any], contract: Contract) -> str:
    """A self-contained HTML page (inline CSS, no scripts, no remote assets)."""
    status = report["status"]
    badge = {"passed": "passed", "failed": "failed"}.get(status, "quarantine")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(report['contract'])}: {_e(status)}</title><style>{CSS}</style></head><body>",
        f"<h1>Data contract <code>{_e(report['contract'])}</code> "
        f"<span class='badge {badge}'>{_e(status.upper())}</span></h1>",
        f"<p><b>Dataset</b> <code>{_e(report['source'])}</code> ({_e(report['format'])}, {report['rows']:,} rows) "
        f"&middot; <b>policy</b> <code>{_e(report['policy'])}</code> &middot; <b>owner</b> "
        f"{_e(report['contract_owner'])} &middot; {report['failed']} of {report['evaluated']} expectations failed</p>",
    ]
    if report.get("reason"):
        parts.append(f"<p class='bad'>Stopped: {_e(report['reason'])}.</p>")
    if report.get("split"):
        s = report["split"]
        parts.append(f"<p>Split written: {s['train_rows']:,} train / {s['eval_rows']:,} held-out rows.</p>")
    extras = _extras(report)
    if extras:
        parts.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in extras) + "</ul>")
    parts.append("<h2>Failed expectations</h2>")
    if report["failures"]:
        parts.append(_html_table(report["failures"], with_status=False))
    else:
        parts.append("<p class='ok'>None.</p>")
    t = report.get("tokens")
    if t:
        parts.append(f"<h2>Example length in tokens (max_seq_length {t['max_seq_length']})</h2>")
        peak = max((b["rows"] for b in t["histogram"]), default=1) or 1
        rows = "".join(
            f"<tr><td>{b['from']}&ndash;{b['to'] - 1}</td><td>{b['rows']:,}</td><td>"
            f"<span class='bar' style='width:{400 * b['rows'] // peak}px'></span></td></tr>"
            for b in t["histogram"]
        )
        parts.append(f"<table><tr><th>tokens</th><th>rows</th><th></th></tr>{rows}</table>")
        parts.append(f"<p class='muted'>Tokenizer: <code>{_e(t['tokenizer'])}</code></p>")
    parts.append("<h2>All expectations</h2>")
    parts.append(_html_table(report["results"], with_status=True))
    parts.append("<h2>Contract</h2>")
    parts.append(f"<p>{_e(contract.meta.get('description', ''))}</p>")
    cols = "".join(
        f"<tr><td><code>{_e(name)}</code></td><td>{_e(spec.get('type', ''))}</td>"
        f"<td>{_e(spec['description'])}</td></tr>"
        for name, spec in contract.meta["columns"].items()
    )
    derived = "".join(
        f"<tr><td><code>{_e(name)}</code></td><td>derived</td><td>{_e(text)}</td></tr>"
        for name, text in {**ROW_COLUMNS, **DATASET_COLUMNS}.items()
    )
    parts.append(f"<table><tr><th>column</th><th>type</th><th>meaning</th></tr>{cols}{derived}</table>")
    parts.append(
        f"<p class='muted'>Contract files: <code>{_e(contract.path)}</code>. "
        f"JSON report: <code>{_e(report.get('report_path', ''))}</code>.</p></body></html>"
    )
    return "\n".join(parts)


def _html_table(items: list[dict[str, Any]], with_status: bool) -> str:
    head = "<tr>" + ("<th>status</th>" if with_status else "")
    head += "<th>expectation</th><th>column</th><th>expected</th><th>observed</th><th>examples</th></tr>"
    rows = []
    for f in items:
        if f["skipped"]:
            state = "<td class='muted'>skipped</td>"
        else:
            state = "<td class='ok'>passed</td>" if f["success"] else "<td class='bad'>failed</td>"
        examples = "".join(f"<li>{_e(x)}</li>" for x in _examples(f, 120))
        note = f"<br><span class='muted'>{_e(f['notes'])}</span>" if f.get("notes") else ""
        rows.append(
            "<tr>"
            + (state if with_status else "")
            + f"<td><code>{_e(f['expectation'])}</code>{note}</td><td><code>{_e(f['column'])}</code></td>"
            f"<td>{_e(_expected(f))}</td><td>{_e(str(f['observed']) + _percent(f))}</td>"
            f"<td>{'<ul>' + examples + '</ul>' if examples else ''}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def write_html(report: dict[str, Any], contract: Contract, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, contract), encoding="utf-8")
    return path
