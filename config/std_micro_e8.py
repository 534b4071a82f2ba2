import os

# std_micro.py with 1/8 of its experts (8, the shared one included), top_k unchanged: the standard MoE of the
# size emo_micro keeps at 12.5%, trained from scratch on the same data, tokens and schedule (the paper's "Reg.
# MoE @ 32 (trained)").
# python train.py config/std_micro_e8.py
exec(open(os.path.join(os.path.dirname(__file__), "std_micro.py")).read())
out_dir = "out/std_micro_e8"
n_experts = 8
pool_max = 8
