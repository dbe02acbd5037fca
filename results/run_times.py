"""How long a set of training runs took, from their log.jsonl files: each run's training time (the
last logged elapsed_s of each start, summed over resumes) and the total, and that total over the
number of runs that ran side by side, the wall time it comes to.

    python results/run_times.py 2 out/trigger/*_s*/ > results/trigger/times.txt
"""
import json
import os
import sys


def training_seconds(folder):
    seconds, last = 0.0, 0.0
    with open(os.path.join(folder, 'log.jsonl')) as f:
        for line in f:
            e = json.loads(line)
            if e.get('event') == 'start':
                seconds, last = seconds + last, 0.0
            elif e.get('event') == 'train':
                last = e['elapsed_s']
    return seconds + last


def main(jobs, *folders):
    total = 0.0
    for folder in folders:
        s = training_seconds(folder)
        total += s
        print(f"{os.path.basename(os.path.normpath(folder))}: {s / 60:.1f} min")
    print(f"total: {total / 60:.0f} min of training in {len(folders)} runs; "
          f"{total / 60 / int(jobs):.0f} min of wall time at {jobs} side by side")


if __name__ == '__main__':
    main(*sys.argv[1:])
