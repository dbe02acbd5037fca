# trigger_ledger: Ledger residual, sparsity alpha = 0.02, on the trigger testbed (docs/reference.md §3.5):
# the synthetic trigger-conditional language of prepare.py --dataset=trigger (built on first use, offline),
# where a head must act only after a TRIGGER and otherwise do nothing. The paper's four models at a
# laptop shape; bash results/trigger/run.sh trains all four with several seeds and compares them.
# Time on 2 cores (measured): 3m19s alone (torch's 2 threads); 4m44s-6m36s as one of two
# single-threaded runs side by side in results/trigger/run.sh.

out_dir = 'out/trigger_ledger'
dataset = 'trigger'          # vocab_size (34) and doc-aligned windows (BOS at position 0) come from its meta.json
eval_interval = 100          # 11 evaluations: the trajectory of the run
log_interval = 100
eval_iters = 8               # 8 x 32 windows: ~900 answers for the task accuracy
stats_seqs = 8

# model: 4 x 128 x 4 heads, T = 64 (one document = BOS + 64 symbols)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
residual = 'ledger'
qk_norm = False
ledger_rank = 16             # the paper's rank/width ratio (64/768) at d = 128 is 10.7; 16, the next power of two
commit_sparsity = 0.02

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
