#!/usr/bin/env bash
# The README's quickstart, timed as a new user meets it: from a fresh clone (no data/, no out/), the
# demo (`python train.py`: builds the offline corpus, trains 60 steps), the probe of its run and of
# its checkpoint, then the testbed's quickstart line (trigger_ledger alone, one thread, 1,000 steps)
# and its probe. Writes results/demo/times.txt and the C stream's trajectory figure.
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
OMP_NUM_THREADS=1 python train.py config/trigger_ledger.py > /tmp/demo_trigger.log
t4=$(date +%s)
python probe.py out/trigger_ledger/ckpt.pt > /dev/null
t5=$(date +%s)
minutes() { echo "$(( $1 / 60 ))m$(printf %02d $(( $1 % 60 )))s"; }
cp probe_out/out/trajectory_C.png "$RESULTS/"
{
    echo "# bash results/demo/run.sh: $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg) at the end, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}, $(date -u +%F)"
    echo "python train.py: $(minutes $(( t1 - t0 ))) (with building the builtin corpus)"
    echo "python probe.py out/ckpt.pt: $(( t2 - t1 ))s"
    echo "python probe.py out/: $(( t3 - t2 ))s"
    grep '^done' /tmp/demo_train.log
    echo "OMP_NUM_THREADS=1 python train.py config/trigger_ledger.py: $(minutes $(( t4 - t3 ))) (alone, with building the trigger data)"
    echo "python probe.py out/trigger_ledger/ckpt.pt: $(( t5 - t4 ))s"
    grep '^done' /tmp/demo_trigger.log
} | tee "$RESULTS/times.txt"
