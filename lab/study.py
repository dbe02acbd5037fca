"""
A study's analysis, generated from its declared design (results/<study>/design.py) and the probe's
numbers per run (docs/reference.md §5): the verdicts follow from the tests by rule, so the prose can
say no more than the tests show.

A design declares its groups, its seeds and its PRIMARY endpoints: (question, metric, scale, group A,
group B). Each primary gets the exact two-sided permutation p of its estimate on its scale (every
split of the runs), Holm-adjusted over the whole primary family; the verdict is "shown" at an adjusted
p below the design's ALPHA and "not shown" otherwise, whatever the estimate. Every other metric is
secondary: an estimate with its 95 % interval, never a verdict.

Scales (SCALES): a positive, heavy-tailed metric (a ratio, a share, a count + 1) is analysed on the log
scale, where runs are closer to normal: the estimate is the ratio of geometric means B / A, the
interval Welch's on log(m), exponentiated. A bounded metric (an accuracy, a loss, a difference of
attention weights) stays on its own scale: the difference of means B - A with Welch's interval.
tests/test_study.py simulates the coverage of both at the studies' sizes.
"""
import math

import numpy as np

from lab.groups import holm, permutation_p

LEVEL = 0.95
EXACT_SPLITS = 200_000      # every split of the runs up to this many (10 vs 10: 184,756)

# scale -> (transform, back-transform, what the estimate is, how it reads)
SCALES = {
    'log': (np.log, np.exp, 'ratio of geometric means', 'x'),
    'log1p': (np.log1p, lambda v: np.expm1(v), 'ratio of geometric means of (1 + value), minus 1', 'x'),
    'raw': (lambda v: v, lambda v: v, 'difference of means', '+'),
}


