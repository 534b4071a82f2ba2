# EMO on one GPU in ~10 minutes: the scale of the probe in ../shared/docs/emo.md (d 512, 8 layers,
# 64 experts of 256 with 1 shared, top 8, GPT-2 tokens, 1200 steps of 32 x 1024 tokens = 39M tokens).
# python -m data.prepare --tokenizer gpt2 --out data/multidomain_gpt2
# python train.py config/emo_small.py
out_dir = "out/emo_small"
data_dir = "data/multidomain_gpt2"
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64 for the LM-head GEMM
eos_id = 50256
seq_len = 1024
n_layer = 8
n_head = 8
d_model = 512
n_experts = 64
n_shared = 1
top_k = 8
expert_hidden = 256
rope_theta = 10000.0
router = "emo"
pool_min = 4  # pools of 4..63 of the 63 routed experts (1/16 of the experts up to all, as in the release)
pool_max = 63
doc_attention = False
batch_size = 32
max_steps = 1200
lr = 2e-3
warmup_steps = 100
eval_interval = 200
eval_tokens = 32768
log_interval = 20
checkpoint_interval = 200
