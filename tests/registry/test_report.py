"""`history --report` without a server: versions with intervals and general-text perplexity, gate comparisons."""

from __future__ import annotations

import base64
import io
import re

from loraflow.records import GateCheck, Verdict
from loraflow.registry import audit
from loraflow.registry.history import History, VersionRow
from loraflow.registry.report import history_text, lineage_text, write_html_report

LINEAGE = {
    "data_digest": "d" * 64,
    "contract": "instruction_v1",
    "contract_version": "1",
    "merge_max_abs_logit_diff": "",
}


def row(version: str, loss: float, general: float | None, intervals: bool) -> VersionRow:
    metrics = {"loss": loss, "rouge_l": 0.2} | ({"general_perplexity": general} if general else {})
    return VersionRow(
        version=version,
        created="2026-12-01T00:00:00+00:00",
        aliases=[],
        metrics=metrics,
        base_metrics={"loss": 3.9, "rouge_l": 0.12} | ({"general_perplexity": 20.0} if general else {}),
        intervals={"loss": (loss - 0.1, loss + 0.1), "rouge_l": (0.18, 0.22)} if intervals else {},
        lineage=LINEAGE,
    )  # fmt: skip


def test_report_plots_general_perplexity_and_intervals_and_lists_the_gates_intervals(tmp_path) -> None:
    from PIL import Image

    old, new = row("1", 2.8, None, False), row("2", 2.6, 20.6, True)  # version 1: before intervals existed
    check = GateCheck(
        name="loss vs champion", kind="metric", passed=True, detail="loss 2.6 vs champion 2.8",
        estimate=0.2, interval=(0.12, 0.27),
    )  # fmt: skip
    verdict = Verdict(
        passed=True, checks=[check], candidate={"loss": 2.6}, champion={"loss": 2.8}, champion_version="1",
        reevaluated=False,
    )  # fmt: skip
    move = audit.AuditRecord(
        seq=1, action="promote", model="m", version="2", from_version="1", to_version="2", previous_champion="1",
        who="t", at="2026-12-01T00:00:00+00:00", reason="", flow_run_id=None, verdict=verdict,
    )  # fmt: skip
    h = History(model="m", aliases={"champion": "2"}, versions=[old, new], moves=[move], refusals=[])
    text = history_text(h)
    assert "general ppl" in text and "2.6000 [2.5000, 2.7000]" in text and "20.6000" in text
    assert "intervals (bootstrap)" in lineage_text(new) and "intervals" not in lineage_text(old)
    page = write_html_report(h, tmp_path / "h.html").read_text()
    assert "Gate comparisons" in page and "[+0.1200, +0.2700]" in page
    png = base64.b64decode(re.search(r"base64,([^\"]+)", page).group(1))
    assert Image.open(io.BytesIO(png)).size == (1300, 380)  # three panels: loss, ROUGE-L, general-text perplexity
