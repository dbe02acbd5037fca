"""A probe.json small enough for the repo: the same report without each stream's per-channel arrays
(channel_mean_abs, pos0_abs), which no table here reads, with floats to 6 significant digits and
no indentation (the tables print 3 digits).

    python results/slim_probe.py out/trigger/groups/probe.json results/trigger/probe.json
"""
import json
import sys


def rounded(v):
    if isinstance(v, float):
        return float(f'{v:.6g}')
    if isinstance(v, list):
        return [rounded(x) for x in v]
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    return v


def main(src, dst):
    with open(src) as f:
        d = json.load(f)
    for c in d['checkpoints']:
        for s in c['streams'].values():
            s.pop('channel_mean_abs', None), s.pop('pos0_abs', None)
    with open(dst, 'w') as f:
        json.dump(rounded(d), f, separators=(',', ':'))


if __name__ == '__main__':
    main(*sys.argv[1:])
