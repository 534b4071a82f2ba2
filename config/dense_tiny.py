import os

# The dense baseline trained from scratch (the paper's "Dense @ 8" at toy size): a SwiGLU FFN as wide as
# emo_tiny's active experts (top_k 4 of hidden 128 = hidden 512) in every layer, on the same data, tokens and
# schedule. Written as a one-expert MoE: its router has a single choice, weight 1 (softmax over one logit).
# python train.py config/dense_tiny.py
exec(open(os.path.join(os.path.dirname(__file__), "std_tiny.py")).read())
out_dir = "out/dense_tiny"
n_experts = 1
n_shared = 0
top_k = 1
expert_hidden = 512
pool_min = 1
pool_max = 1
