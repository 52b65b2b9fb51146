"""Human-readable outputs of a run: loss-curve plot and the summary table."""

from __future__ import annotations

import json
from pathlib import Path

from loraflow.records import EvalReport, MergedModel, RegisteredVersion


def plot_loss_curve(curve_json: str | Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on workers or CI
    import matplotlib.pyplot as plt

    curve = json.loads(Path(curve_json).read_text())
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (response tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def metrics_rows(report: EvalReport) -> list[dict[str, str]]:
    rows = []
    for metric in ("loss", "perplexity", "rouge_l"):
        b, f = getattr(report.base, metric), getattr(report.finetuned, metric)
        rows.append({"metric": metric, "base": f"{b:.4f}", "fine-tuned": f"{f:.4f}", "change": f"{f - b:+.4f}"})
    if report.general is not None:  # the forgetting guard
        g = report.general
        low, high = g.increase_interval
        rows.append(
            {
                "metric": "general-text perplexity",
                "base": f"{g.base_perplexity:.4f}",
                "fine-tuned": f"{g.finetuned_perplexity:.4f}",
                "change": f"{g.increase:+.2%} [{low:+.2%}, {high:+.2%}]",
            }
        )
    return rows


def summary_markdown(
    version: RegisteredVersion,
    report: EvalReport,
    merged: MergedModel,
    mlflow_run_url: str,
    stage_seconds: dict[str, float],
) -> str:
    lines = [
        f"# Registered `{version.name}` version {version.version} (alias `{version.alias}`)",
        "",
        f"MLflow run: [{version.run_id}]({mlflow_run_url})",
        f'Load it with `mlflow.pyfunc.load_model("{version.model_uri}")`.',
        "",
        "| metric | base | fine-tuned | change |",
        "|---|---|---|---|",
        *[f"| {r['metric']} | {r['base']} | {r['fine-tuned']} | {r['change']} |" for r in metrics_rows(report)],
        "",
        f"Merge check: max |Δlogit| = {merged.max_abs_logit_diff:.3g} (tolerance {merged.tolerance:g}).",
        f"Merged model: `{merged.path}`.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in stage_seconds.items()],
    ]
    return "\n".join(lines)
