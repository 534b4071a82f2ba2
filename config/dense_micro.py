import os

# The dense model with emo_micro's active FFN (top_k 4 of hidden 20 = hidden 80) in every layer, trained from
# scratch on the same data, tokens and schedule (the paper's "Dense @ 8"). A one-expert MoE: its router has a
# single choice, of weight 1.
# python train.py config/dense_micro.py
exec(open(os.path.join(os.path.dirname(__file__), "std_micro.py")).read())
out_dir = "out/dense_micro"
n_experts = 1
n_shared = 0
top_k = 1
expert_hidden = 80
pool_min = 1
pool_max = 1
