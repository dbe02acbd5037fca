#!/usr/bin/env bash
# The README's quickstart, timed as a new user meets it: from a fresh clone (no data/, no out/), the
# demo (`python train.py`: builds the offline corpus, trains 60 steps) and the probe of its run and
# of its checkpoint. Writes results/demo/times.txt and the C stream's trajectory figure.
#
#   bash results/demo/run.sh            # in a fresh clone, on otherwise idle cores
set -euo pipefail
cd "$(dirname "$0")/../.."
RESULTS=results/demo
t0=$(date +%s)
python train.py > /tmp/demo_train.log
t1=$(date +%s)
python probe.py out/ckpt.pt > /dev/null
t2=$(date +%s)
python probe.py out/ > /dev/null
t3=$(date +%s)
cp probe_out/out/trajectory_C.png "$RESULTS/"
{
    echo "# bash results/demo/run.sh: $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg) at the end, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}, $(date -u +%F)"
    echo "python train.py: $(( (t1 - t0) / 60 ))m$(printf %02d $(( (t1 - t0) % 60 )))s (with building the builtin corpus)"
    echo "python probe.py out/ckpt.pt: $(( t2 - t1 ))s"
    echo "python probe.py out/: $(( t3 - t2 ))s"
    grep '^done' /tmp/demo_train.log
} | tee "$RESULTS/times.txt"
