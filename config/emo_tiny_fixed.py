import os

# EMO with a fixed pool size (the paper's Appendix A.2/A.3, Table 2: trained with a fixed d = 32 of 128 experts,
# the model is worse with all 128 than with 32; drawn d ~ U(8, 128) is monotone): every document's pool holds 16
# of emo_tiny's 63 routed experts, a quarter as the paper's 32 of 128; all else as emo_tiny.py.
# python train.py config/emo_tiny_fixed.py
exec(open(os.path.join(os.path.dirname(__file__), "emo_tiny.py")).read())
out_dir = "out/emo_tiny_fixed"
pool_min = 16
pool_max = 16
