"""A probe.json for the repo: the same report without each stream's per-channel arrays
(channel_mean_abs, pos0_abs), which are most of its size and which no table here reads.

    python results/slim_probe.py out/trigger/groups/probe.json results/trigger/probe.json
"""
import json
import sys


def main(src, dst):
    with open(src) as f:
        d = json.load(f)
    for c in d['checkpoints']:
        for s in c['streams'].values():
            s.pop('channel_mean_abs', None), s.pop('pos0_abs', None)
    with open(dst, 'w') as f:
        json.dump(d, f, indent=1)


if __name__ == '__main__':
    main(*sys.argv[1:])
