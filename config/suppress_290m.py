# suppress_290m: vanilla + QK-norm, the paper's 'suppress' baseline; 12 x 1024 x 16 (docs/reference.md §2).
# 16 sequences x 1024 tokens per step, 8000 steps = 131M tokens of FineWeb-Edu (python prepare.py).
# total_batch_size fixes the step whatever the number of GPUs; batch_size is per GPU:
#   2 fits 1, 2, 4 or 8 GPUs (8, 4, 2 or 1 micro-steps); with fewer GPUs a larger one is faster
#   if it fits in memory: 1 GPU --batch_size=8 (or 4, 16), 2 GPUs --batch_size=4 (or 8).

out_dir = 'out/suppress_290m'
dataset = 'finewebedu10B'
eval_interval = 250
eval_iters = 20
log_interval = 10

# model
n_layer = 12
n_head = 16
n_embd = 1024
block_size = 1024
vocab_size = 50257  # 50304 pads it to a multiple of 64 (faster on GPUs; the extra rows are never targets)
residual = 'vanilla'
qk_norm = True
norm = 'rmsnorm'
norm_position = 'pre'
tie_embeddings = False
scaled_init = False
dropout = 0.0
commit_sparsity = 0.0

# optimisation: AdamW, decay on every parameter, 300 warmup steps, cosine to 0.1 x lr at the last step
total_batch_size = 16 * 1024
batch_size = 2
max_iters = 8000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 300
lr_decay_iters = 8000
weight_decay = 0.1
decay_all = True
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
