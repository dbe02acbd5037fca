"""
Training runs and groups of runs, for probe.py: trajectories of the statistics train.py logs, and
statistics over seeds. Plain numpy over numbers already measured: no model is run here.

Training runs: from each log.jsonl's eval events (the statistics train.py logs with
activation_stats; the last eval of each step wins when a run was resumed), per stream against
tokens seen (step x total_batch_size): top1/median at the peak sublayer, the census count summed
over sublayers, kurtosis, start_mass and start_mass_dominant at peak_layer, dominant_dim; val loss
and commit rate; a (step x sublayer) heatmap of top1/median. The text summary gives, per run and
stream, the first step (and tokens) at which top1/median (max over sublayers) was >= 10, 100, 1000,
and whether the dominant channel stayed the same. Logs written before a statistic was logged are
plotted with what they have, and the summary names what is missing. A log holds one run: a second
start event that says init_from 'scratch' (another run written into the same out_dir) is refused;
a cut-off last line (a run killed while writing it, or still writing) is left out, and said.

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

trajectory.json (tests/test_runs.py checks that every key below is there):

    args                  the command line options
    thresholds            [10, 100, 1000]
    runs[]                one entry per run, in command-line order
      name                short name (the run's folder)
      path                as given
      log                 the log.jsonl read
      cut_line            the number of its last line when that was cut off (run killed or still writing) and left out; else None
      residual            the run's residual operator (a key of model.RESIDUALS)
      decoded             the stream its LM head reads (h, C, ...)
      starts              start events (more than one: resumed)
      total_batch_size    tokens per step (the last start event's)
      seq_len             block_size: T of the statistics batch
      iters               steps of the evals, ascending, each once (the last eval of a step wins)
      tokens              tokens seen at each eval: iter x total_batch_size
      val_loss            per eval
      val_aux             aux term name -> per eval (e.g. commit_rate, the mean commit gate; {} for vanilla)
      streams             stream name -> its trajectories (lists over evals)
        <stream>
          n_sublayers
          top1_median                [evals][sublayers] top1/median (the heatmap)
          top1_median_max            max over sublayers
          top1_median_max_sublayer   where
          n_massive_total            massive entries summed over sublayers
          kurtosis_max               max over sublayers
          start_mass                 at the eval's peak_layer (None: not logged)
          start_mass_dominant        at the eval's peak_layer (None: not logged)
          dominant_dim               per eval (None: not logged)
          peak_layer                 per eval (None: not logged)
          crossings                  '10', '100', '1000' -> {iter, tokens}: first eval with top1_median_max >= it
          dominant                   None when not logged; else
            channel                  the last eval's dominant channel ...
            stable_from_iter         ... the dominant channel at every eval since this step
            stable_from_tokens
            changes                  how often it changed (0: the same at every eval)
            segments                 [[channel, first step, last step], ...] runs of equal channels
            channels                 every channel seen
          missing                    statistics this log does not have (written before they were logged)
          partial                    statistics logged at some evals only
"""

import json
import math
import os

import numpy as np

from stats import STATS_KEYS

# ----------------------------------------------------------------------------------------------
# Training runs: trajectories of the statistics train.py logs at every evaluation

THRESHOLDS = (10, 100, 1000)   # top1/median levels whose first crossing the trajectory summary reports
REQUIRED_KEYS = ('top1_median', 'kurtosis', 'n_massive')      # in every log.jsonl since the first one
NEWER_KEYS = STATS_KEYS[STATS_KEYS.index('start_mass'):]    # logged since the start-token mass was added
# logs from before the start event described the residual operator: its decoded stream, and the one
# aux term, logged then as train_commit / val_commit
LEGACY_DECODED = {'vanilla': 'h', 'ledger': 'C'}


