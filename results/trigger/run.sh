#!/usr/bin/env bash
# The paper's four models on the trigger testbed (docs/reference.md §3.5), several seeds each, then
# the probe: per-run trajectories and the group statistics. Rebuilds everything in results/trigger/.
#
#   bash results/trigger/run.sh                      # 4 presets x 5 seeds, two runs at a time
#   SEEDS="1 2 3" JOBS=1 bash results/trigger/run.sh # fewer seeds, one run at a time
#
# Runs go to $OUT (default out/trigger/<preset>_s<seed>); a finished run is not trained again and an
# interrupted one resumes (--init_from=resume), so the script can simply be started again.
# Each run uses one thread (tiny matmuls: two single-threaded runs beat one two-threaded run on
# 2 cores); JOBS of them run side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-"1 2 3 4 5"}
JOBS=${JOBS:-2}
OUT=${OUT:-out/trigger}
RESULTS=results/trigger
PRESETS="vanilla suppress ledger ledger_hs"
export OMP_NUM_THREADS=1

start=$(date +%s)
python prepare.py --dataset=trigger                  # offline, under a second; the same bytes every time

source results/train_run.sh
train_one() {  # preset seed
    train_run "$OUT/$1_s$2" "config/trigger_$1.py" --seed="$2"
}
export -f train_one
export OUT
for p in $PRESETS; do for s in $SEEDS; do echo "$p $s"; done; done | xargs -P "$JOBS" -L 1 bash -c 'train_one $0 $1'
trained=$(date +%s)

mkdir -p "$RESULTS"
groups=()
for p in $PRESETS; do
    groups+=(--group "$p=$(ls "$OUT"/${p}_s*/ckpt.pt | paste -sd, -)")
done
# the group statistics: every checkpoint probed on the same 256 validation documents
python probe.py "${groups[@]}" --num_seqs 256 --out "$OUT/groups" > "$RESULTS/groups.txt"
# trajectories: every run in the text summary, the first seed of each preset in the figures
python probe.py "$OUT"/*_s*/ --out "$OUT/trajectory_all" > "$RESULTS/trajectory.txt"
first=$(for p in $PRESETS; do echo "$OUT/${p}_s$(echo $SEEDS | cut -d' ' -f1)/"; done)
python probe.py $first --out "$OUT/trajectory" > /dev/null
python results/slim_probe.py "$OUT/groups/probe.json" "$RESULTS/probe.json"   # without the per-channel arrays
cp "$OUT/groups/groups.png" "$OUT/trajectory_all/trajectory.json" "$RESULTS/"
cp "$OUT/trajectory/trajectory_decoded.png" "$OUT/trajectory/trajectory_loss.png" "$RESULTS/"
python "$RESULTS/table.py" "$RESULTS/probe.json" > "$RESULTS/table.md"
done=$(date +%s)
python results/run_times.py "$JOBS" "$OUT"/*_s*/ > "$RESULTS/times.txt"
echo "this run.sh: trained in $(( (trained - start) / 60 )) min, probed in $(( (done - trained) / 60 )) min" \
    | tee -a "$RESULTS/times.txt"
