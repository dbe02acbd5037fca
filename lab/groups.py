"""
Groups of runs (seeds), for probe.py --group and the studies (lab/study.py): per group the mean
and sample std of each headline metric, and for each pair of groups the interval, tests and effect
size below. Plain numpy/scipy over numbers already measured: no model is run here.

--group NAME=CKPT,CKPT,... (repeatable, in place of the INPUTs; a quoted glob such as
'out/vanilla_s*/ckpt.pt' is expanded): every checkpoint is probed as usual (its report is printed;
its own PNGs are skipped), then per group the mean and sample std over runs of the headline numbers
(group_metrics: max top1/median, bos_concentration, start_mass, start_mass_dominant, persistence per
stream; Sink_1 at T=64; val loss). For each pair of groups A, B (A listed first) and each metric,
with d = mean(B) - mean(A) (compare(); scipy.stats, imported on first use):
- Welch's t interval of d at 95% and Welch's two-sided p (welch: unequal variances, df by
  Welch-Satterthwaite; scipy.stats.ttest_ind(b, a, equal_var=False)) -- the headline interval. At 3
  runs per group it covers the true difference about 95% of the time for normal data; a percentile
  bootstrap covers it only about 80% of the time (tests/test_runs.py simulates both).
- the two-sided permutation p of |d| (permutation_p, scipy.stats.permutation_test): exact over all
  C(n_A + n_B, n_A) splits of the runs when there are at most 10,000, else 10,000 random
  permutations with seed 0; the output says which. Its smallest possible value is 2/20 = 0.1 at
  3 vs 3 and 2/252 at 5 vs 5: with few runs it cannot be small, whatever the data.
- Holm-Bonferroni (holm) over the metrics of one pair of groups that have a p: p_holm adjusts Welch's
  p, p_perm_holm the permutation p. Sorted ascending, p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j)).
- Hedges' g (hedges_g): d / s_pooled with the small-sample factor 1 - 3 / (4 (n_A + n_B) - 9).
- a BCa bootstrap interval (bca_ci, scipy.stats.bootstrap, seed 0) as a second column only when each
  group has at least 8 runs; None below that.
A group of one run gets its value, no std, no interval and no test; with fewer than 3 runs in a group
the output says that its intervals and tests are weak; when neither group has any spread, Welch's
interval and p are undefined (None, with a note).
"""
import math

import numpy as np

LEVEL = 0.95               # of every interval
STATS_SEED = 0             # fixed seed of all resampling, so a report can be reproduced exactly
MAX_EXACT = 10_000         # enumerate every split of the runs when there are at most this many ...
PERMUTATIONS = 10_000      # ... else this many random permutations
MIN_RUNS = 3               # fewer runs in a group: the output says that its intervals and tests are weak
BCA_MIN_RUNS = 8           # the BCa bootstrap column needs this many runs in each group
BCA_RESAMPLES = 9_999      # bootstrap resamples of the BCa interval
ALPHA = 0.05               # the text and groups.png mark Holm-adjusted p below this


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


def _diff(x, y, axis=-1):
    return np.mean(y, axis=axis) - np.mean(x, axis=axis)


