#!/usr/bin/env bash
# The published fixes for massive activations and sinks (docs/reference.md §1.6) on the trigger testbed:
# each fix x {vanilla, ledger} x 3 seeds, against the plain trigger_vanilla and trigger_ledger runs
# of results/trigger/run.sh (5 seeds each; trained first if missing). Rebuilds results/mitigations/.
#
#   bash results/mitigations/run.sh
#   FIXES="attn_bias relu" SEEDS="1 2 3" bash results/mitigations/run.sh
#
# A fix is a key of model.ATTENTION_VARIANTS, so its flags are defined once. Runs go to $OUT
# (default out/mitigations/<residual>_<fix>_s<seed>); finished runs are not trained again and
# interrupted ones resume. One thread per run, JOBS runs side by side. Then bench.py times every
# variant at this shape (results/mitigations/bench.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
FIXES=${FIXES:-"attn_bias plus_one clipped sigmoid relu gate_elementwise registers"}
SEEDS=${SEEDS:-"1 2 3"}
JOBS=${JOBS:-2}
OUT=${OUT:-out/mitigations}
BASE=${BASE:-out/trigger}
RESULTS=results/mitigations
export OMP_NUM_THREADS=1 OUT

start=$(date +%s)
if ! ls "$BASE"/vanilla_s*/ckpt.pt "$BASE"/ledger_s*/ckpt.pt > /dev/null 2>&1; then
    OUT="$BASE" bash results/trigger/run.sh
fi

source results/train_run.sh
train_one() {  # residual fix seed
    local flags
    flags=$(python -c "from model import ATTENTION_VARIANTS as A; print(' '.join(f'--{k}={v}' for k, v in A['$2'].items()))")
    train_run "$OUT/$1_$2_s$3" "config/trigger_$1.py" $flags --seed="$3"
}
export -f train_one
for r in vanilla ledger; do for f in $FIXES; do for s in $SEEDS; do echo "$r $f $s"; done; done; done \
    | xargs -P "$JOBS" -L 1 bash -c 'train_one $0 $1 $2'
trained=$(date +%s)

mkdir -p "$RESULTS"
groups=()
for r in vanilla ledger; do
    groups+=(--group "$r=$(ls "$BASE"/${r}_s*/ckpt.pt | paste -sd, -)")
    for f in $FIXES; do
        groups+=(--group "$r+$f=$(ls "$OUT"/${r}_${f}_s*/ckpt.pt | paste -sd, -)")
    done
done
python probe.py "${groups[@]}" --num_seqs 256 --out "$OUT/groups" > "$RESULTS/groups.txt"
# trajectories of every fix's runs (the baselines' are in results/trigger/trajectory.txt)
python probe.py "$OUT"/*_s*/ --out "$OUT/trajectory_all" > "$RESULTS/trajectory.txt"
python results/slim_probe.py "$OUT/groups/probe.json" "$RESULTS/probe.json"   # without the per-channel arrays
python "$RESULTS/table.py" "$RESULTS/probe.json" > "$RESULTS/table.md"
probed=$(date +%s)

# what each fix costs per step at this shape, every model alone on the machine (the logs' tokens/s
# depend on what else ran beside them)
bench=(python bench.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=32 --vocab_size=34
       --ledger_rank=16 --residuals=vanilla,ledger --attention=all --device=cpu --steps=10 --warmup=2 --rounds=3)
{ echo "# OMP_NUM_THREADS=1 ${bench[*]}"; "${bench[@]}"; } > "$RESULTS/bench.txt"
done=$(date +%s)
python results/run_times.py "$JOBS" "$OUT"/*_s*/ > "$RESULTS/times.txt"
echo "this run.sh: trained in $(( (trained - start) / 60 )) min, probed in $(( (probed - trained) / 60 )) min," \
     "benchmarked in $(( (done - probed) / 60 )) min" | tee -a "$RESULTS/times.txt"
