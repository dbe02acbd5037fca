#!/usr/bin/env bash
# The mitigations study (results/mitigations/design.py: its questions, fixes, seeds and primary
# endpoints, declared before the runs): train every run the design declares (the plain vanilla and
# ledger runs are results/trigger's, trained first if missing), then probe and write probe.json,
# table.md and findings.md into results/mitigations/.
#
#   bash results/mitigations/run.sh
#
# Runs go to $OUT (default out/mitigations/<residual>_<fix>_s<seed>); finished runs are not trained
# again and interrupted ones resume, so after a restart the script is simply started again. One
# thread per run, JOBS runs side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-2}
OUT=${OUT:-out/mitigations}
BASE=${BASE:-out/trigger}
RESULTS=results/mitigations
export OMP_NUM_THREADS=1 OUT

start=$(date +%s)
python prepare.py --dataset=trigger                  # offline, under a second; the same bytes every time
source results/train_run.sh
# the baselines are the trigger study's runs: trained only if missing, its results/ left as they are
train_design results/trigger/design.py "$BASE"
train_design "$RESULTS/design.py" "$OUT"
trained=$(date +%s)

# every run probed on the same 256 validation documents, then the study's analysis (results/study.py)
python probe.py $(python "$RESULTS/design.py" --groups "$OUT" "$BASE") --num_seqs 256 --out "$OUT/groups" \
    > "$RESULTS/groups.txt"
python results/slim_probe.py "$OUT/groups/probe.json" "$RESULTS/probe.json"   # without the per-channel arrays
python results/study.py "$RESULTS"                   # table.md, findings.md, study.png
done=$(date +%s)
python results/run_times.py "$JOBS" $(python "$RESULTS/design.py" | awk -v o="$OUT" '{print o "/" $1 "/"}') \
    > "$RESULTS/times.txt"
echo "this run.sh: trained in $(( (trained - start) / 60 )) min with the baselines, probed in" \
     "$(( (done - trained) / 60 )) min" | tee -a "$RESULTS/times.txt"
