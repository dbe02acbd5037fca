"""The README's laptop-results table, from the probe.json of `probe.py --group ...` (run.sh runs it):
per group the mean and sample std of the headline metrics, then for the paper's comparisons the
difference of means with Welch's 95 % interval, the Holm-adjusted Welch p over all metrics of that
comparison, the exact permutation p and Hedges' g (docs/reference.md §5).

    python results/trigger/table.py results/trigger/probe.json > results/trigger/table.md
"""
import json
import sys

METRICS = [  # (key in probe.json groups.metrics, label)
    ('task_acc', 'task accuracy'),
    ('val_loss', 'val loss'),
    ('conditional sink heads', 'conditional sink heads (of 16)'),
    ('conditional sink: max other - trigger', 'conditional sink: max other - trigger'),
    ('sink1_prefix (Sink_1 %, T=64)', 'Sink_1 % (T = 64)'),
    ('[decoded] max_top1_median', 'decoded stream: max top1/median'),
    ('[decoded] bos_concentration', 'decoded stream: bos_concentration'),
    ('[decoded] start_mass', 'decoded stream: start_mass (1/T = 0.0156)'),
    ('[decoded] start_mass_dominant', 'decoded stream: start_mass_dominant'),
    ('[decoded] persistence', 'decoded stream: persistence'),
    ('[D] max_top1_median', 'D: max top1/median'),
    ('[D] start_mass', 'D: start_mass'),
]
PAIRS = [('vanilla', 'suppress'), ('vanilla', 'ledger'), ('ledger', 'ledger_hs')]


def fmt(v, digits=3):
    return '-' if v is None else f"{v:.{digits}g}"


def main(path):
    g = json.load(open(path))['groups']
    names, metrics = g['names'], g['metrics']
    rows = [(k, label) for k, label in METRICS if k in metrics]
    out = ['| metric | ' + ' | '.join(f"{n} (n={len(g['members'][n])})" for n in names) + ' |',
           '|---|' + '---|' * len(names)]
    for k, label in rows:
        cells = []
        for n in names:
            pg = metrics[k]['per_group'][n]
            cells.append('-' if pg['mean'] is None else
                         f"{fmt(pg['mean'])} ± {fmt(pg['std'], 2)}" if pg['std'] is not None else fmt(pg['mean']))
        out.append(f"| {label} | " + ' | '.join(cells) + ' |')
    for a, b in PAIRS:
        if a not in names or b not in names:
            continue
        out += ['', f"**{b} − {a}** (difference of means; Welch 95 % interval; p: Welch, Holm-adjusted over the "
                    f"{len(metrics)} metrics of this comparison; exact permutation p; Hedges' g)", '',
                '| metric | difference | 95 % interval | p (Holm) | p (perm.) | g |', '|---|---|---|---|---|---|']
        for k, label in rows:
            pr = next(p for p in metrics[k]['pairs'] if p['a'] == a and p['b'] == b)
            ci = '-' if pr['ci'] is None else f"[{fmt(pr['ci'][0])}, {fmt(pr['ci'][1])}]"
            star = ' *' if pr['p_holm'] is not None and pr['p_holm'] < 0.05 else ''
            out.append(f"| {label} | {fmt(pr['diff'])} | {ci} | {fmt(pr['p_holm'], 2)}{star} | "
                       f"{fmt(pr['p_perm'], 2)} | {fmt(pr['hedges_g'], 2)} |")
    out += ['', "\\* Holm-adjusted p < 0.05. '-': not defined (no spread in either group, or not measured)."]
    print('\n'.join(out))


if __name__ == '__main__':
    main(sys.argv[1])
