#!/usr/bin/env bash
# What a ledger training step costs against vanilla's on a CPU, at three shapes: the trigger testbed
# (4 x 128, T = 64, batch 32, one thread: the shape every laptop study here trains at), the same at
# width 256, and the paper's 160m shape (12 x 768, vocabulary 50257) at batch 1 x 256 on two threads.
# bench.py prints each ratio next to the FLOP ratio and the goal (within 10 % of it). Writes
# results/bench/cpu.txt; about 3 minutes on 2 cores, which should be otherwise idle.
#
#   bash results/bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/bench/cpu.txt
TESTBED=(--n_layer=4 --n_head=4 --block_size=64 --batch_size=32 --vocab_size=34 --ledger_rank=16)
COMMON=(--residuals=vanilla,ledger --device=cpu --compile=false)
run() {  # threads args...: one bench.py call, its command and its table (not its JSON line)
    local threads=$1; shift
    echo "\$ OMP_NUM_THREADS=$threads python bench.py $*"
    OMP_NUM_THREADS=$threads python bench.py "$@" | grep -v '^{'
    echo
}
{
    echo "# bash results/bench/run.sh: $(nproc) cores, $(date -u +%F), torch $(python -c 'import torch; print(torch.__version__)')"
    echo
    run 1 "${TESTBED[@]}" --n_embd=128 "${COMMON[@]}" --steps=10 --warmup=2 --rounds=5
    run 1 "${TESTBED[@]}" --n_embd=256 "${COMMON[@]}" --steps=10 --warmup=2 --rounds=3
    run 2 --preset=160m --batch_size=1 --block_size=256 "${COMMON[@]}" --steps=2 --warmup=1 --rounds=3
    echo "# load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT"