def read_log(path):
    """([(line number, event dict)], cut) of a log.jsonl. cut: the number of the last line when it was
    cut off (no newline after it, and not JSON: a run killed while writing it, or one still writing),
    which is left out; else None. Any other line that is not a JSON event is an error."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such log file (train.py writes out_dir/log.jsonl)")
    with open(path, 'rb') as f:
        lines = f.read().split(b'\n')   # the last item is what follows the last newline ('' normally)
    events, cut = [], None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
            if i == len(lines):
                cut = i
                break
            what = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            if line.rfind(b'{"event": ') > 0:
                raise ValueError(f"{path}: line {i} is not JSON ({what}): a record cut off by a killed run, with "
                                 f"the next one appended to it (by a train.py from before resumed runs set cut "
                                 f"lines aside); delete that line's text before its last '{{\"event\"'") from None
            raise ValueError(f"{path}: line {i} is not JSON ({what}); only a cut-off last line is left out: fix "
                             f"or delete line {i}") from None
        if not isinstance(ev, dict) or 'event' not in ev:
            raise ValueError(f"{path}: line {i} is not a log event (a JSON object with an 'event' key)")
        events.append((i, ev))
    return events, cut


def _check_stats(log, line, it, stats, shape):
    """Raise unless stats is {stream: {key: [value per sublayer]}} with REQUIRED_KEYS and the same
    streams and sublayer counts as `shape` (those of the first eval; None for the first eval)."""
    if not isinstance(stats, dict) or not stats:
        raise ValueError(f"{log}: line {line}: eval at iter {it} has no activation statistics (stats: "
                         f"{json.dumps(stats)[:40]}); train with stats_seqs > 0 to log them")
    mine = {}
    for name, st in stats.items():
        lists = {k: v for k, v in st.items() if isinstance(v, list)} if isinstance(st, dict) else {}
        lack = [k for k in REQUIRED_KEYS if k not in lists or not lists[k]]
        if lack:
            raise ValueError(f"{log}: line {line}: eval at iter {it}: stream {name}'s stats lack {', '.join(lack)}")
        bad = [k for k in REQUIRED_KEYS if not all(isinstance(v, (int, float)) for v in lists[k])]
        if bad:
            raise ValueError(f"{log}: line {line}: eval at iter {it}: stream {name}'s {bad[0]} holds non-numbers")
        if len({len(v) for v in lists.values()}) > 1:
            raise ValueError(f"{log}: line {line}: eval at iter {it}: stream {name}'s lists differ in length")
        mine[name] = len(lists['top1_median'])
    if shape is not None and mine != shape:
        raise ValueError(f"{log}: line {line}: eval at iter {it} has streams {mine} (sublayers), earlier evals "
                         f"{shape}: a different model was logged into the same file; give each run its own out_dir")
    return mine


def read_run(path, name):
    """One training run, from its log.jsonl, as trajectories over its evaluations (trajectory.json).

    A resumed run appends a start event and may evaluate a step again: the last eval of each iter
    is kept. tokens = iter x total_batch_size of the last start event before the eval (as train.py
    counts them). Keys a log from before they were logged lacks are None, and listed in `missing`.
    """
    log = os.path.join(path, 'log.jsonl') if os.path.isdir(path) else path
    start, n_starts, evals, shape = None, 0, {}, None
    events, cut = read_log(log)
    for line, ev in events:
        if ev['event'] == 'start':
            cfg = ev.get('config')
            if not isinstance(cfg, dict) or not isinstance(cfg.get('total_batch_size'), int):
                raise ValueError(f"{log}: line {line}: start event without config.total_batch_size")
            if start is not None and cfg.get('init_from') == 'scratch':
                raise ValueError(f"{log}: line {line}: a second run was started from scratch into this log (its start "
                                 f"event says init_from 'scratch'; a resumed run's says 'resume'), after the one "
                                 f"that started at line {start[0]}; the lines from {line} on are the later run: "
                                 f"give each run its own out_dir")
            for k in ('residual', 'n_layer', 'n_embd'):
                if start is not None and cfg.get(k) != start[1].get(k):
                    raise ValueError(f"{log}: line {line}: a different model was appended to this log ({k} {cfg.get(k)}, "
                                     f"{start[1].get(k)} at line {start[0]}); give each run its own out_dir")
            start, n_starts = (line, cfg, ev.get('residual')), n_starts + 1
        elif ev['event'] == 'eval':
            it = ev.get('iter')
            if not isinstance(it, int):
                raise ValueError(f"{log}: line {line}: eval event without an integer iter")
            if start is None:
                raise ValueError(f"{log}: line {line}: eval event before any start event (tokens seen unknown)")
            shape = _check_stats(log, line, it, ev.get('stats'), shape)
            evals[it] = (ev, start[1])
    if not evals:
        raise ValueError(f"{log}: no eval events (train.py logs one every eval_interval steps: has the run "
                         f"evaluated yet?)")
    iters = sorted(evals)
    tokens = [it * evals[it][1]['total_batch_size'] for it in iters]
    cfg = start[1]
    info = start[2] or {}
    aux = {}
    for i, it in enumerate(iters):
        ev = evals[it][0]
        values = ev.get('val_aux') if isinstance(ev.get('val_aux'), dict) else \
            ({'commit_rate': ev['val_commit']} if ev.get('val_commit') is not None else {})
        for k, v in values.items():
            aux.setdefault(k, [None] * len(iters))[i] = v
    run = dict(name=name, path=path, log=log, cut_line=cut, residual=cfg.get('residual'),
               decoded=info.get('decoded', LEGACY_DECODED.get(cfg.get('residual'))), starts=n_starts,
               total_batch_size=cfg['total_batch_size'], seq_len=cfg.get('block_size'),
               iters=iters, tokens=tokens,
               val_loss=[evals[it][0].get('val_loss') for it in iters], val_aux=aux, streams={})
    for sname in evals[iters[0]][0]['stats']:
        rows = [evals[it][0]['stats'][sname] for it in iters]

        def at_peak(key):
            vals = [r[key][r['peak_layer']] if isinstance(r.get(key), list) and isinstance(r.get('peak_layer'), int)
                    and 0 <= r['peak_layer'] < len(r[key]) else None for r in rows]
            return vals if any(v is not None for v in vals) else None

        def scalar(key):
            vals = [r.get(key) for r in rows]
            return vals if any(v is not None for v in vals) else None

        ratio = [r['top1_median'] for r in rows]
        st = dict(
            n_sublayers=len(ratio[0]),
            top1_median=ratio,
            top1_median_max=[max(r) for r in ratio],
            top1_median_max_sublayer=[int(np.argmax(r)) for r in ratio],
            n_massive_total=[sum(r['n_massive']) for r in rows],
            kurtosis_max=[max(r['kurtosis']) for r in rows],
            start_mass=at_peak('start_mass'),
            start_mass_dominant=at_peak('start_mass_dominant'),
            dominant_dim=scalar('dominant_dim'),
            peak_layer=scalar('peak_layer'),
        )
        st['crossings'] = first_crossings(iters, tokens, st['top1_median_max'])
        st['dominant'] = channel_history(iters, tokens, st['dominant_dim'])
        st['missing'] = [k for k in NEWER_KEYS if not any(k in r for r in rows)]
        st['partial'] = [k for k in NEWER_KEYS if k not in st['missing'] and not all(k in r for r in rows)]
        run['streams'][sname] = st
    return run


def jsonable(v):
    """v with numpy numbers as Python ones and NaN/inf as None, for json.dump (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): jsonable(u) for k, u in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(u) for u in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_trajectories(out_dir, args, runs):
    """out_dir/trajectory.json (the key tree above); returns its path."""
    path = os.path.join(out_dir, 'trajectory.json')
    with open(path, 'w') as f:
        json.dump(jsonable(dict(args=args, thresholds=list(THRESHOLDS), runs=runs)), f, indent=1)
    return path


