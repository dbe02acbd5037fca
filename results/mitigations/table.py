"""The README's mitigations table, from the probe.json of results/mitigations/run.sh's `probe.py --group`:
per group the mean and sample std of the headline metrics, then each fix against its baseline (the
plain model of the same residual): difference of means, Welch's 95 % interval and the Holm-adjusted
Welch p over all metrics of that comparison (docs/reference.md §5). The census columns (runs whose
stream holds any entry with |x| > 100 and > 1000 x median, Sun et al.) are read from each
checkpoint's summary: a count, not tested.

    python results/mitigations/table.py results/mitigations/probe.json > results/mitigations/table.md
"""
import json
import sys

METRICS = [  # (key in probe.json groups.metrics, column)
    ('[decoded] max_top1_median', 'top1/median (h or C)'),
    ('[decoded] start_mass', 'start_mass (h or C)'),
    ('[decoded] bos_concentration', 'bos_conc. (h or C)'),
    ('[D] max_top1_median', 'top1/median D'),
    ('[D] start_mass', 'start_mass D'),
    ('sink1_prefix (Sink_1 %, T=64)', 'Sink_1 %'),
    ('conditional sink heads', 'cond. sink heads'),
    ('task_acc', 'task acc'),
    ('val_loss', 'val loss'),
]
DO_NOTHING = ('slot', 'registers', 'total', 'gate')


def fmt(v, digits=3):
    return '-' if v is None else f"{v:.{digits}g}"


def do_nothing_key(metrics, group):
    """The group's do-nothing channel metric, if its variant has one."""
    for name in DO_NOTHING:
        key = f'do-nothing: {name} (mean over heads)'
        if key in metrics and metrics[key]['per_group'][group]['mean'] is not None:
            return key
    return None


def census(checkpoints, members, stream):
    """'k/n': how many of the group's runs have census-massive entries in `stream` ('decoded': the one
    the head reads); '-' where the runs have no such stream."""
    runs = [c for c in checkpoints if c['name'] in members]
    streams = [c['streams'].get(c['residual']['decoded'] if stream == 'decoded' else stream) for c in runs]
    if None in streams:
        return '-'
    return f"{sum(s['summary']['n_massive_max'] > 0 for s in streams)}/{len(streams)}"


def main(path):
    d = json.load(open(path))
    g = d['groups']
    names, metrics = g['names'], g['metrics']
    cols = [(k, c) for k, c in METRICS if k in metrics]
    out = ['| group (n) | ' + ' | '.join(c for _, c in cols) + ' | census-massive (h or C) | census-massive D | do-nothing channel |',
           '|---|' + '---|' * (len(cols) + 3)]
    for n in names:
        cells = []
        for k, _ in cols:
            pg = metrics[k]['per_group'][n]
            cells.append('-' if pg['mean'] is None else f"{fmt(pg['mean'])} ± {fmt(pg['std'], 2)}")
        cells += [census(d['checkpoints'], g['members'][n], s) for s in ('decoded', 'D')]
        dn = do_nothing_key(metrics, n)
        pg = metrics[dn]['per_group'][n] if dn else None
        cells.append(f"{dn.split(':')[1].split('(')[0].strip()} {fmt(pg['mean'])} ± {fmt(pg['std'], 2)}" if dn else '-')
        out.append(f"| {n} ({len(g['members'][n])}) | " + ' | '.join(cells) + ' |')
    out += ['', "Each fix minus its baseline: difference of means [Welch 95 % interval], Holm-adjusted Welch p over "
                "all metrics of that comparison; * p < 0.05.", '',
            '| fix | ' + ' | '.join(c for _, c in cols) + ' |', '|---|' + '---|' * len(cols)]
    for n in names:
        base = n.split('+')[0]
        if '+' not in n or base not in names:
            continue
        cells = []
        for k, _ in cols:
            pr = next((p for p in metrics[k]['pairs'] if {p['a'], p['b']} == {base, n}), None)
            if pr is None or pr['diff'] is None:
                cells.append('-')
                continue
            sign = 1 if pr['b'] == n else -1               # n minus its baseline, whichever was listed first
            ci = '' if pr['ci'] is None else f" [{fmt(sign * pr['ci'][0 if sign > 0 else 1])}, " \
                                             f"{fmt(sign * pr['ci'][1 if sign > 0 else 0])}]"
            star = '*' if pr['p_holm'] is not None and pr['p_holm'] < 0.05 else ''
            cells.append(f"{fmt(sign * pr['diff'])}{ci} p={fmt(pr['p_holm'], 2)}{star}")
        out.append(f"| {n} | " + ' | '.join(cells) + ' |')
    print('\n'.join(out))


if __name__ == '__main__':
    main(sys.argv[1])
