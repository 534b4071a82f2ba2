import os

# The memory-matched baseline of emo_tiny pruned to 25%: a standard MoE of 16 experts (shared included), top_k
# unchanged, trained from scratch on the same data, tokens and schedule (see std_tiny_e8.py).
# python train.py config/std_tiny_e16.py
exec(open(os.path.join(os.path.dirname(__file__), "std_tiny.py")).read())
out_dir = "out/std_tiny_e16"
n_experts = 16
pool_max = 16