def first_crossings(iters, tokens, values, thresholds=THRESHOLDS):
    """{str(threshold): {iter, tokens} of the first eval with value >= threshold, or None (never)}."""
    out = {}
    for t in thresholds:
        hit = next((i for i, v in enumerate(values) if v is not None and v >= t), None)
        out[str(t)] = None if hit is None else dict(iter=iters[hit], tokens=tokens[hit])
    return out


def channel_history(iters, tokens, channels):
    """When the dominant channel changed: its runs of equal values [[channel, first iter, last iter]],
    the number of changes, and from which eval on it stayed (None when the log has no channels)."""
    segments = []
    for it, tok, c in zip(iters, tokens, channels or []):
        if c is None:
            continue
        if segments and segments[-1][0] == c:
            segments[-1][2] = it
        else:
            segments.append([c, it, it, tok])
    if not segments:
        return None
    c, first, _, tok = segments[-1]
    return dict(channel=c, stable_from_iter=first, stable_from_tokens=tok, changes=len(segments) - 1,
                segments=[s[:3] for s in segments], channels=sorted({s[0] for s in segments}))


def _crossing(c):
    return 'never' if c is None else f"step {c['iter']} ({c['tokens']:,} tokens)"


def _history(h, limit=8):
    if h is None:
        return 'not logged'
    if h['changes'] == 0:
        return f"the same, {h['channel']}, at every eval"
    segs = [f"{c} (steps {a}-{b})" if a != b else f"{c} (step {a})" for c, a, b in h['segments']]
    segs = segs[:limit // 2] + ['...'] + segs[-limit // 2:] if len(segs) > limit else segs
    return (f"changed {h['changes']} time(s): {', '.join(segs)}; stable at {h['channel']} from step "
            f"{h['stable_from_iter']} ({h['stable_from_tokens']:,} tokens)")


def trajectory_text(runs):
    """The text summary of the trajectories: per run and stream, then a table of crossings."""
    lines = []
    for run in runs:
        it, tok = run['iters'], run['tokens']
        lines.append(f"=== run {run['name']}: {run['log']} ===")
        resumed = f", resumed {run['starts'] - 1} time(s) (last eval of each step kept)" if run['starts'] > 1 else ""
        loss = [v for v in run['val_loss'] if v is not None]
        aux = {k: [v for v in vals if v is not None] for k, vals in run['val_aux'].items()}
        lines.append(f"{run['residual']} (decodes {run['decoded']}), {len(it)} evals at steps {it[0]}..{it[-1]} "
                     f"({tok[0]:,}..{tok[-1]:,} tokens, {run['total_batch_size']:,} per step){resumed}"
                     + (f"; val loss {loss[0]:.4g} -> {loss[-1]:.4g}" if loss else "")
                     + ''.join(f", val {k} {v[0]:.4g} -> {v[-1]:.4g}" for k, v in aux.items() if v))
        if run['cut_line']:
            lines.append(f"  line {run['cut_line']} of the log is cut off (a run killed while writing it, or still "
                         f"writing) and left out")
        for sname, st in run['streams'].items():
            m = st['top1_median_max']
            lines.append(f"  stream {sname} ({st['n_sublayers']} sublayers): first top1/median (max over sublayers) "
                         + ', '.join(f">= {t}: {_crossing(st['crossings'][str(t)])}" for t in THRESHOLDS)
                         + f"; largest {max(m):.4g} at step {it[int(np.argmax(m))]}")
            lines.append(f"    dominant channel: {_history(st['dominant'])}")
            last = (f"    last eval (step {it[-1]}): top1/median {m[-1]:.4g} at s={st['top1_median_max_sublayer'][-1]}, "
                    f"massive entries {st['n_massive_total'][-1]}, kurtosis (max) {st['kurtosis_max'][-1]:.4g}")
            for key in ('start_mass', 'start_mass_dominant'):
                if st[key] is not None and st[key][-1] is not None:
                    last += f", {key} {st[key][-1]:.4g}"
            if st['start_mass'] is not None and run['seq_len']:
                last += f" (uniform: 1/T = {1 / run['seq_len']:.4g})"
            lines.append(last)
            if st['missing']:
                lines.append(f"    not in this log (written before train.py logged them; not plotted): "
                             f"{', '.join(st['missing'])}")
            if st['partial']:
                lines.append(f"    logged at some evals only (gaps in the plots): {', '.join(st['partial'])}")
        lines.append("")
    rows = [(sname, run['name'], [_crossing(st['crossings'][str(t)]).replace('step ', '').replace(' tokens', '')
                                  for t in THRESHOLDS],
             'not logged' if st['dominant'] is None else
             (f"{st['dominant']['channel']} throughout" if st['dominant']['changes'] == 0 else
              f"{st['dominant']['channel']} from step {st['dominant']['stable_from_iter']}"))
            for run in runs for sname, st in run['streams'].items()]
    w = max(12, max(len(c) for r in rows for c in r[2]) + 2)
    rw = max(len(r[1]) for r in rows) + 2
    lines.append("=== first eval with top1/median (max over sublayers) >= threshold: step (tokens seen) ===")
    lines.append(f"{'stream':8s}{'run':{rw}s}" + ''.join(f"{'>= ' + str(t):>{w}s}" for t in THRESHOLDS)
                 + "   dominant channel")
    order = list(dict.fromkeys(sname for sname, *_ in rows))   # streams in order of first appearance
    for sname, name, cells, dom in sorted(rows, key=lambda r: order.index(r[0])):
        lines.append(f"{sname:8s}{name:{rw}s}" + ''.join(f"{c:>{w}s}" for c in cells) + f"   {dom}")
    return '\n'.join(lines)

# ----------------------------------------------------------------------------------------------
# Groups of runs (seeds): mean and sample std per group; for each pair of groups Welch's interval
# and p, the permutation p, Holm over the metrics of the pair, Hedges' g, and BCa from 8 runs a group.
# scipy.stats is imported inside the functions: probe.py imports this module, and train.py imports
# probe.py at every evaluation.

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
