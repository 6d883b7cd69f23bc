"""The report renders: Markdown tables and plots, and one self-contained HTML page checked in headless Chromium."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from ual.config import load_config
from ual.io import write_json, write_jsonl
from ual.report.stage import run_report


def _run_folder(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    rows = [{"id": f"s{i}", "source": src, "score": float(rng.uniform(lo, lo + 0.5))}
            for i, (src, lo) in enumerate([("chat", 0.4), ("maths", 0.0)] * 20)]
    write_jsonl(run / "scores.jsonl", rows)
    write_jsonl(run / "smoothing.jsonl", [{**r, "eps": r["score"] * 0.2} for r in rows])
    for mode in ("sft", "ual"):
        write_json(run / "train" / mode / "result.json", {"steps": 3, "samples": 40, "mean_eps": 0.1,
                                                          "train_loss": 2.0, "seconds": 5})
        write_json(run / "train" / mode / "log.json", [{"step": s, "loss": 3 - s * 0.3} for s in range(1, 4)])
    bins = [{"confidence": c, "accuracy": c - 0.1, "weight": 10, "low": c - 0.05, "high": c + 0.05} for c in (0.3, 0.6, 0.9)]
    cal = {"ece": 0.1, "bins": 3, "tokens": 30, "accuracy": 0.5, "confidence": 0.6, "reliability": bins}
    for model in ("base", "sft", "ual"):
        write_json(run / "eval" / f"{model}.json", {
            "nll": {"chat": {"nll": 2.5}, "maths": {"nll": 1.1}, "all": {"nll": 1.8}},
            "calibration": {"chat": cal, "maths": cal, "all": cal},
            "maths": {"accuracy": 0.25, "correct": 1, "n_questions": 4},
            "multiple_choice": {"accuracy": 0.3, "n_questions": 10, "acc_norm": 0.2, "pass_at_n": 0.6, "n_samples": 4,
                                "p_gold": 0.31, "ece": 0.05, "reliability": bins}})

    def iv(est, lo, hi, better="lower"):
        return {"estimate": est, "low": lo, "high": hi, "level": 0.95, "n": 10, "method": "paired bootstrap",
                "excludes_zero": lo > 0 or hi < 0, "better": better}

    write_json(run / "comparisons.json", {
        "settings": {"bootstrap": 2000, "ece_bins": 15, "runs": [str(run)]},
        "pairs": {"ual:sft": {"nll/all": iv(-0.05, -0.08, -0.02), "nll/chat": iv(0.01, -0.02, 0.04),
                              "ece/all": iv(-0.01, -0.03, 0.01), "mc/p_gold": iv(0.0, -0.01, 0.01, "higher")}}})
    return run


def test_markdown_report_has_every_table_and_plot(tmp_path):
    run = _run_folder(tmp_path)
    cfg = load_config(None, {"run_dir": str(run), "name": "r"})
    text = run_report(cfg)
    assert "| ual | 2.5000 | 1.1000 | 1.8000 | 0.1000 | 0.3100 | 0.300 (n=10) | 0.0500 |" in text
    # The verdict opens the report: each claim with its interval and what it says.
    assert text.index("## Verdict") < text.index("## Training")
    assert "| overall | ual − sft | nll/all | -0.0500 [-0.0800, -0.0200] * | UAL better |" in text
    assert "| per source | ual − sft | nll/chat | +0.0100 [-0.0200, +0.0400] | no detectable difference |" in text
    assert "## Calibration" in text and "## Paired differences" in text
    for png in ("scores.png", "smoothing.png", "loss.png", "reliability.png"):
        assert f"]({png})" in text and (run / png).stat().st_size > 1000
    html = (run / "report.html").read_text()
    separators = sum(line.startswith("|---") for line in text.splitlines())
    assert html.count("<table>") == separators == 5 and "data:image/png;base64," in html
    assert 'src="scores.png"' not in html  # inlined: the page stands alone


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (make test installs it where apt can)")
def test_html_report_renders_in_headless_chromium(tmp_path):
    run = _run_folder(tmp_path)
    run_report(load_config(None, {"run_dir": str(run), "name": "r"}))
    # A copy with a probe that records, after load, what the browser actually laid out.
    probe = """<script>window.addEventListener('load', () => {
      const imgs = [...document.images];
      document.body.setAttribute('data-probe', JSON.stringify({
        tables: document.querySelectorAll('table').length,
        rows: document.querySelectorAll('tr').length,
        images: imgs.length,
        decoded: imgs.filter(i => i.complete && i.naturalWidth > 100).length}));});</script></body>"""
    page = tmp_path / "probe.html"
    page.write_text((run / "report.html").read_text().replace("</body>", probe))
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"data-probe=\"([^\"]+)\"", proc.stdout)
    assert found, proc.stderr[-2000:]
    import html as htmllib
    import json

    probe = json.loads(htmllib.unescape(found.group(1)))
    assert probe["tables"] == 5 and probe["rows"] >= 20
    assert probe["images"] == 4 and probe["decoded"] == 4
