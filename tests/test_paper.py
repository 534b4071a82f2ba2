"""The paper's experiments (experiments/paper.py) end to end on the tiny models: every experiment's rows, the kept-set
overlap, and the report's tables.

    python -m pytest tests/test_paper.py -q
"""

import json

import pytest

from experiments import paper, report


def test_jaccard_overlap_of_kept_sets():
    a = [{"kept": [0, 1, 2]}, {"kept": [3]}]
    b = [{"kept": [1, 2, 4]}, {"kept": [3]}]
    assert paper.jaccard(a, b) == pytest.approx((2 / 4 + 1) / 2)


def test_paper_rows_and_report(tiny_corpus, tiny_checkpoints, tmp_path):
    common = ["--data_dir", tiny_corpus[0], "--keep", "0.5,0.25"]
    paper.main(["run", "--ckpt", tiny_checkpoints["emo"], "--pairs", "code+math:english", *common,
                "--out", str(tmp_path / "emo")])
    paper.main(["baselines", "--ckpt", tiny_checkpoints["std"], *common, "--out", str(tmp_path / "baselines")])
    rows = json.load(open(tmp_path / "emo" / "rows.json"))
    count = {e: sum(r["experiment"] == e for r in rows) for e in ("pruned", "methods", "calibration", "composition",
                                                                   "cross")}
    # 4 domains: full + 2 fractions x (inf, ft); 5 methods x 2 fractions; 3 sizes x 3 seeds + all; 2 rules x 3
    # domains; 4 subsets x 4 domains
    assert count == {"pruned": 4 * 5, "methods": 4 * 10, "calibration": 4 * 10, "composition": 6, "cross": 16}
    assert all(r["overlap_with_all"] == 1.0 for r in rows if r["experiment"] == "calibration" and r["examples"] == 48)
    experts = {r["compose"]: r["experts"] for r in rows if r["experiment"] == "composition"}
    assert experts["mean"] == 2 and 2 <= experts["union"] <= 3  # 25% of 8: 2 per domain; the union up to 3
    report.main(["--paper", f"{tmp_path / 'emo'},{tmp_path / 'baselines'}", "--out", str(tmp_path / "r")])
    tables = open(tmp_path / "r" / "tables.md").read()
    for title in ("## Pruned as is (inf) and fine-tuned (ft)", "## Selection methods", "## Calibration size",
                  "## Composition", "## Each domain's 25.0% subset on every domain"):
        assert title in tables
    assert "| all (48) |" in tables and "| code+math | union |" in tables
