"""benchmarks/gpu_check.py's CPU rehearsal (--device cpu --tiny) as a real subprocess: every section runs
the code path the GPU run takes, on tiny shapes, and the closing JSON line says so."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_rehearsal(tmp_path, tokenizer):  # tokenizer: converts the SmolLM2 alias once, for section 4
    table = tmp_path / "gpu_table.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(table)], check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    s = result["sections"]
    assert list(s) == ["exactness", "speed", "train_step", "e2e"]
    assert all(sec["status"] == "ok" for sec in s.values()), {k: v.get("error") for k, v in s.items()}
    assert result["ok"] and result["tiny"] and result["device"] == "cpu"

    exact = s["exactness"]
    assert exact["passed"]
    chunked = [r for r in exact["rows"] if r["variant"].startswith("chunked")]
    assert {(r["head"], r["dtype"]) for r in chunked} == {(h, d) for h in ("llama2", "llama3", "gemma3")
                                                         for d in ("float32", "bfloat16")}
    # default chunk, a small one (several chunks), and the token-level modes (dft, eaft, weighted) at the default
    assert len(chunked) == 30 and all(r["pass"] for r in chunked)
    assert {r["variant"] for r in chunked} >= {"chunked dft, chunk default", "chunked eaft, chunk default",
                                               "chunked weighted, chunk default"}

    rows = {(r["head"], r["variant"]): r for r in s["speed"]["rows"]}
    for head in ("llama2", "llama3", "gemma3"):
        ce, ours = rows[(head, "ce")], rows[(head, "ual_chunked")]
        assert ce["status"] == ours["status"] == "ok" and ours["tokens_per_s"] > 0
        assert ce["time_vs_ce"] == 1 and math.isfinite(ours["time_vs_ce"]) and ours["time_vs_ce"] > 0
        liger = rows[(head, "liger")]  # no Liger on CPU: skipped, with the reason
        assert liger["status"] == "skipped" and liger["note"].startswith("skipped: ")
        for scale in ("dft", "eaft"):  # the token-level rivals, against ual's own chunked loss in the same run
            row = rows[(head, f"ual_{scale}")]
            assert row["status"] == "ok" and math.isfinite(row["time_vs_ual_chunked"])
        lce = rows[(head, "torch_lce")]
        assert lce["status"] == "ok" or lce["note"].startswith("skipped: ")

    lora, full = s["train_step"]["rows"]
    assert lora["status"] == "ok" and lora["mode"].startswith("LoRA") and lora["steps"] == 3
    assert lora["tokens_per_s"] > 0 and lora["estimate_gib"] > 0 and lora["estimate_tokens_per_s"] > 0
    assert math.isfinite(lora["loss"]) and full["status"] == "ok"

    e2e = s["e2e"]
    assert e2e["steps"] == 2 and e2e["loss_impl"] == "chunked" and math.isfinite(e2e["final_loss"])

    md = table.read_text()
    assert "CPU rehearsal" in md
    for title in ("## 1. Exactness", "## 2. Speed", "## 3. Training step", "## 4. `ual train` end to end"):
        assert title in md
