"""The throughput benchmark runs end to end (quick mode: tiny models, few steps; no timing
is asserted, only that every number it reports is there and sensible)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_reports_every_number(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--quick",
                          "--models", "fvae64", "infomax_cifar10", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["peak_gflops_start"] > 0
    assert [r["model"] for r in result["rows"]] == ["fvae64", "infomax_cifar10"]
    for row in result["rows"]:
        assert row["flops_per_step"] > 1e8 and row["median_step_s"] > 0 and row["loss_finite"]
        assert row["min_step_s"] <= row["median_step_s"] and row["peak_rss_gb"] > 0.1
    assert "| fvae64 |" in run.stdout
