"""
Groups of runs (seeds): the statistics that probe.py --group reports and that a study's analysis
(lab/study.py) is built from (docs/reference.md §5). Plain numpy/scipy over numbers already
measured: no model is run here.

Every metric has a scale (METRICS): positive, heavy-tailed metrics (ratios, shares of mass) are
analysed on the log scale, where runs are closer to normal, and a comparison of groups A and B is
the ratio of geometric means B / A; counts on log(1 + m); bounded metrics (accuracy, loss, a
difference of attention weights) on their own scale, as the difference of means B - A. Per pair
and metric, on its scale:
- Welch's 95 % interval (scipy.stats.ttest_ind, unequal variances), back-transformed: it covers the
  true value >= 93 % of the time at 3-10 runs a group on normal data and on lognormal data with
  unequal spread (tests/test_study.py simulates it), where Welch on the raw values of a lognormal
  metric covers ~70 %;
- the two-sided permutation p of |mean t(B) - mean t(A)|: exact over every split of the runs up to
  MAX_EXACT splits (its floor is 2/20 = 0.1 at 3 vs 3, 2/252 at 5 vs 5, 2/184,756 at 10 vs 10), else
  PERMUTATIONS random relabellings with a fixed seed; the output says which;
- Hedges' g on the scale.
probe.py --group is exploration: its p-values are Holm-adjusted over the metrics of each pair only
(p_perm_holm), and nothing it prints is a finding. A study declares its primary endpoints first and
adjusts over all of them (lab/study.py). A group of one run gets its value and no interval or test;
below 3 runs a group the output says its intervals and tests are weak.
"""
import math

import numpy as np

LEVEL = 0.95               # of every interval
STATS_SEED = 0             # fixed seed of all resampling, so a report can be reproduced exactly
MAX_EXACT = 200_000        # enumerate every split of the runs when there are at most this many (10 vs 10: 184,756) ...
PERMUTATIONS = 10_000      # ... else this many random permutations
MIN_RUNS = 3               # fewer runs in a group: the output says that its intervals and tests are weak
ALPHA = 0.05               # the text and groups.png mark adjusted p below this

# scale -> (transform, back-transform of a mean); estimates: exp of the difference of means for the log scales
SCALES = {'log': (np.log, np.exp), 'log1p': (np.log1p, np.expm1), 'raw': (lambda v: v, lambda v: v)}

# the per-run metrics groups compare (group_metrics), their scale and what they are; '[S] name' is
# stream S's summary value, '[decoded]' the stream the model's head reads (h, C, ...)
STREAM_METRICS = {
    'outlier_ratio': ('log', "top1/median, max over the sublayers whose RMS is >= 0.1 x the last one's (§4.3)"),
    'top1_median_last': ('log', "top1/median at the last sublayer (for the decoded stream: what the head reads)"),
    'start_mass_last': ('log', "share of |x| on position 0 at the last sublayer (1/T when uniform)"),
    'start_mass': ('log', "share of |x| on position 0 at peak_layer"),
    'start_mass_dominant': ('log', "share of the dominant channel's |x| on position 0 at peak_layer"),
    'bos_concentration': ('log', "dominant channel's |x| at position 0 / its mean, at peak_layer"),
    'persistence': ('raw', "share of sublayers whose top channel is the dominant one"),
    'n_massive': ('log1p', "census-massive entries (|x| > 100 and >= 1000 x median), all sublayers"),
}
MODEL_METRICS = {
    'task_acc': ('raw', "argmax accuracy on the answers (trigger testbed)"),
    'val_loss': ('raw', "cross-entropy on the probe windows"),
    'cond_sink_gap': ('raw', "conditional sink: largest (other - trigger) attention on position 0 over heads"),
    'cond_sink_heads': ('log1p', "heads with other >= 0.5 and trigger <= 0.1 (of L x H)"),
    'sink1_prefix': ('raw', "Sink_1 % at T = 64 (Gu et al.)"),
}


def scale_of(metric):
    """The scale a metric is analysed on ('raw' for the do-nothing channels and anything unlisted)."""
    name = metric.split('] ', 1)[-1]
    return (STREAM_METRICS.get(name) or MODEL_METRICS.get(name) or ('raw',))[0]


