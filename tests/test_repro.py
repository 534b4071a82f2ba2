"""scripts/repro_small.sh end to end at toy size on the CPU (the GPU run is the same script at full size):
both models train, the sweep writes its table with the 6.25% row, and every plot.

    python -m pytest tests/test_repro.py -q
"""

import json
import os
import subprocess
import sys

from tests.conftest import TINY_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repro_script_runs_end_to_end_at_toy_size(tiny_corpus, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DATA": tiny_corpus[0], "RUNS": str(tmp_path / "runs"),
           "RESULTS": str(tmp_path / "results"), "CALIB_DOCS": "2"}
    toy = [*TINY_MODEL, "--n_experts=32", "--max_steps=4", "--batch_size=2", "--eval_interval=4",
           "--eval_tokens=64", "--checkpoint_interval=4", "--warmup_steps=1"]
    done = subprocess.run(["bash", f"{ROOT}/scripts/repro_small.sh", "all", *toy], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = tmp_path / "results"
    rows = json.load(open(results / "results.json"))
    assert {(r["fraction"], r["keep"]) for r in rows} == {(1.0, 32), (0.5, 16), (0.25, 8), (0.125, 4), (0.0625, 2)}
    assert {r["model"] for r in rows} == {"emo_small", "std_small"}
    for name in ("table.md", "retention_loss.png", "retention_accuracy.png", "expert_usage.png",
                 "training_curves.png", "emo_small_log.txt", "std_small_log.txt"):
        assert (results / name).stat().st_size > 0, name
