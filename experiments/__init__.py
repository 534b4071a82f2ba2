"""The experiments on nanoEMO: the retention sweep, the paper's other experiments, specialization, and their
tables and plots. Run as modules from the repository root: python -m experiments.sweep ..."""
