"""scripts/gpu_check.sh's dry run: every step at toy size on the CPU, then the report, as it will run on a GPU.
(Its compiled steps run with TORCHDYNAMO_DISABLE here: compilation itself is tested in tests/test_compile.py.)

    python -m pytest tests/test_gpu_check.py -q
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_every_result_and_the_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable,
           "TORCHDYNAMO_DISABLE": "1"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.json", "summary.md"]  # a lent machine sends back <= 8 files
    report = json.load(open(out / "gpu_check.json"))
    assert [name for name, _, _ in report["steps"]] == ["tests", "kernels", "small", "small_compiled", "full_slice"]
    assert all(rc == 0 for _, rc, _ in report["steps"]), report["steps"]
    assert report["kernels"]["shapes"]["cpu"]["ms"]["grouped_mm"] > 0
    for name in ("small", "small_compiled", "full_slice"):
        routers = report[name]["routers"]
        assert set(routers) == {"emo", "std"} and all(r["tokens_per_s"] > 0 for r in routers.values())
        assert report[name]["emo_over_std_step_time"] > 0
    assert report["small_compiled"]["compile"] is True
    assert "passed" in report["logs"]["tests"]  # each step's log travels in the JSON
    summary = open(out / "summary.md").read()
    assert "## Expert kernels" in summary and "| small (emo, compile False) |" in summary
