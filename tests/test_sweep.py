"""experiments/sweep.py and experiments/report.py: the sweep's table, CSV and plots, and sweeps run side by side
combined into the joint sweep.

    python -m pytest tests/test_sweep.py -q
"""

import json

from experiments import report, sweep


def test_sweep_writes_table_and_plots(tiny_corpus, tiny_checkpoints, tmp_path):
    out = tmp_path / "sweep"
    sweep.main(["--ckpt", f"{tiny_checkpoints['emo']},{tiny_checkpoints['std']}",
                "--data_dir", tiny_corpus[0], "--keep", "1.0,0.5,0.25", "--calib_docs", "2",
                "--max_tokens", "64", "--out", str(out), "--method", "global"])
    rows = json.load(open(out / "results.json"))
    assert len(rows) == 2 * 4 * 3  # models x domains x fractions
    for r in rows:
        if r["fraction"] == 1.0:
            assert r["d_loss"] == 0 and r["d_task_accuracy"] == 0 and r["keep"] == 8
        assert r["task_items"] >= 1 and 0 <= r["task_accuracy"] <= 1
    assert {r["keep"] for r in rows} == {8, 4, 2}
    table = open(out / "table.md").read()
    assert "Average over domains" in table and "25.0%" in table and "task acc. (change)" in table
    assert open(out / "results.csv").readline().startswith("model,domain,keep,fraction,loss")
    for png in ("retention_loss.png", "retention_accuracy.png", "retention_task_accuracy.png", "expert_usage.png"):
        assert open(out / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweeps_run_side_by_side_combine_into_the_joint_sweep(tiny_corpus, tiny_checkpoints, tmp_path):
    """make demo sweeps each model in its own process and combines: the same rows as one sweep of both; and
    the spread over repeated sweeps is their half range (zero for a sweep repeated identically)."""
    common = ["--data_dir", tiny_corpus[0], "--keep", "1.0,0.5", "--calib_docs", "2", "--max_tokens", "64"]
    for router in ("emo", "std"):
        sweep.main(["--ckpt", tiny_checkpoints[router], "--out", str(tmp_path / router), *common])
    sweep.main(["--ckpt", f"{tiny_checkpoints['emo']},{tiny_checkpoints['std']}", "--out", str(tmp_path / "joint"),
                *common])
    report.combine([str(tmp_path / "emo"), str(tmp_path / "std")], str(tmp_path / "combined"))
    combined, joint = (json.load(open(tmp_path / name / "results.json")) for name in ("combined", "joint"))
    assert combined == joint
    assert open(tmp_path / "combined" / "table.md").read() == open(tmp_path / "joint" / "table.md").read()
    stats, table = report.spread_table([str(tmp_path / "joint"), str(tmp_path / "combined")])
    assert all(half == 0 for s in stats.values() for _, half in s.values()) and "± 0.000" in table
