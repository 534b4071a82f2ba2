"""experiments/regime.py's diagnosis: each family tuned on its own learning rate.

    python -m pytest tests/test_regime.py -q
"""

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
