"""`make gpu-check` (tools/gpu_check.py), dry-run on the CPU: every step runs, the report is
written, and the targets a CPU can check hold. The real run needs a GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_through_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["dry_run"]
    assert [s["step"] for s in report["steps"]] == ["gpu tests", "executed kernels", "bench", "fit gpu", "fit gpu, no graph", "fit cpu", "eval on the run's device", "eval on the cpu"]
    assert report["targets"] == {"eval reproduces the record on both devices": True, "GPU run within 0.2 points of the CPU run": True,
                                 "the CUDA graph's run gives the metrics of the run without one, bit for bit": True}
    assert set(report["figures"]["bench"]) == {"b128", "b1024"} and report["figures"]["eval"]["the cpu"]["matches_record"]
    assert (tmp_path / "report.md").read_text().startswith("# gpu-check (dry run, CPU): PASS")
    executed = next(s for s in report["steps"] if s["step"] == "executed kernels")
    assert executed["rc"] == 0 and " passed" in executed["tail"] and "skipped" not in executed["tail"]  # the kernels ran