def clean(values, scale='raw'):
    """The finite values the scale can take (log: > 0; log1p: > -1), as an array."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return v[v > 0] if scale == 'log' else v[v > -1] if scale == 'log1p' else v


def _seeded(fn, seed):
    """The keyword that seeds scipy's resampling: `rng` since scipy 1.15, `random_state` before."""
    import inspect
    key = 'rng' if 'rng' in inspect.signature(fn).parameters else 'random_state'
    return {key: np.random.default_rng(seed)}


def _no_spread(x):
    """All values equal, up to rounding (a relative 1e-12)."""
    x = np.asarray(x, dtype=float)
    return float(np.ptp(x)) <= 1e-12 * float(np.abs(x).max())


def welch(a, b, level=LEVEL):
    """Welch's t test of d = mean(b) - mean(a) (unequal variances): (ci, p, df). ci = d +- t_{df,
    (1 + level) / 2} * sqrt(s_a^2 / n_a + s_b^2 / n_b), df by Welch-Satterthwaite; p two-sided. This
    is scipy.stats.ttest_ind(b, a, equal_var=False) and its confidence_interval(level). All three
    are None when a group has fewer than 2 runs or neither group has any spread (the standard error
    is 0: the test is undefined)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2 or (_no_spread(a) and _no_spread(b)):
        return None, None, None
    import warnings
    from scipy import stats
    with warnings.catch_warnings():     # scipy warns about a group whose values are all equal: its variance is 0
        warnings.filterwarnings('ignore', 'Precision loss', RuntimeWarning)
        res = stats.ttest_ind(b, a, equal_var=False)
    ci = res.confidence_interval(level)
    return [float(ci.low), float(ci.high)], float(res.pvalue), float(res.df)


def _abs_diff(x, y, axis=-1):
    return np.abs(np.mean(y, axis=axis) - np.mean(x, axis=axis))


def permutation_p(a, b, max_exact=MAX_EXACT, permutations=PERMUTATIONS, seed=STATS_SEED):
    """Two-sided permutation p of |mean(b) - mean(a)| with exchangeable group labels:
    scipy.stats.permutation_test with statistic |d| and alternative 'greater' (its 'two-sided' would
    double the smaller one-sided p, which is not the share of splits with |d| at least the observed).
    Returns (p, test, p_min). Every split of the pooled runs into groups of the same sizes when there
    are at most max_exact of them: p = share of splits at least as extreme, the observed one
    included; test 'exact: N splits (all)'; the smallest p possible, p_min, is 2/N for equal group
    sizes (the observed split and its mirror), else 1/N (at 3 vs 3, 2/20 = 0.1). Else `permutations`
    random relabellings (fixed seed): p = (1 + hits) / (1 + permutations); test 'random: N random
    permutations'."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n_splits = math.comb(len(a) + len(b), len(a))
    exact = n_splits <= max_exact
    res = stats.permutation_test((a, b), _abs_diff, permutation_type='independent', vectorized=True,
                                 n_resamples=np.inf if exact else permutations, alternative='greater',
                                 **({} if exact else _seeded(stats.permutation_test, seed)))
    if exact:
        return float(res.pvalue), f"exact: {n_splits:,} splits (all)", (2 if len(a) == len(b) else 1) / n_splits
    return float(res.pvalue), f"random: {permutations:,} random permutations", 1 / (1 + permutations)


