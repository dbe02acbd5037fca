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
plotted with what they have, and the summary names what is missing.

--group NAME=CKPT,CKPT,... (repeatable, in place of the INPUTs; a quoted glob such as
'out/vanilla_s*/ckpt.pt' is expanded): every checkpoint is probed as usual (its report is printed;
its own PNGs are skipped), then per group the mean and sample std over runs of the headline numbers
(group_metrics: max top1/median, bos_concentration, start_mass, start_mass_dominant, persistence per
stream; Sink_1 at T=64; val loss), and for each pair of groups A, B (A listed first) mean(B) -
mean(A) with a 95% percentile bootstrap interval (bootstrap_ci: runs resampled within each group,
10,000 resamples, seed 0) and a two-sided permutation p-value (permutation_pvalue: every split when
there are at most 10,000, else 10,000 random permutations, p = (1 + hits) / 10,001; the output
says which). A group of one run gets its value, no std and no interval (SPEC §4, last paragraph).

trajectory.json (tests/test_runs.py checks that every key below is there):

    args                  the command line options
    thresholds            [10, 100, 1000]
    runs[]                one entry per run, in command-line order
      name                short name (the run's folder)
      path                as given
      log                 the log.jsonl read
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
    """[(line number, event dict)] of a log.jsonl; a line that is not a JSON event is an error."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such log file (train.py writes out_dir/log.jsonl)")
    events = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i} is not JSON ({e.msg}, column {e.colno}); a run killed while "
                                 f"writing leaves a cut line: delete that line") from None
            if not isinstance(ev, dict) or 'event' not in ev:
                raise ValueError(f"{path}: line {i} is not a log event (a JSON object with an 'event' key)")
            events.append((i, ev))
    return events


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
    for line, ev in read_log(log):
        if ev['event'] == 'start':
            cfg = ev.get('config')
            if not isinstance(cfg, dict) or not isinstance(cfg.get('total_batch_size'), int):
                raise ValueError(f"{log}: line {line}: start event without config.total_batch_size")
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
    run = dict(name=name, path=path, log=log, residual=cfg.get('residual'),
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
# Groups of runs (seeds): mean, sample std, bootstrap interval and permutation test (numpy only)

STATS_SEED = 0             # fixed seed of the resampling, so a report can be reproduced exactly
RESAMPLES = 10_000         # bootstrap resamples
MAX_EXACT = 10_000         # enumerate every split of the runs when there are at most this many ...
PERMUTATIONS = 10_000      # ... else this many random permutations


def bootstrap_ci(a, b, resamples=RESAMPLES, level=0.95, seed=STATS_SEED):
    """Percentile bootstrap interval of mean(b) - mean(a): runs resampled with replacement within
    each group. None when a group has fewer than two runs (no interval exists)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    mean_b = b[rng.integers(0, len(b), (resamples, len(b)))].mean(1)
    mean_a = a[rng.integers(0, len(a), (resamples, len(a)))].mean(1)
    diffs = mean_b - mean_a
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def permutation_pvalue(a, b, max_exact=MAX_EXACT, permutations=PERMUTATIONS, seed=STATS_SEED):
    """Two-sided permutation p-value of |mean(b) - mean(a)| under exchangeable group labels.

    Returns (p, test): every split of the pooled runs into groups of the same sizes when there are
    at most max_exact of them (p = share of splits at least as extreme, the observed one included;
    test 'exact', count = the number of splits), else `permutations` random relabellings (p = (1 +
    hits) / (1 + permutations); test 'random')."""
    import itertools
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pooled, na = np.concatenate([a, b]), len(a)
    n = len(pooled)
    observed = abs(b.mean() - a.mean())
    tol = 1e-9 * max(1.0, observed, np.abs(pooled).max())       # equal differences up to rounding
    n_splits = math.comb(n, na)
    if n_splits <= max_exact:
        in_a = np.zeros((n_splits, n), dtype=bool)
        for i, idx in enumerate(itertools.combinations(range(n), na)):
            in_a[i, list(idx)] = True
        test, count = 'exact', n_splits
    else:
        rng = np.random.default_rng(seed)
        in_a = rng.random((permutations, n)).argsort(1) < na
        test, count = 'random', permutations
    sum_a = (in_a * pooled).sum(1)
    diffs = np.abs((pooled.sum() - sum_a) / (n - na) - sum_a / na)
    hits = int((diffs >= observed - tol).sum())
    p = hits / n_splits if test == 'exact' else (1 + hits) / (1 + permutations)
    return float(p), dict(test=test, count=count)


def group_metrics(r):
    """The headline numbers of one probed checkpoint that groups compare: {metric: value or None}.
    Streams as in the comparison table: the decoded one (h or C), and D and read of a ledger."""
    out = {}
    streams = r['streams']
    for tag, sname in (('h|C', 'h' if 'h' in streams else 'C'), ('D', 'D'), ('read', 'read')):
        sm = streams[sname]['summary'] if sname in streams else {}
        for key in ('max_top1_median', 'bos_concentration', 'start_mass', 'start_mass_dominant', 'persistence'):
            out[f'[{tag}] {key}'] = sm.get(key)
    out['sink1_prefix (Sink_1 %, T=64)'] = r['attention']['sink1_prefix']
    out['val_loss'] = r['val_loss']
    return out


def group_statistics(results, groups):
    """The `groups` entry of probe.json: per metric, each group's runs, mean and sample std, and for
    each pair of groups (A listed before B) mean(B) - mean(A), its bootstrap interval and p-value."""
    by_name = {r['name']: r for r in results}
    names = list(groups)
    values = {g: [group_metrics(by_name[c]) for c in members] for g, members in groups.items()}
    metrics = {}
    for metric in group_metrics(results[0]):
        per = {}
        for g in names:
            vals = [v[metric] for v in values[g]]
            got = [v for v in vals if v is not None and math.isfinite(v)]
            per[g] = dict(n=len(got), values=vals,
                          mean=float(np.mean(got)) if got else None,
                          std=float(np.std(got, ddof=1)) if len(got) > 1 else None,
                          note=None if len(got) > 1 else
                          ('one run: no std, no interval' if got else 'not measured in this group'))
        if all(per[g]['n'] == 0 for g in names):
            continue                                  # e.g. [D] when no group holds a ledger
        pairs = []
        for i, ga in enumerate(names):
            for gb in names[i + 1:]:
                a = [v for v in per[ga]['values'] if v is not None and math.isfinite(v)]
                b = [v for v in per[gb]['values'] if v is not None and math.isfinite(v)]
                pair = dict(a=ga, b=gb, diff=None, ci=None, p=None, test=None, note=None)
                if a and b:
                    p, test = permutation_pvalue(a, b)
                    pair.update(diff=float(np.mean(b) - np.mean(a)), ci=bootstrap_ci(a, b), p=p,
                                test=f"{test['test']}: {test['count']:,} " +
                                     ('splits (all)' if test['test'] == 'exact' else 'random permutations'))
                    small = [g for g, v in ((ga, a), (gb, b)) if len(v) < 2]
                    if small:
                        pair['note'] = f"one run in {' and '.join(small)}: no interval exists"
                else:
                    pair['note'] = f"not measured in {' and '.join(g for g, v in ((ga, a), (gb, b)) if not v)}"
                pairs.append(pair)
        metrics[metric] = dict(per_group=per, pairs=pairs)
    return dict(names=names, members={g: list(m) for g, m in groups.items()},
                bootstrap=dict(resamples=RESAMPLES, level=0.95, seed=STATS_SEED, kind='percentile'),
                permutation=dict(max_exact=MAX_EXACT, permutations=PERMUTATIONS, seed=STATS_SEED,
                                 sides='two-sided, |mean(B) - mean(A)|'),
                metrics=metrics)


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
    b = g['bootstrap']
    for i, ga in enumerate(names):
        for gb in names[i + 1:]:
            lines.append("")
            lines.append(f"=== {gb} - {ga}: difference of means; {int(100 * b['level'])}% percentile bootstrap "
                         f"interval ({b['resamples']:,} resamples of the runs within each group, seed {b['seed']}); "
                         f"two-sided permutation p ===")
            lines.append(f"{'metric':{lw}s}{'diff':>11s}  {'95% interval':25s}{'p':>8s}  test")
            for m, st in metrics.items():
                pr = next(p for p in st['pairs'] if p['a'] == ga and p['b'] == gb)
                ci = f"[{pr['ci'][0]:.4g}, {pr['ci'][1]:.4g}]" if pr['ci'] else 'none'
                diff, p = ('-' if v is None else f"{v:.4g}" for v in (pr['diff'], pr['p']))
                lines.append(f"{m:{lw}s}{diff:>11s}  {ci:25s}{p:>8s}  {pr['test'] or ''}"
                             + (f"  ({pr['note']})" if pr['note'] else ""))
    return '\n'.join(lines)
