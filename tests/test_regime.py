"""experiments/regime.py's diagnosis: each family tuned on its own learning rate.

    python -m pytest tests/test_regime.py -q
"""

from experiments import regime
from experiments.regime import tuned_learning_rates


def test_each_family_takes_its_own_best_learning_rate_by_the_mean_over_seeds():
    seeds = (1337, 7)
    losses = {("emo", "lr_half", 1337): 3.10, ("emo", "lr_half", 7): 3.20,  # mean 3.15
              ("emo", "base", 1337): 3.12, ("emo", "base", 7): 3.16,  # mean 3.14: EMO's best
              ("emo", "lr_double", 1337): 3.05, ("emo", "lr_double", 7): 3.30,  # best seed, worse mean
              ("std", "lr_half", 1337): 3.00, ("std", "lr_half", 7): 3.02,
              ("std", "base", 1337): 3.03, ("std", "base", 7): 3.04,
              ("std", "lr_double", 1337): 2.90}  # not run for every seed: not a candidate
    assert tuned_learning_rates(losses, seeds) == {"emo": ("base", [3.12, 3.16]), "std": ("lr_half", [3.00, 3.02])}
    losses |= {("emo", "lr_quadruple", 1337): 3.00, ("emo", "lr_quadruple", 7): 3.02}  # the largest rate, best
    assert tuned_learning_rates(losses, seeds)["emo"] == ("lr_quadruple", [3.00, 3.02])


def test_the_diagnosis_names_each_familys_best_rate_once_any_other_rate_has_every_seed(monkeypatch, tmp_path):
    seeds = (1337, 7)
    losses = {("emo", "base", 1337): 3.12, ("emo", "base", 7): 3.16, ("std", "base", 1337): 3.02,
              ("std", "base", 7): 3.04}
    monkeypatch.setattr(regime, "diagnosis_runs", lambda folder, name, seeds: losses)
    assert "best of the learning rates" not in regime.write_diagnosis(str(tmp_path), "tiny", str(tmp_path), seeds)
    losses |= {(f, "lr_quadruple", s): loss for (f, s), loss in
               {("emo", 1337): 3.06, ("emo", 7): 3.10, ("std", 1337): 3.00, ("std", 7): 3.10}.items()}
    text = regime.write_diagnosis(str(tmp_path), "tiny", str(tmp_path), seeds)
    assert "| learning rate quadrupled | 3.0800 ± 0.0200 | 3.0500 ± 0.0500 | 0.0300 ± 0.0300 |" in text
    # by the mean over seeds EMO is best quadrupled (3.08 < 3.14), the standard MoE as configured (3.03 < 3.05)
    assert ("EMO with the learning rate quadrupled 3.0800 ± 0.0200, the standard MoE as configured "
            "3.0300 ± 0.0100; gap 0.0500 ± 0.0100 (+1.65%)") in text