def holm(ps):
    """Holm-Bonferroni adjusted p-values, in the order given; None stays None and is not counted in
    m. With the m p-values sorted ascending, p(1) <= ... <= p(m): p_adj(i) = max over j <= i of
    min(1, (m - j + 1) p(j))."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out, m, running = [None] * len(ps), len(idx), 0.0
    for j, i in enumerate(idx):                    # j = 0 is the smallest p: factor m
        running = max(running, min(1.0, (m - j) * ps[i]))
        out[i] = running
    return out


def hedges_g(a, b):
    """Hedges' g of mean(b) - mean(a): d / s_pooled * (1 - 3 / (4 (n_a + n_b) - 9)), s_pooled^2 =
    ((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2) (sample variances, ddof 1). None when a
    group has fewer than 2 runs or s_pooled is 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2 or (_no_spread(a) and _no_spread(b)):
        return None
    s2 = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
    if not s2 > 0:
        return None
    return float((b.mean() - a.mean()) / math.sqrt(s2) * (1 - 3 / (4 * (na + nb) - 9)))


def interval(a, b, scale='raw', level=LEVEL):
    """Welch's interval of B against A on a scale, vectorised: the runs on the last axis of a and b.
    (low, high), back-transformed: for the log scales the interval of the ratio of geometric means
    (of 1 + m for log1p), for 'raw' that of the difference of means (scipy's ttest_ind)."""
    import warnings
    from scipy import stats
    f, inv = SCALES[scale][0], (np.exp if scale != 'raw' else SCALES[scale][1])
    with warnings.catch_warnings():     # a group whose values are all equal has variance 0
        warnings.filterwarnings('ignore', 'Precision loss', RuntimeWarning)
        ci = stats.ttest_ind(f(np.asarray(b, float)), f(np.asarray(a, float)), equal_var=False,
                             axis=-1).confidence_interval(level)
    return inv(ci.low), inv(ci.high)


def estimate(a, b, scale='raw', level=LEVEL):
    """B against A on a scale: dict(n_a, n_b, estimate, ci, centre_a, centre_b). 'log': estimate =
    exp(mean log b - mean log a), the ratio of geometric means, ci its Welch interval; 'log1p' the
    same on 1 + m; 'raw': the difference of means and Welch's interval. ci is None below 2 runs in a
    group or without spread in either; centre: each group's mean on the scale, back-transformed (the
    geometric mean for 'log')."""
    f, inv = SCALES[scale]
    a, b = clean(a, scale), clean(b, scale)
    out = dict(n_a=len(a), n_b=len(b), estimate=None, ci=None, centre_a=None, centre_b=None)
    if not len(a) or not len(b):
        return out
    ta, tb = f(a), f(b)
    d = float(tb.mean() - ta.mean())
    out.update(estimate=d if scale == 'raw' else math.exp(d), centre_a=float(inv(ta.mean())),
               centre_b=float(inv(tb.mean())))
    if len(a) > 1 and len(b) > 1 and not (_no_spread(ta) and _no_spread(tb)):
        lo, hi = interval(a, b, scale, level)
        out['ci'] = [float(lo), float(hi)]
    return out


def compare(a, b, ga='A', gb='B', scale='raw', max_exact=MAX_EXACT):
    """One metric, groups ga (values a) and gb (values b): the pair entry of probe.json's groups on
    the metric's scale: estimate and Welch interval (estimate()), the permutation p of the
    transformed values, Hedges' g on them (without the Holm-adjusted p, which needs every metric of
    the pair: group_statistics adds it)."""
    f = SCALES[scale][0]
    pair = dict(a=ga, b=gb, scale=scale, **estimate(a, b, scale), p_perm=None, test=None, p_perm_min=None,
                hedges_g=None, note=None)
    ta, tb = f(clean(a, scale)), f(clean(b, scale))
    if not len(ta) or not len(tb):
        pair['note'] = f"not measured in {' and '.join(g for g, v in ((ga, ta), (gb, tb)) if not len(v))}"
        return pair
    notes = [f"one run in {g}: no interval exists, no test" for g, v in ((ga, ta), (gb, tb)) if len(v) == 1]
    notes += [f"{len(v)} runs in {g}: intervals and tests with fewer than {MIN_RUNS} runs a group are weak"
              for g, v in ((ga, ta), (gb, tb)) if 1 < len(v) < MIN_RUNS]
    if len(ta) > 1 and len(tb) > 1:
        if pair['ci'] is None:
            notes.append("no spread within either group: the interval is undefined")
        pair['p_perm'], pair['test'], pair['p_perm_min'] = permutation_p(ta, tb, max_exact=max_exact)
        pair['hedges_g'] = hedges_g(ta, tb)
    pair['note'] = '; '.join(notes) or None
    return pair


def group_metrics(r):
    """The numbers of one probed checkpoint that groups compare: {metric: value} (STREAM_METRICS per
    stream, then MODEL_METRICS and the attention variant's do-nothing channels). Streams: '[decoded]'
    is the stream the model's head reads, so that models with different operators are compared on
    what they decode; then every stream and view by its own name ([h], [C], [D], [read])."""
    decoded = r['residual']['decoded']
    out = {}
    for tag in ['decoded'] + list(r['streams']):
        st = r['streams'][decoded if tag == 'decoded' else tag]
        for key in STREAM_METRICS:
            out[f'[{tag}] {key}'] = sum(st['per_sublayer']['n_massive']) if key == 'n_massive' else \
                st['summary'].get(key)
    cond = r['attention'].get('conditional')
    out.update(task_acc=r.get('task_acc'), val_loss=r['val_loss'], sink1_prefix=r['attention']['sink1_prefix'],
               cond_sink_gap=cond['max_gap'] if cond else None, cond_sink_heads=len(cond['heads']) if cond else None)
    for name, d in (r['attention'].get('do_nothing') or {}).items():   # the attention variant's own channels
        out[f'do-nothing: {name}'] = float(np.mean(d['mean']))
    return {k: v for k, v in out.items() if v is not None}


def per_group(values, scale='raw'):
    """One group's entry for one metric: its runs' values, their mean and sample std, on the log
    scales the geometric mean and geometric std (of 1 + m for log1p; None on the raw scale), and a
    note below MIN_RUNS."""
    got = [v for v in values if v is not None and math.isfinite(v)]
    t = SCALES[scale][0](clean(got, scale)) if scale != 'raw' else np.zeros(0)
    geo = dict(geomean=float(SCALES[scale][1](t.mean())) if len(t) else None,
               geostd=float(np.exp(t.std(ddof=1))) if len(t) > 1 else None)
    return dict(n=len(got), values=values, mean=float(np.mean(got)) if got else None,
                std=float(np.std(got, ddof=1)) if len(got) > 1 else None, **geo,
                note=None if len(got) >= MIN_RUNS else
                f'{len(got)} runs: std, intervals and tests are weak below {MIN_RUNS}' if len(got) > 1 else
                'one run: no std, no interval' if got else 'not measured in this group')


def group_statistics(results, groups):
    """The `groups` entry of probe.json: per metric (group_metrics of every run), each group's runs,
    mean and sample std, and for each pair of groups A, B (A listed first) compare() on the metric's
    scale; per pair, the permutation p Holm-adjusted over the metrics of that pair (exploration)."""
    by_name = {r['name']: r for r in results}
    names = list(groups)
    values = {g: [group_metrics(by_name[c]) for c in members] for g, members in groups.items()}
    metrics = {}
    for metric in dict.fromkeys(m for r in results for m in group_metrics(r)):   # every run's, in order
        per = {g: per_group([v.get(metric) for v in values[g]], scale_of(metric)) for g in names}
        pairs = [compare(per[ga]['values'], per[gb]['values'], ga, gb, scale_of(metric))
                 for i, ga in enumerate(names) for gb in names[i + 1:]]
        metrics[metric] = dict(scale=scale_of(metric), per_group=per, pairs=pairs)
    for k in range(len(names) * (len(names) - 1) // 2):     # Holm within each pair, over its metrics
        prs = [st['pairs'][k] for st in metrics.values()]
        for pr, adj in zip(prs, holm([pr['p_perm'] for pr in prs])):
            pr['p_perm_holm'] = adj
    return dict(names=names, members={g: list(m) for g, m in groups.items()},
                methods=dict(level=LEVEL, scales={m: st['scale'] for m, st in metrics.items()},
                             interval="Welch's interval on the metric's scale, back-transformed (log: ratio of "
                                      "geometric means B / A; raw: difference of means B - A)",
                             permutation=dict(statistic='|mean t(B) - mean t(A)| on the scale t, two-sided',
                                              max_exact=MAX_EXACT, permutations=PERMUTATIONS, seed=STATS_SEED),
                             holm="Holm-Bonferroni over the metrics of one pair (exploration, not a study's family)",
                             hedges_g='on the scale: d / s_pooled * (1 - 3 / (4 (n_A + n_B) - 9))',
                             min_runs=MIN_RUNS, alpha=ALPHA),
                metrics=metrics)


def fmt(v, digits=3):
    """A number for tables: 3 significant digits, thousands separated, '-' for None."""
    if v is None:
        return '-'
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    s = f"{v:.{digits}g}"
    return f"{float(s):,.0f}" if 'e' in s or abs(float(s)) >= 1000 else s


def say(pair):
    """'2.1x [1.3, 3.4]' or '+0.12 [0.05, 0.19]': the estimate of a pair and its interval."""
    if pair['estimate'] is None:
        return '-'
    ci = '' if pair['ci'] is None else f" [{fmt(pair['ci'][0])}, {fmt(pair['ci'][1])}]"
    if pair['scale'] == 'raw':
        return f"{'+' if pair['estimate'] >= 0 else '-'}{fmt(abs(pair['estimate']))}{ci}"
    return f"{fmt(pair['estimate'])}x{ci}"


def groups_text(g):
    """The text report of group_statistics: per group the mean +- sample std of each metric, then per
    pair of groups each metric's estimate on its scale with its interval, p and Holm-adjusted p."""
    names, metrics = g['names'], g['metrics']
    lw = max(len(m) for m in metrics) + 2

    def cell(pg):
        if pg['n'] == 0:
            return '-'
        if pg.get('geomean') is not None:
            return f"{pg['geomean']:.4g} x/ {pg['geostd']:.3g}" if pg['geostd'] is not None else f"{pg['geomean']:.4g} (one run)"
        return f"{pg['mean']:.4g} +- {pg['std']:.3g}" if pg['std'] is not None else f"{pg['mean']:.4g} (one run)"

    cells = {m: [cell(st['per_group'][n]) for n in names] for m, st in metrics.items()}
    heads = [f"{n} (n={len(g['members'][n])})" for n in names]
    w = max(len(c) for c in heads + [c for cs in cells.values() for c in cs]) + 3
    lines = ["=== groups: mean +- sample std over runs; on the log scales geometric mean x/ geometric std ===",
             f"{'metric':{lw}s}" + ''.join(f"{h:>{w}s}" for h in heads)]
    lines += [f"{m:{lw}s}" + ''.join(f"{c:>{w}s}" for c in cs) for m, cs in cells.items()]
    few = [f"{n} ({len(g['members'][n])} run{'s' if len(g['members'][n]) > 1 else ''})" for n in names
           if len(g['members'][n]) < g['methods']['min_runs']]
    if few:
        lines.append(f"note: fewer than {g['methods']['min_runs']} runs in {', '.join(few)}: std, intervals and "
                     f"tests are weak (one run: no interval exists)")
    for k, (ga, gb) in enumerate((ga, gb) for i, ga in enumerate(names) for gb in names[i + 1:]):
        prs = {m: st['pairs'][k] for m, st in metrics.items()}
        tests = list(dict.fromkeys(f"{pr['test']}, smallest possible p {pr['p_perm_min']:.3g}"
                                   for pr in prs.values() if pr['test']))
        m_tests = sum(pr['p_perm'] is not None for pr in prs.values())
        lines += ["", f"=== {gb} against {ga} (exploration) ===",
                  f"estimate: {gb} / {ga} (ratio of geometric means) on the log scales, {gb} - {ga} on raw; "
                  f"{int(100 * g['methods']['level'])} % Welch interval on the scale",
                  f"p: two-sided permutation p ({'; '.join(tests) or 'none'}); p_holm: over the {m_tests} metrics of "
                  f"this pair (* below {g['methods']['alpha']}); g: Hedges' g on the scale"]
        rows = [['metric', 'scale', 'estimate [interval]', 'p', 'p_holm', 'g', 'note']]
        for m, pr in prs.items():
            star = '*' if pr.get('p_perm_holm') is not None and pr['p_perm_holm'] < g['methods']['alpha'] else ''
            rows.append([m, pr['scale'], say(pr), fmt(pr['p_perm']), fmt(pr.get('p_perm_holm')) + star,
                         fmt(pr['hedges_g']), pr['note'] or ''])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ['  '.join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    return '\n'.join(lines)
