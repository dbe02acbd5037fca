# The laptop demo, i.e. the defaults of `python train.py` spelled out (a test keeps them equal):
# a 4 x 128 ledger model on the offline 'builtin' corpus (Python's standard library, built on first
# use), fp32 on CPU: 60 steps of 2048 tokens, evaluated every 10 (the trajectory view has 7 points);
# 1.5 minutes on 2 idle cores, several on a busy machine; val loss 10.9 -> ~4.2.
# The GPT-2 vocabulary (50257) dominates the cost at this width. Copy this file to start your own.

out_dir = 'out'
eval_interval = 10
log_interval = 10
eval_iters = 4
eval_only = False
always_save_checkpoint = True
snapshot_interval = 0
init_from = 'scratch'
overwrite = False  # True: remove the run already in out_dir first (else: stop and say so)
trust_checkpoint = False
wandb_log = False
wandb_project = 'ledger-residuals'
wandb_run_name = None

# data
dataset = 'builtin'
data_root = None
doc_aligned = None  # as the dataset says (meta.json): False for the builtin corpus
total_batch_size = 16 * 128  # one micro-step of 16 x 128
batch_size = 16
block_size = 128

# model
n_layer = 4
n_head = 4
n_embd = 128
vocab_size = None  # the dataset's vocabulary (meta.json): GPT-2's 50257 for the builtin corpus
dropout = 0.0
residual = 'ledger'
qk_norm = False
norm = 'rmsnorm'
norm_position = 'pre'
ledger_rank = 64
commit_bias_first = -4.0
commit_bias_last = 4.0
commit_read = 'learned'
decode_mix = 0.0
tie_embeddings = False
scaled_init = False
bias = False
gelu = 'exact'
norm_eps = 1e-6
attn_bias = False       # the attention variants that let a head do nothing (docs/reference.md §1.6): all off
attn_softmax = 'softmax'
clip_gamma = -0.025
clip_zeta = 1.0
attn_gate = 'none'
n_registers = 0
commit_sparsity = None  # 0.02 for models with commit gates (this ledger), 0 for vanilla

# optimisation
learning_rate = 2e-3
max_iters = 60
weight_decay = 0.1
decay_all = True
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
decay_lr = True
warmup_iters = 10
lr_decay_iters = None
min_lr = None
target_val_loss = None
stats_seqs = 4

# system
device = 'auto'
dtype = 'auto'
compile = 'auto'
seed = 1337
ddp_timeout = 30.0  # minutes (torchrun only)
