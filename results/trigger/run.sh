#!/usr/bin/env bash
# The trigger study (results/trigger/design.py: its questions, groups, seeds and primary endpoints,
# declared before the runs): train every run the design declares, then probe them all and write
# probe.json, table.md and findings.md into results/trigger/.
#
#   bash results/trigger/run.sh                 # 5 groups x 10 seeds, two runs at a time
#   JOBS=1 bash results/trigger/run.sh          # one at a time
#
# Runs go to $OUT (default out/trigger/<group>_s<seed>); a finished run is not trained again and an
# interrupted one resumes (--init_from=resume), so after a restart the script is simply started again.
# Each run uses one thread (tiny matmuls: two single-threaded runs beat one two-threaded run on
# 2 cores); JOBS of them run side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-2}
OUT=${OUT:-out/trigger}
RESULTS=results/trigger
export OMP_NUM_THREADS=1 OUT

start=$(date +%s)
python prepare.py --dataset=trigger                  # offline, under a second; the same bytes every time
source results/train_run.sh
train_design "$RESULTS/design.py" "$OUT"
trained=$(date +%s)

# every run probed on the same 256 validation documents, then the study's analysis (results/study.py)
python probe.py $(python "$RESULTS/design.py" --groups "$OUT") --num_seqs 256 --out "$OUT/groups" > "$RESULTS/groups.txt"
python results/slim_probe.py "$OUT/groups/probe.json" "$RESULTS/probe.json"   # without the per-channel arrays
python results/study.py "$RESULTS"                   # table.md, findings.md, study.png
# trajectories: every run in the text summary, seed 1 of each group in the figures
python probe.py $(python "$RESULTS/design.py" | awk -v o="$OUT" '{print o "/" $1 "/"}') --out "$OUT/trajectory_all" \
    > "$RESULTS/trajectory.txt"
python probe.py $(python "$RESULTS/design.py" | awk -v o="$OUT" '$1 ~ /_s1$/ {print o "/" $1 "/"}') \
    --out "$OUT/trajectory" > /dev/null
# the four models of the paper (seed 1) with the interventions: W8A8, fp16 headroom, super weights, sink kinds
python probe.py $(printf "$OUT/%s_s1/ckpt.pt " vanilla suppress ledger ledger_hs) --interventions --num_seqs 64 \
    --out "$OUT/measures" > "$RESULTS/measures.txt"
cp "$OUT/trajectory_all/trajectory.json" "$OUT/trajectory/trajectory_decoded.png" "$OUT/trajectory/trajectory_loss.png" \
    "$RESULTS/"
done=$(date +%s)
python results/run_times.py "$JOBS" $(python "$RESULTS/design.py" | awk -v o="$OUT" '{print o "/" $1 "/"}') \
    > "$RESULTS/times.txt"
echo "this run.sh: trained in $(( (trained - start) / 60 )) min, probed in $(( (done - trained) / 60 )) min" \
    | tee -a "$RESULTS/times.txt"
