# EMO at the scale of one GPU: d 512, 8 layers, GPT-2 tokens, 1200 steps of 32 x 1024 tokens = 39M tokens,
# in the release's regime (docs/method.md): 128 experts of hidden 128 (1 shared), top 8, pools [8, 128],
# attention masked within documents. Its twin std_small.py differs in the router only (as std_tiny.py, which
# says why).
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
n_experts = 128
n_shared = 1
top_k = 8
expert_hidden = 128
rope_theta = 10000.0
router = "emo"
pool_min = 8  # pools of 8..128 experts drawn per document, as the release's (>= 127 routed masks nothing)
pool_max = 128
doc_attention = True  # as the release's EMO (its baseline does not mask; our twin does: std_tiny.py says why)
batch_size = 32
max_steps = 1200
lr = 2e-3
warmup_steps = 100
eval_interval = 200
eval_tokens = 32768
log_interval = 20
checkpoint_interval = 200