def bca_ci(a, b, level=LEVEL, resamples=BCA_RESAMPLES, seed=STATS_SEED, min_runs=BCA_MIN_RUNS):
    """BCa bootstrap interval of mean(b) - mean(a), runs resampled within each group
    (scipy.stats.bootstrap, method 'BCa', fixed seed). None unless each group has at least min_runs
    runs (below that, bootstrap intervals of a mean are too narrow), or when the interval is
    undefined (no spread)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < min_runs or len(b) < min_runs or (_no_spread(a) and _no_spread(b)):
        return None
    import warnings
    from scipy import stats
    with warnings.catch_warnings():        # a degenerate bootstrap distribution warns and gives nan
        warnings.simplefilter('ignore', RuntimeWarning)
        warnings.simplefilter('ignore', getattr(stats, 'DegenerateDataWarning', RuntimeWarning))
        ci = stats.bootstrap((a, b), _diff, vectorized=True, method='BCa', confidence_level=level,
                             n_resamples=resamples, **_seeded(stats.bootstrap, seed)).confidence_interval
    if not (math.isfinite(ci.low) and math.isfinite(ci.high)):
        return None
    return [float(ci.low), float(ci.high)]


def compare(a, b, ga='A', gb='B'):
    """One metric, groups ga (values a) and gb (values b; None and non-finite values dropped): the
    pair entry of probe.json's groups (without the Holm-adjusted p-values, which need every metric
    of the pair: group_statistics adds them)."""
    a = [float(v) for v in a if v is not None and math.isfinite(v)]
    b = [float(v) for v in b if v is not None and math.isfinite(v)]
    pair = dict(a=ga, b=gb, n_a=len(a), n_b=len(b), diff=None, ci=None, p=None, df=None, p_perm=None,
                test=None, p_perm_min=None, hedges_g=None, ci_bca=None, note=None)
    if not a or not b:
        pair['note'] = f"not measured in {' and '.join(g for g, v in ((ga, a), (gb, b)) if not v)}"
        return pair
    notes = []
    one = [g for g, v in ((ga, a), (gb, b)) if len(v) == 1]
    if one:
        notes.append(f"one run in {' and '.join(one)}: no interval exists, no test")
    few = [f"{len(v)} runs in {g}" for g, v in ((ga, a), (gb, b)) if 1 < len(v) < MIN_RUNS]
    if few:
        notes.append(f"{' and '.join(few)}: intervals and tests with fewer than {MIN_RUNS} runs a group are weak")
    ci, p, df = welch(a, b)
    if len(a) > 1 and len(b) > 1 and ci is None:
        notes.append("no spread within either group: Welch's interval and p are undefined")
    p_perm, test, p_min = permutation_p(a, b) if len(a) > 1 and len(b) > 1 else (None, None, None)
    pair.update(diff=float(np.mean(b) - np.mean(a)), ci=ci, p=p, df=df, p_perm=p_perm, test=test,
                p_perm_min=p_min, hedges_g=hedges_g(a, b), ci_bca=bca_ci(a, b), note='; '.join(notes) or None)
    return pair


HEADLINE = ('max_top1_median', 'bos_concentration', 'start_mass', 'start_mass_dominant', 'persistence')


def group_metrics(r):
    """The headline numbers of one probed checkpoint that groups compare: {metric: value}. Streams as
    in the comparison table: '[decoded]' is the stream the model's head reads (h, C, ...), so that
    models with different operators are compared on what they decode; then every other stream and
    view by its own name (the ledger's D and read)."""
    decoded = r['residual']['decoded']
    out = {}
    for tag in ['decoded'] + [n for n in r['streams'] if n != decoded]:
        sm = r['streams'][decoded if tag == 'decoded' else tag]['summary']
        for key in HEADLINE:
            out[f'[{tag}] {key}'] = sm.get(key)
    out['sink1_prefix (Sink_1 %, T=64)'] = r['attention']['sink1_prefix']
    cond = r['attention'].get('conditional')
    if cond:                                       # the trigger testbed: its signature and its task
        out['conditional sink: max other - trigger'] = cond['max_gap']
        out['conditional sink heads'] = len(cond['heads'])
    for name, d in (r['attention'].get('do_nothing') or {}).items():   # the attention variant's own channels
        out[f'do-nothing: {name} (mean over heads)'] = float(np.mean(d['mean']))
    if r.get('task_acc') is not None:
        out['task_acc'] = r['task_acc']
    out['val_loss'] = r['val_loss']
    return out


def group_statistics(results, groups):
    """The `groups` entry of probe.json: per metric, each group's runs, mean and sample std; for each
    pair of groups A, B (A listed first) compare(): d = mean(B) - mean(A), Welch's interval and p,
    the permutation p, Hedges' g, BCa from BCA_MIN_RUNS runs a group; then per pair the Welch and
    the permutation p-values Holm-adjusted over the metrics of that pair that have one."""
    by_name = {r['name']: r for r in results}
    names = list(groups)
    values = {g: [group_metrics(by_name[c]) for c in members] for g, members in groups.items()}
    metrics = {}
    for metric in dict.fromkeys(m for r in results for m in group_metrics(r)):   # every run's, in order
        per = {}
        for g in names:
            vals = [v.get(metric) for v in values[g]]
            got = [v for v in vals if v is not None and math.isfinite(v)]
            per[g] = dict(n=len(got), values=vals,
                          mean=float(np.mean(got)) if got else None,
                          std=float(np.std(got, ddof=1)) if len(got) > 1 else None,
                          note=None if len(got) >= MIN_RUNS else
                          f'{len(got)} runs: std, intervals and tests are weak below {MIN_RUNS}' if len(got) > 1 else
                          'one run: no std, no interval' if got else 'not measured in this group')
        if all(per[g]['n'] == 0 for g in names):
            continue                                  # e.g. [D] when no group holds a ledger
        pairs = [compare(per[ga]['values'], per[gb]['values'], ga, gb)
                 for i, ga in enumerate(names) for gb in names[i + 1:]]
        metrics[metric] = dict(per_group=per, pairs=pairs)
    for k in range(len(names) * (len(names) - 1) // 2):     # Holm within each pair, over its metrics
        prs = [st['pairs'][k] for st in metrics.values()]
        for key in ('p', 'p_perm'):
            for pr, adj in zip(prs, holm([pr[key] for pr in prs])):
                pr[f'{key}_holm'] = adj
    return dict(names=names, members={g: list(m) for g, m in groups.items()},
                methods=dict(
                    level=LEVEL,
                    interval="Welch's t interval of d = mean(B) - mean(A) (unequal variances, "
                             "Welch-Satterthwaite df; scipy.stats.ttest_ind(b, a, equal_var=False))",
                    p="Welch's two-sided p of d",
                    permutation=dict(statistic='|mean(B) - mean(A)|, two-sided', max_exact=MAX_EXACT,
                                     permutations=PERMUTATIONS, seed=STATS_SEED),
                    holm="Holm-Bonferroni over the metrics of one pair of groups that have a p: p_holm adjusts "
                         "Welch's p (the headline test), p_perm_holm the permutation p",
                    hedges_g='d / s_pooled * (1 - 3 / (4 (n_A + n_B) - 9))',
                    bca=dict(min_runs=BCA_MIN_RUNS, resamples=BCA_RESAMPLES, seed=STATS_SEED),
                    min_runs=MIN_RUNS, alpha=ALPHA),
                metrics=metrics)


def _fmt(v, spec='.3g'):
    return '-' if v is None else format(v, spec)


def groups_text(g):
    names, metrics = g['names'], g['metrics']
    lw = max(len(m) for m in metrics) + 2

    def cell(pg):
        if pg['n'] == 0:
            return '-'
        return f"{pg['mean']:.4g} +- {pg['std']:.3g}" if pg['std'] is not None else f"{pg['mean']:.4g} (one run)"

    cells = {m: [cell(st['per_group'][n]) for n in names] for m, st in metrics.items()}
    heads = [f"{n} (n={len(g['members'][n])})" for n in names]
    w = max(len(c) for c in heads + [c for cs in cells.values() for c in cs]) + 3
    lines = ["=== groups: mean +- sample std over runs ===",
             f"{'metric':{lw}s}" + ''.join(f"{h:>{w}s}" for h in heads)]
    for m, cs in cells.items():
        lines.append(f"{m:{lw}s}" + ''.join(f"{c:>{w}s}" for c in cs))
    few = [f"{n} ({len(g['members'][n])} run{'s' if len(g['members'][n]) > 1 else ''})" for n in names
           if len(g['members'][n]) < g['methods']['min_runs']]
    if few:
        lines.append(f"note: fewer than {g['methods']['min_runs']} runs in {', '.join(few)}: std, intervals and "
                     f"tests are weak (one run: no interval exists)")
    level = int(round(100 * g['methods']['level']))
    for k, (ga, gb) in enumerate((ga, gb) for i, ga in enumerate(names) for gb in names[i + 1:]):
        prs = {m: st['pairs'][k] for m, st in metrics.items()}
        m_welch = sum(pr['p'] is not None for pr in prs.values())
        tests = list(dict.fromkeys(f"{pr['test']}, smallest possible p {pr['p_perm_min']:.3g}"
                                   for pr in prs.values() if pr['test']))
        bca = any(pr['ci_bca'] for pr in prs.values())
        notes = {m: (pr['note'] or '').split('; ') if pr['note'] else [] for m, pr in prs.items()}
        common = [n for n in next(iter(notes.values())) if all(n in ns for ns in notes.values())]
        lines += ["", f"=== {gb} - {ga}: d = mean({gb}) - mean({ga}) ===",
                  f"interval, p: Welch's t ({level}% interval of d, two-sided p; unequal variances)",
                  (f"p_holm: Welch's p, Holm-adjusted over the {m_welch} metrics of {gb} - {ga} that have one "
                   f"(* below {g['methods']['alpha']})" if m_welch else "p_holm: no metric has Welch's p"),
                  f"p_perm: two-sided permutation p of |d| ({'; '.join(tests) or 'none'}); "
                  f"g: Hedges' g" + (f"; BCa: {level}% BCa bootstrap interval of d" if bca else '')]
        if common:
            lines.append(f"note: {'; '.join(common)}")
        rows = []
        for m, pr in prs.items():
            ci = f"[{pr['ci'][0]:.4g}, {pr['ci'][1]:.4g}]" if pr['ci'] else 'none'
            ph = _fmt(pr['p_holm']) + ('*' if pr['p_holm'] is not None and pr['p_holm'] < g['methods']['alpha'] else '')
            row = [m, _fmt(pr['diff'], '.4g'), ci, _fmt(pr['p']), ph, _fmt(pr['p_perm']), _fmt(pr['hedges_g'])]
            if bca:
                row.append(f"[{pr['ci_bca'][0]:.4g}, {pr['ci_bca'][1]:.4g}]" if pr['ci_bca'] else 'none')
            rows.append(row + ['; '.join(n for n in notes[m] if n not in common)])
        head = ['metric', 'd', f'Welch {level}% interval', 'p', 'p_holm', 'p_perm', 'g'] + \
               (['BCa interval'] if bca else []) + ['note']
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        for r in [head] + rows:
            lines.append('  '.join(c.ljust(wd) if i in (0, 2, len(head) - 1) or (bca and i == 7) else c.rjust(wd)
                                   for i, (c, wd) in enumerate(zip(r, widths))).rstrip())
    return '\n'.join(lines)
