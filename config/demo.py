# The laptop demo: what `python train.py` runs with no config file, i.e. train.py's defaults (a test
# keeps them equal). These are the keys worth changing first; python train.py --help lists the rest.
# A 4 x 128 ledger model on the offline 'builtin' corpus (Python's standard library, built on first
# use), fp32 on CPU: 60 steps of 2048 tokens, evaluated every 10 (the trajectory view has 7 points).
# The GPT-2 vocabulary (50257) dominates the cost at this width. Copy this file to start your own.

out_dir = 'out'
dataset = 'builtin'
eval_interval = 10
total_batch_size = 16 * 128  # one micro-step of 16 x 128
batch_size = 16

# model
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
residual = 'ledger'
ledger_rank = 64
commit_sparsity = None  # 0.02 for models with commit gates (this ledger), 0 for vanilla

# optimisation
learning_rate = 2e-3
max_iters = 60
warmup_iters = 10
