# trigger_vanilla_wide: the standard residual stream at width 140 instead of 128, on the trigger testbed
# (docs/reference.md §3.5): the parameter-matched control of results/trigger/design.py. At 4 x 140 x 4
# heads it has 963,340 parameters against trigger_ledger's 974,984 (98.8 %) and 1.20x trigger_vanilla's
# FLOPs per token (the ledger: 1.195x), so "the ledger solves the task better" is tested against a
# vanilla model of the ledger's size, not only against one of its shape. Everything else is
# trigger_vanilla.py's.

out_dir = 'out/trigger_vanilla_wide'
dataset = 'trigger'          # vocab_size (34) and doc-aligned windows (BOS at position 0) come from its meta.json
eval_interval = 100          # 11 evaluations: the trajectory of the run
log_interval = 100
eval_iters = 8               # 8 x 32 windows: ~900 answers for the task accuracy
stats_seqs = 8

# model: 4 x 140 x 4 heads (head size 35), T = 64 (one document = BOS + 64 symbols)
n_layer = 4
n_head = 4
n_embd = 140
block_size = 64
residual = 'vanilla'
qk_norm = False
ledger_rank = 16             # the paper's rank/width ratio (64/768) at d = 128 is 10.7; 16, the next power of two
commit_sparsity = 0.0

# optimisation: AdamW, decay on every parameter, 100 warmup steps, cosine to 0.1 x lr at the last step
total_batch_size = 32 * 64
batch_size = 32
max_iters = 1000
learning_rate = 3e-3
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0
device = 'cpu'               # tiny matmuls: the CPU is the right device; see results/trigger/run.sh for threads
compile = False