def _clean(values, scale):
    """The finite values that the scale can take (log: > 0; log1p: > -1)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if scale == 'log':
        v = v[v > 0]
    elif scale == 'log1p':
        v = v[v > -1]
    return v


def interval(a, b, scale='raw', level=LEVEL):
    """Welch's interval of B against A on a scale, vectorised: the runs on the last axis of a and b
    (values the scale can take). (low, high) arrays, back-transformed: for 'log' the interval of
    the ratio of geometric means, for 'raw' of the difference of means (scipy's ttest_ind)."""
    import warnings
    from scipy import stats
    f, inv = SCALES[scale][0], (np.exp if scale != 'raw' else SCALES[scale][1])
    with warnings.catch_warnings():     # a group whose values are all equal has variance 0
        warnings.filterwarnings('ignore', 'Precision loss', RuntimeWarning)
        ci = stats.ttest_ind(f(np.asarray(b, float)), f(np.asarray(a, float)), equal_var=False,
                             axis=-1).confidence_interval(level)
    return inv(ci.low), inv(ci.high)


def estimate(a, b, scale='raw', level=LEVEL):
    """B against A on a scale: dict(estimate, ci, n_a, n_b, centre_a, centre_b) where, for 'log',
    estimate is exp(mean log b - mean log a) (a ratio of geometric means) and ci Welch's interval
    on log(m), exponentiated; for 'raw', the difference of means and Welch's interval; 'log1p' is
    'log' on (1 + m), reported as the ratio of (1 + m). ci is None below 2 runs in a group or
    without spread in either; centre: each group's mean on the scale, back-transformed."""
    f, inv = SCALES[scale][:2]
    a, b = _clean(a, scale), _clean(b, scale)
    out = dict(n_a=len(a), n_b=len(b), estimate=None, ci=None, centre_a=None, centre_b=None)
    if not len(a) or not len(b):
        return out
    ta, tb = f(a), f(b)
    d = float(tb.mean() - ta.mean())
    out.update(estimate=d if scale == 'raw' else math.exp(d), centre_a=float(inv(ta.mean())),
               centre_b=float(inv(tb.mean())))
    if len(a) > 1 and len(b) > 1 and (np.ptp(ta) > 0 or np.ptp(tb) > 0):
        lo, hi = interval(a, b, scale, level)
        out['ci'] = [float(lo), float(hi)]
    return out


def primary_test(a, b, scale):
    """The exact two-sided permutation p of |mean t(B) - mean t(A)| on the scale's transform t."""
    f = SCALES[scale][0]
    a, b = f(_clean(a, scale)), f(_clean(b, scale))
    if len(a) < 2 or len(b) < 2:
        return None, None
    p, test, p_min = permutation_p(a, b, max_exact=EXACT_SPLITS)
    return p, p_min


def analyse(design, values, metric_scales):
    """The analysis of a study: design is the module results/<study>/design.py (PRIMARY, ALPHA, and
    SECONDARY_PAIRS or the primaries' pairs), values {group: {metric: [value per run]}}, metric_scales
    {metric: scale} for the secondaries. Returns a dict that findings_text renders."""
    primary = []
    for question, metric, scale, ga, gb in design.PRIMARY:
        a, b = values[ga].get(metric, []), values[gb].get(metric, [])
        p, p_min = primary_test(a, b, scale)
        primary.append(dict(question=question, metric=metric, scale=scale, a=ga, b=gb,
                            **estimate(a, b, scale), p=p, p_min=p_min))
    for row, adj in zip(primary, holm([r['p'] for r in primary])):
        row['p_holm'] = adj
        row['verdict'] = 'shown' if adj is not None and adj < design.ALPHA else 'not shown'
    pairs = getattr(design, 'SECONDARY_PAIRS', None) or list(dict.fromkeys((r['a'], r['b']) for r in primary))
    taken = {(r['metric'], r['a'], r['b']) for r in primary}
    secondary = []
    for ga, gb in pairs:
        for metric, scale in metric_scales.items():
            if (metric, ga, gb) in taken or not (values[ga].get(metric) and values[gb].get(metric)):
                continue
            a, b = values[ga][metric], values[gb][metric]
            if not len(_clean(a, scale)) or not len(_clean(b, scale)):
                continue
            secondary.append(dict(metric=metric, scale=scale, a=ga, b=gb, **estimate(a, b, scale)))
    n = [min(r['n_a'], r['n_b']) for r in primary]
    return dict(alpha=design.ALPHA, family=len(primary), level=LEVEL, primary=primary, secondary=secondary,
                power=power(min(n) if n else 0, len(primary), design.ALPHA))


def power(n, m, alpha, shifts=(1.0, 1.5, 2.0)):
    """{shift: probability}: that a primary with n runs a group reaches Holm's first step (p < alpha/m)
    when the groups differ by `shift` within-group standard deviations on its scale (normal runs; the
    noncentral t approximation of the permutation test)."""
    if n < 2 or m < 1:
        return {}
    from scipy import stats
    df, crit = 2 * n - 2, stats.t.ppf(1 - alpha / m / 2, 2 * n - 2)
    return {s: float(stats.nct.sf(crit, df, s * math.sqrt(n / 2)) + stats.nct.cdf(-crit, df, s * math.sqrt(n / 2)))
            for s in shifts}


def fmt(v, digits=3):
    """A number for the text: 3 significant digits, thousands separated, '-' for None."""
    if v is None:
        return '-'
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    s = f"{v:.{digits}g}"
    if 'e' in s:
        s = f"{float(s):.0f}"
    return f"{float(s):,}" if abs(float(s)) >= 1000 and '.' not in s else s


def say(row):
    """'B/A 2.1x [1.3, 3.4]' or 'B - A +0.12 [0.05, 0.19]' for an estimate row."""
    ci = '' if row['ci'] is None else f" [{fmt(row['ci'][0])}, {fmt(row['ci'][1])}]"
    if row['estimate'] is None:
        return 'not measured'
    if row['scale'] == 'raw':
        return f"{row['b']} − {row['a']} {'+' if row['estimate'] >= 0 else '−'}{fmt(abs(row['estimate']))}{ci}"
    return f"{row['b']} / {row['a']} {fmt(row['estimate'])}x{ci}"


def findings_text(title, design, analysis, metric_labels=None):
    """findings.md: one line per primary endpoint (estimate, 95 % interval, p, Holm-adjusted p and the
    verdict the rule gives), the power, then the secondaries as estimates only."""
    labels = metric_labels or {}
    a = analysis
    lines = [f"# {title}: findings", "",
             f"Generated from probe.json by the study's table.py and its declared design (design.py); do not edit.",
             f"Primary family: {a['family']} endpoints, exact two-sided permutation p (every split of the runs), "
             f"Holm-adjusted across the family; \"shown\" only at an adjusted p below {a['alpha']}. Intervals: "
             f"{int(100 * a['level'])} % Welch intervals on each metric's scale (log: ratio of geometric means).", "",
             "## Primary endpoints", "",
             "| question | metric | runs | estimate [95 % interval] | p | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in a['primary']:
        lines.append(f"| {r['question']} | {labels.get(r['metric'], r['metric'])} ({r['scale']}) | "
                     f"{r['n_a']} + {r['n_b']} | {say(r)} | {fmt(r['p'])} | {fmt(r['p_holm'])} | **{r['verdict']}** |")
    if a['power']:
        lines += ["", "Power of each primary at these sizes (the chance of Holm's first step for a normal shift of "
                      + ", ".join(f"{s:g}" for s in a['power']) + " within-group standard deviations): "
                      + ", ".join(f"{100 * v:.0f} %" for v in a['power'].values()) + "."]
    lines += ["", "## Secondary estimates (no tests, no verdicts)", "",
              "| comparison | metric | runs | estimate [95 % interval] |", "|---|---|---|---|"]
    for r in a['secondary']:
        lines.append(f"| {r['b']} vs {r['a']} | {labels.get(r['metric'], r['metric'])} ({r['scale']}) | "
                     f"{r['n_a']} + {r['n_b']} | {say(r)} |")
    return '\n'.join(lines) + '\n'
