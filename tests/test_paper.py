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
    common = ["--data_dir", tiny_corpus[0], "--fractions", "0.5,0.25", "--method_fractions", "0.5,0.25",
              "--smallest", "0.25", "--retention_fractions", "1.0,0.5", "--pool_eval", "4"]
    paper.main(["run", "--ckpt", tiny_checkpoints["emo"], "--pairs", "code+math:english", *common,
                "--out", str(tmp_path / "emo")])
    paper.main(["run", "--ckpt", tiny_checkpoints["std"], "--only", "pruned", *common, "--out", str(tmp_path / "std")])
    paper.main(["baselines", "--ckpt", tiny_checkpoints["std"], *common, "--out", str(tmp_path / "baselines")])
    paper.main(["retention", "--ckpt", tiny_checkpoints["emo"], *common, "--out", str(tmp_path / "retention")])
    rows = json.load(open(tmp_path / "emo" / "rows.json"))
    count = {e: sum(r["experiment"] == e for r in rows) for e in ("pruned", "merge", "methods", "calibration",
                                                                   "composition", "cross")}
    # 4 domains: full + 2 fractions x (inf, ft); at 25% each fine-tuned subset merged back, on the 4 domains;
    # 5 methods x 2 fractions; 3 sizes x 3 seeds + all + 3 seeds zero-shot; 2 rules x 3 domains; 4 x 4 subsets
    assert count == {"pruned": 4 * 5, "merge": 4 * 4, "methods": 4 * 10, "calibration": 4 * 13, "composition": 6,
                     "cross": 16}
    assert all(r["overlap_with_all"] == 1.0 for r in rows if r["experiment"] == "calibration" and r["examples"] == 48)
    experts = {r["compose"]: r["experts"] for r in rows if r["experiment"] == "composition"}
    assert experts["mean"] == 2 and 2 <= experts["union"] <= 3  # 25% of 8: 2 per domain; the union up to 3
    baselines = json.load(open(tmp_path / "baselines" / "rows.json"))
    assert sorted({r["variant"] for r in baselines}) == ["ft", "inf"] and len(baselines) == 8
    retention = json.load(open(tmp_path / "retention" / "rows.json"))
    assert len(retention) == 4 * 2 * 2 and {r["pool_eval"] for r in retention} == {0, 4}
    folders = ",".join(str(tmp_path / f) for f in ("emo", "std", "baselines", "retention"))
    report.main(["--paper", folders, "--out", str(tmp_path / "r")])
    tables = open(tmp_path / "r" / "tables.md").read()
    for title in ("## Pruned as is (inf) and fine-tuned (ft)", "## A fine-tuned 25.0% subset merged back",
                  "## Selection methods", "## Calibration size", "## Composition, this project's extension",
                  "## Each domain's 25.0% subset on every domain", "## The twins' retention"):
        assert title in tables
    assert "| all (48) |" in tables and "| 16, 0-shot |" in tables and "| code+math | union |" in tables


def test_two_seeds_give_a_mean_and_half_the_range_one_seed_none():
    rows = [{"experiment": "pruned", "model": m, "domain": d, "variant": "full", "fraction": 1.0, "loss": loss,
             "task_accuracy": 0.5} for m, d, loss in (("emo", "a", 1.0), ("emo", "b", 3.0), ("emo_seed7", "a", 2.0),
                                                      ("emo_seed7", "b", 2.0))]
    rows = report.with_seeds(rows)
    assert report.number(rows, "loss", experiment="pruned") == "2.000 ± 0.000"  # both seeds average 2.0
    assert report.number(rows, "loss", experiment="pruned", seed="7") == "2.000"  # one seed: no spread
    rows[0]["loss"] = 3.0
    assert report.number(rows, "loss", experiment="pruned") == "2.500 ± 0.500"  # seeds average 3.0 and 2.0


def test_calibration_seeds_draw_different_documents(tiny_corpus):
    """With shuffle_documents, one example of each seed comes from another document (the passages alone varied
    before: every seed took the first document)."""
    from calibration import few_shot_calibration
    from data.corpus import Corpus
    corpus = Corpus(tiny_corpus[0])
    firsts = {seed: few_shot_calibration(corpus, "code", 1, seed, shots=0, shuffle_documents=True)[0][0][0]
              for seed in (1, 2, 3, 4)}
    documents = corpus.documents("calib", "code")

    def source(tokens):
        return next(i for i, doc in enumerate(documents) if any(
            list(doc[j:j + len(tokens)]) == tokens.tolist() for j in range(len(doc) - len(tokens) + 1)))
    assert len({source(t) for t in firsts.values()}) > 1
    fixed = {seed: source(few_shot_calibration(corpus, "code", 1, seed, shots=0)[0][0][0]) for seed in (1, 2, 3)}
    assert set(fixed.values()) == {0}


def test_emo_anneal_switches_the_router_for_the_last_steps_as_paper_sh_does(tiny_corpus, tmp_path):
    """scripts/paper.sh's EMO-anneal: the standard router until stop_after, then, resumed with --router=emo, the
    pool router for the rest, the learning rate linear to 0; the steps before the switch are the standard run's."""
    from checkpoint import load_checkpoint
    from tests.conftest import tiny_run
    from train import train
    schedule = ("--router=std", "--anneal_steps=2", "--eval_interval=0")
    _, standard = train(tiny_run(tiny_corpus[0], tmp_path / "std", *schedule))
    train(tiny_run(tiny_corpus[0], tmp_path / "anneal", *schedule, "--stop_after=4"))
    _, annealed = train(tiny_run(tiny_corpus[0], tmp_path / "anneal", "--anneal_steps=2", "--eval_interval=0",
                                 "--init_from=resume", "--router=emo"))
    history = json.load(open(tmp_path / "anneal" / "history.json"))
    assert [r["loss"] for r in history[:4]] == [r["loss"] for r in standard[:4]]
    assert [r["step"] for r in annealed] == [5, 6] and annealed[-1]["lr"] == 0
    assert load_checkpoint(str(tmp_path / "anneal"))["model_config"]["router"] == "emo"
    assert all(r["pool_size"] < 7 for r in annealed) and all(r["pool_size"] == 7 for r in history[:4])


def test_the_decomposition_adds_up():
    """(EMO subset - baseline) = EMO's full-model gap + its pruning cost - the standard MoE's gain from its extra
    experts (the baseline's loss minus the standard MoE's)."""
    def r(experiment, model, loss, fraction=1.0, variant="full"):
        return {"experiment": experiment, "model": model, "domain": "a", "fraction": fraction, "variant": variant,
                "loss": loss, "task_accuracy": 0.5, "model_experts": 64, "model_top_k": 4}
    rows = report.with_seeds([r("pruned", "emo", 4.6), r("pruned", "std", 4.4), r("pruned", "emo", 4.7, 0.125, "inf"),
                              r("pruned", "std", 5.0, 0.125, "inf"), r("baseline", "std_e8", 4.5, variant="inf"),
                              r("baseline", "std_e8", 4.5, variant="ft")])
    line = report.pruned_table(rows, ["emo", "std"], ["std_e8"])[-1]
    assert line == ("- 12.50%: emo pruned - std_e8 = +0.200 = emo's full-model gap +0.200 + its pruning cost +0.100 - "
                    "the standard MoE's gain from its extra experts +0.100")
