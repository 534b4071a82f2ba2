import os

# EMO without a shared expert: 64 routed experts, 4 per token (the same active FFN as emo_tiny's 3 routed and
# 1 shared), pools drawn from [5, 64] (k_routed + 1 up, as emo_tiny's); all else as emo_tiny.py.
# python train.py config/emo_tiny_noshared.py
exec(open(os.path.join(os.path.dirname(__file__), "emo_tiny.py")).read())
out_dir = "out/emo_tiny_noshared"
n_shared = 0
pool_min = 5
