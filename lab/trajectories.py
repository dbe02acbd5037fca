"""
Training runs, for probe.py: trajectories of the statistics train.py logs. Plain numpy over numbers
already measured: no model is run here.

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

trajectory.json's key tree: docs/reference.md §4.10.
"""

import json
import math
import os

import numpy as np

from lab.runfolder import LOG, read_log
from lab.stats import STATS_KEYS

# ----------------------------------------------------------------------------------------------
# Training runs: trajectories of the statistics train.py logs at every evaluation

THRESHOLDS = (10, 100, 1000)   # top1/median levels whose first crossing the trajectory summary reports
REQUIRED_KEYS = ('top1_median', 'kurtosis', 'n_massive')      # in every log.jsonl since the first one
NEWER_KEYS = STATS_KEYS[STATS_KEYS.index('start_mass'):]    # logged since the start-token mass was added
# logs from before the start event described the residual operator: its decoded stream, and the one
# aux term, logged then as train_commit / val_commit
LEGACY_DECODED = {'vanilla': 'h', 'ledger': 'C'}


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
    log = os.path.join(path, LOG) if os.path.isdir(path) else path
    start, n_starts, evals, cut = read_evals(log)
    iters = sorted(evals)
    tokens = [it * evals[it][1]['total_batch_size'] for it in iters]
    cfg = start[1]
    info = start[2] or {}
    run = dict(name=name, path=path, log=log, cut_line=cut, residual=cfg.get('residual'),
               decoded=info.get('decoded', LEGACY_DECODED.get(cfg.get('residual'))), starts=n_starts,
               total_batch_size=cfg['total_batch_size'], seq_len=cfg.get('block_size'),
               iters=iters, tokens=tokens,
               val_loss=[evals[it][0].get('val_loss') for it in iters], val_aux=read_val_aux(evals, iters),
               val_task_acc=[evals[it][0].get('val_task_acc') for it in iters], grads=read_grads(evals, iters),
               streams={})
    for sname in evals[iters[0]][0]['stats']:
        run['streams'][sname] = stream_trajectory(iters, tokens, [evals[it][0]['stats'][sname] for it in iters])
    return run


def read_evals(log):
    """(the last start event as (line, config, residual info), the number of start events,
    {iter: (its last eval event, the config of the start event before it)}, the cut line or None),
    checked: one run, one model, every eval after a start event and with activation statistics."""
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
    return start, n_starts, evals, cut


def stream_trajectory(iters, tokens, rows):
    """One stream's trajectory from its stats at each eval (rows): the statistics, their first
    crossings of THRESHOLDS, the dominant channel's history, and the keys the log lacks."""

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
    return st


def read_val_aux(evals, iters):
    """{aux term: its val value per eval (None where an eval lacks it)}; logs from before the start
    event described the operator have the one aux term as val_commit."""
    aux = {}
    for i, it in enumerate(iters):
        ev = evals[it][0]
        values = ev.get('val_aux') if isinstance(ev.get('val_aux'), dict) else \
            ({'commit_rate': ev['val_commit']} if ev.get('val_commit') is not None else {})
        for k, v in values.items():
            aux.setdefault(k, [None] * len(iters))[i] = v
    return aux


def read_grads(evals, iters):
    """The gradient statistics of the evals (train.py logs them since they were added; None for a log
    without any): per eval the parameter gradient norm per sublayer, and per stream the gradient norm
    at position 0 and over the other positions per sublayer (None where an eval has none)."""
    logged = [evals[it][0].get('grads') for it in iters]
    if not any(logged):
        return None
    names = next(g for g in logged if g)['streams']
    return dict(sublayer=[g['sublayer'] if g else None for g in logged],
                streams={n: {k: [g['streams'][n][k] if g else None for g in logged] for k in ('pos0', 'other')}
                         for n in names})


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
    """out_dir/trajectory.json (keys: docs/reference.md §4.10); returns its path."""
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
