# ledger_hs_160m: Ledger residual with heavy sparsity, alpha = 0.3; 12 x 768 x 12 (docs/reference.md §2).
# 24 sequences x 1024 tokens per step, 14000 steps = 344M tokens of FineWeb-Edu (python prepare.py).
# total_batch_size fixes the step whatever the number of GPUs; batch_size is per GPU:
#   3 fits 1, 2, 4 or 8 GPUs (8, 4, 2 or 1 micro-steps); with fewer GPUs a larger one is faster
#   if it fits in memory: 1 GPU --batch_size=12 (or 6, 8, 24), 2 GPUs --batch_size=6 (or 12).

out_dir = 'out/ledger_hs_160m'
dataset = 'finewebedu10B'
eval_interval = 500
eval_iters = 20
log_interval = 10

# model
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50257  # 50304 pads it to a multiple of 64 (faster on GPUs; the extra rows are never targets)
residual = 'ledger'
qk_norm = False
norm = 'rmsnorm'
norm_position = 'pre'
tie_embeddings = False
scaled_init = False
dropout = 0.0
ledger_rank = 64
commit_bias_first = -4.0
commit_bias_last = 4.0
commit_read = 'learned'
decode_mix = 0.0
commit_sparsity = 0.3

# optimisation: AdamW, decay on every parameter, 300 warmup steps, cosine to 0.1 x lr at the last step
total_batch_size = 24 * 1024
batch_size = 3
max_iters = 14000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 300
lr_decay_iters = 14000
weight_decay = 0.1
decay_all = True
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
