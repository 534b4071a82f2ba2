import os

# A memory-matched baseline trained from scratch (the paper's "Reg. MoE @ 32 (trained)" at toy size): the
# standard MoE with as many experts as emo_tiny pruned to 12.5% keeps (8, the shared one included), top_k
# unchanged; the same data, tokens and schedule as std_tiny.py.
# python train.py config/std_tiny_e8.py
exec(open(os.path.join(os.path.dirname(__file__), "std_tiny.py")).read())
out_dir = "out/std_tiny_e8"
n_experts = 8
pool_max = 8
