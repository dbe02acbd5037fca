"""
The probe's figures (probe.py draws them; docs/reference.md §4 defines what they show).

matplotlib is imported inside the functions only, so that `import probe` stays light. Every function takes the plain dicts that probe.py also writes to
JSON and returns the paths of the PNGs it wrote.

- plot_checkpoint: one checkpoint's layerwise profile, token x channel heatmap at the peak layer,
  position 0 across depth, alpha_1 layer x head.
- plot_overlay: several checkpoints' decoded stream vs sublayer (coloured by order when many).
- plot_trajectories: training runs' log.jsonl statistics against tokens seen, one colour per run,
  and a (step x sublayer) heatmap of top1/median per run.
- plot_groups: groups of runs (seeds): each run a dot, each group's centre and spread on the
  metric's scale, and brackets: over the pairs whose permutation p, Holm-adjusted within the pair,
  is below 0.05 (probe.py --group, exploration), or over a study's declared tests only.
"""

import os
import textwrap

import numpy as np

RUN_COLOURS = 'tab10'     # one colour per run/checkpoint while there are at most 10
MANY = 8                  # more lines than this: colour by order with a colour bar instead of a legend
BRACKET_GROUPS = 5        # more groups than this: groups.png leaves the brackets out (10+ pairs overlap)
# the layerwise profile: key, sideways offset in sublayers, line style, marker
LAYERWISE_LINES = (('top1', -0.15, '-', 'o'), ('top2', 0.0, '--', 's'), ('top3', 0.15, ':', '^'),
                   ('median', 0.0, '-.', 'x'))
ALPHA1_NUMBERS = 144      # alpha_1 heatmaps with at most this many (layer, head) cells print every value


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    if fig.get_layout_engine() is None:      # figures with a suptitle or a shared colour bar are 'constrained'
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _legends(fig, axes, n_runs):
    """A legend per panel while there are at most MANY runs; beyond that one legend for the figure,
    outside the panels on the right (per-panel legends of 40 runs would cover the data)."""
    axes = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
    if n_runs <= MANY:
        for ax in axes:
            ax.legend(fontsize=7)
    elif axes:
        handles, labels = axes[0].get_legend_handles_labels()
        rows = max(5, int(fig.get_figheight() * 72 / 10))     # 6 pt entries, ~10 pt apart
        fig.legend(handles, labels, loc='outside right upper', fontsize=6, ncol=-(-len(labels) // rows))


def _int_ticks(ax):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _blocks(ax, S, axis='x'):
    """Dashed lines at block boundaries (between mlp_b and attn_{b+1})."""
    from matplotlib.ticker import MaxNLocator
    for b in range(1, S // 2):
        (ax.axvline if axis == 'x' else ax.axhline)(2 * b - 0.5, color='gray', lw=0.6, ls='--')
    (ax.xaxis if axis == 'x' else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def _colours(n):
    """n distinct colours: tab10 while it lasts, then evenly spaced viridis."""
    plt = _pyplot()
    if n <= 10:
        return [plt.get_cmap(RUN_COLOURS)(i) for i in range(n)]
    return [plt.get_cmap('viridis')(i / max(n - 1, 1)) for i in range(n)]


def _where(s):
    return f"block {s // 2}, layer {s // 2 + 1}, {'attn' if s % 2 == 0 else 'mlp'}"

# ----------------------------------------------------------------------------------------------
# Checkpoints


def plot_checkpoint(r, sample, out_dir):
    """The four per-checkpoint figures; returns the file paths."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    name, streams = r['name'], r['streams']
    files = []

    def save(fig, suffix):
        if r.get('kind'):                           # the model, attention variant included, on every figure
            fig.suptitle(f"{name}: {r['kind']}", fontsize=10)
        files.append(_save(fig, os.path.join(out_dir, f"{name}_{suffix}.png")))

    n = len(streams)
    # Sun-style layerwise profile. top1/2/3 are often nearly equal (no outlier yet): each gets its own
    # marker and line style and a small sideways offset, so that none hides the others
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, (sname, st) in zip(axes[0], streams.items()):
        p = st['per_sublayer']
        S = len(p['top1'])
        for key, dx, style, marker in LAYERWISE_LINES:
            ax.plot(np.arange(S) + dx, np.maximum(p[key], 1e-12), ls=style, marker=marker, ms=4, lw=1.2,
                    mfc='none' if key in ('top2', 'top3') else None, label=key + (f' (x {dx:+g})' if dx else ''))
        ax.set_yscale('log')
        _blocks(ax, S)
        ax.set_xlabel('sublayer s (attn even, mlp odd; dashed: block boundaries)')
        ax.set_ylabel('|x|')
        ax.set_title(f"{name}: stream {sname}")
        ax.legend(fontsize=8)
    save(fig, 'layerwise')
    # token x channel |x| at the peak layer, sequence 0
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, (sname, st) in zip(axes[0], streams.items()):
        s = st['summary']['peak_layer']
        img = sample[sname][s].float().numpy()
        im = ax.imshow(img, aspect='auto', interpolation='nearest', cmap='viridis')
        fig.colorbar(im, ax=ax, label='|x|')
        _int_ticks(ax)
        ax.set_xlabel('channel')
        ax.set_ylabel('token position')
        ax.set_title(f"{name}: {sname} at s={s} ({_where(s)}), seq 0", fontsize=9)
    save(fig, 'tokens_channels')
    # per-channel |x| of position 0 across depth
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, (sname, st) in zip(axes[0], streams.items()):
        img = np.maximum(np.array(st['pos0_abs']), 1e-6)
        im = ax.imshow(img, aspect='auto', interpolation='nearest', cmap='magma',
                       norm=LogNorm(vmin=max(img.min(), img.max() * 1e-6), vmax=img.max()))
        fig.colorbar(im, ax=ax, label='mean |x| at position 0')
        _int_ticks(ax)
        _blocks(ax, img.shape[0], axis='y')
        ax.set_xlabel('channel')
        ax.set_ylabel('sublayer s')
        ax.set_title(f"{name}: {sname}, position 0 across depth", fontsize=9)
    save(fig, 'pos0_depth')
    save(_alpha1_figure(plt, r['attention'], name), 'alpha1')
    return files


def _alpha1_figure(plt, a, name):
    """alpha_1 layer x head at prefix_T and at T (one panel when they are equal), both on one scale from
    0 to the largest value (a fixed 0..1 scale hides values of 0.03-0.08); epsilon is marked on the
    colour bar when in range; on small grids every cell carries its number, '*' on sink heads."""
    top = max(float(np.max(a['alpha1_prefix'])), float(np.max(a['alpha1'])), 1e-6)
    panels = [('alpha1_prefix', a['prefix_T'], a['sink1_prefix'], a.get('uniform_alpha1_prefix')),
              ('alpha1', a['T'], a['sink1'], a.get('uniform_alpha1'))]
    if a['prefix_T'] == a['T']:                # the prefix is the whole window: one panel, not two equal ones
        panels = panels[1:]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, T, sink, uniform) in zip(axes[0], panels):
        img = np.array(a[key])
        im = ax.imshow(img, aspect='auto', interpolation='nearest', cmap='Blues', vmin=0, vmax=top)
        bar = fig.colorbar(im, ax=ax, label='alpha_1')
        if a['epsilon'] <= top:
            _mark_epsilon(bar, a['epsilon'], top)
        if img.size <= ALPHA1_NUMBERS:
            for (l, h), v in np.ndenumerate(img):
                ax.text(h, l, f"{v:.2f}" + ('*' if v > a['epsilon'] else ''), ha='center', va='center',
                        fontsize=8 if img.size <= 64 else 6, color='white' if v > 0.6 * top else 'black')
        _int_ticks(ax)
        ax.set_xlabel('head')
        ax.set_ylabel('layer (block, 0-based)')
        title = f"{name}: alpha_1 at T={T}, Sink_1 = {sink:.1f}% (*: > eps {a['epsilon']})"
        if uniform is not None:
            title += f"\nuniform attention gives {uniform:.3f}" + (" (T < 64: not comparable)" if T < 64 else "")
        ax.set_title(title, fontsize=9)
    return fig


def _mark_epsilon(bar, eps, top):
    """A line at epsilon on the colour bar, labelled as one of its ticks ('eps 0.3'): the ticks closer
    than 8 % of the bar to it are dropped, so that no tick label overlaps it."""
    bar.ax.axhline(eps, color='firebrick', lw=1.5)
    ticks = [t for t in bar.get_ticks() if 0 <= t <= top and abs(t - eps) > 0.08 * top]
    marks = sorted(ticks + [eps])
    bar.set_ticks(marks, labels=[f'eps {t:g}' if t == eps else f'{t:g}' for t in marks])
    for label in bar.ax.get_yticklabels():
        if label.get_text().startswith('eps'):
            label.set_color('firebrick')


def plot_overlay(results, out_dir):
    """top1/median and top1 of each checkpoint's decoded stream (h, C, ...) vs sublayer.

    Up to MANY checkpoints get a legend; more (e.g. every snapshot of a run) are coloured from dark
    to light in command-line order, with a colour bar labelled by iter when every checkpoint has one."""
    plt = _pyplot()
    many = len(results) > MANY
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout='constrained' if many else None)
    colours = _colours(len(results)) if not many else \
        [plt.get_cmap('viridis')(i / max(len(results) - 1, 1)) for i in range(len(results))]
    S_max = 0
    for r, c in zip(results, colours):
        sname = r['residual']['decoded']
        p = r['streams'][sname]['per_sublayer']
        S_max = max(S_max, len(p['top1']))
        for ax, key in zip(axes, ('top1_median', 'top1')):
            ax.plot(p[key], marker='o', ms=3 if not many else 2, lw=1.5 if not many else 1, color=c,
                    label=f"{r['name']} ({r['kind'] + ', ' if r.get('kind') else ''}{sname})")
    for ax, what in zip(axes, ('top1 / median', 'top1 |x|')):
        ax.set_yscale('log')
        _blocks(ax, S_max)
        ax.set_xlabel('sublayer s (dashed: block boundaries)')
        ax.set_ylabel(what)
        ax.set_title(f"decoded stream: {what}")
        if not many:
            ax.legend(fontsize=8)
    if many:
        from matplotlib.colors import Normalize
        iters = [r.get('iter_num') for r in results]
        by_iter = all(isinstance(i, int) for i in iters) and iters == sorted(iters) and iters[0] != iters[-1]
        lo, hi = (iters[0], iters[-1]) if by_iter else (0, len(results) - 1)
        sm = plt.cm.ScalarMappable(cmap='viridis', norm=Normalize(lo, hi))
        fig.colorbar(sm, ax=axes, label='iter' if by_iter else 'checkpoint (command-line order)')
        fig.suptitle(f"{len(results)} checkpoints: {results[0]['name']} ... {results[-1]['name']}", fontsize=9)
    return [_save(fig, os.path.join(out_dir, 'overlay_top1_median.png'))]

# ----------------------------------------------------------------------------------------------
# Training runs (log.jsonl), against tokens seen

TRAJECTORY_PANELS = (
    # key in each run's stream dict, y label, y scale ('symlog': linear below 10, and only when
    # something is above 10; kurtosis can be < 0)
    ('top1_median_max', 'top1/median (max over sublayers)', 'log'),
    ('n_massive_total', 'massive entries (summed over sublayers)', 'symlog'),
    ('kurtosis_max', 'excess kurtosis (max over sublayers)', 'symlog'),
    ('start_mass', 'start_mass at peak_layer', 'linear'),
    ('start_mass_dominant', 'start_mass_dominant at peak_layer', 'linear'),
    ('dominant_dim', 'dominant channel (dominant_dim)', 'linear'),
)


def _stream_views(runs):
    """[(figure name, {run index: stream name})]: every stream (in order of first appearance), plus
    'decoded' when the runs decode different streams (vanilla's h next to the ledger's C), so that
    such runs share a figure."""
    names = list(dict.fromkeys(s for run in runs for s in run['streams']))
    views = [(s, {i: s for i, run in enumerate(runs) if s in run['streams']}) for s in names]
    decoded = {i: run['decoded'] for i, run in enumerate(runs) if run['decoded'] in run['streams']}
    if len(set(decoded.values())) > 1:
        views.append(('decoded', decoded))
    return views


X_LABELS = {'tokens': 'tokens seen', 'iters': 'training step'}


def plot_trajectories(runs, out_dir, thresholds=(10, 100, 1000), x='tokens'):
    """Per stream: the TRAJECTORY_PANELS against tokens seen (x='iters': against the step, e.g. for
    the revisions of a Hugging Face model, hf.py), one colour per run (trajectory_<stream>.png);
    val loss and the operators' aux terms, e.g. the commit rate (trajectory_loss.png); per run a
    (step x sublayer) heatmap of top1/median for each stream (trajectory_heatmap_<run>.png). A metric
    a run did not log is left out of its panel and named in the panel's corner."""
    plt = _pyplot()
    colours = _colours(len(runs))
    files = []
    for view, which in _stream_views(runs):
        fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), layout='constrained')
        for ax, (key, label, scale) in zip(axes.flat, TRAJECTORY_PANELS):
            missing, biggest = [], 0.0
            for i, sname in which.items():
                run, st = runs[i], runs[i]['streams'][sname]
                y = st.get(key)
                if y is None:
                    missing.append(run['name'])
                    continue
                xs = np.array(run[x], dtype=float)
                y = np.array([np.nan if v is None else v for v in y], dtype=float)
                biggest = max(biggest, float(np.nanmax(np.abs(y), initial=0.0)))
                lbl = run['name'] + (f" ({sname})" if view == 'decoded' else '')
                if key == 'dominant_dim':
                    ax.step(xs, y, where='post', color=colours[i], lw=1, alpha=0.6)
                    ax.plot(xs, y, 'o', ms=3, color=colours[i], label=lbl)
                else:
                    ax.plot(xs, np.maximum(y, 1e-12) if scale == 'log' else y, marker='o', ms=2.5,
                            color=colours[i], label=lbl)
                if key == 'start_mass' and run.get('seq_len'):
                    ax.axhline(1 / run['seq_len'], color=colours[i], ls=':', lw=0.8)
            if key == 'top1_median_max':
                for t in thresholds:
                    ax.axhline(t, color='gray', ls='--', lw=0.6)
            if key == 'start_mass':
                ax.text(0.99, 0.01, 'dotted: 1/T (uniform)', transform=ax.transAxes, ha='right', va='bottom',
                        fontsize=7, color='gray')
            if missing:
                ax.text(0.01, 0.99, 'not logged: ' + ', '.join(missing), transform=ax.transAxes, va='top',
                        fontsize=7, color='firebrick')
            if scale == 'symlog' and biggest > 10:
                ax.set_yscale('symlog', linthresh=10)
            elif scale == 'log':
                ax.set_yscale('log')
            if key == 'n_massive_total' and biggest < 1:
                ax.set_ylim(-0.5, 1.5)                       # none anywhere: a plain 0 line
            if key in ('dominant_dim', 'n_massive_total'):
                from matplotlib.ticker import MaxNLocator
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(X_LABELS[x])
            ax.set_ylabel(label, fontsize=9)
            ax.grid(alpha=0.3)
        _legends(fig, axes.flat, len(runs))
        decodes = (', '.join(f"{runs[i]['name']} {s}" for i, s in which.items()) if len(which) <= MANY else
                   ', '.join(sorted(set(which.values()))))
        fig.suptitle(f"stream {view}" + (f' (the stream each run decodes: {decodes})' if view == 'decoded' else ''))
        files.append(_save(fig, os.path.join(out_dir, f"trajectory_{view}.png")))
    files.append(_plot_losses(plt, runs, colours, out_dir, x))
    if any(run.get('grads') for run in runs):
        files.append(_plot_grads(plt, runs, colours, out_dir, x))
    # (step x sublayer) heatmaps
    from matplotlib.colors import LogNorm
    for run in runs:
        streams = run['streams']
        fig, axes = plt.subplots(1, len(streams), figsize=(4.5 * len(streams), 4.5), squeeze=False)
        for ax, (sname, st) in zip(axes[0], streams.items()):
            img = np.maximum(np.array(st['top1_median'], dtype=float), 1e-3)     # (evals, sublayers)
            im = ax.imshow(img, aspect='auto', interpolation='nearest', cmap='magma', origin='lower',
                           norm=LogNorm(vmin=max(img.min(), 1.0), vmax=max(img.max(), 10.0)))
            fig.colorbar(im, ax=ax, label='top1 / median')
            _blocks(ax, img.shape[1])
            rows = np.unique(np.linspace(0, len(run['iters']) - 1, min(8, len(run['iters']))).round().astype(int))
            ax.set_yticks(rows)
            ax.set_yticklabels([str(run['iters'][r]) for r in rows])
            ax.set_xlabel('sublayer s (dashed: block boundaries)')
            ax.set_ylabel('step (iter)')
            ax.set_title(f"{run['name']}: stream {sname}", fontsize=9)
        files.append(_save(fig, os.path.join(out_dir, f"trajectory_heatmap_{run['name']}.png")))
    return files

def _plot_losses(plt, runs, colours, out_dir, x):
    """trajectory_loss.png: val loss, then the task accuracy and the operators' aux terms (e.g. the
    commit rate), each panel only when some run logged it."""
    panels = [('val loss (cross-entropy)', lambda run: {'': run['val_loss']})]
    if any(any(v is not None for v in run.get('val_task_acc') or []) for run in runs):
        panels.append(('val task accuracy (the answers)', lambda run: {'': run.get('val_task_acc') or []}))
    if any(run['val_aux'] for run in runs):
        panels.append(('val aux terms (commit_rate: mean commit gate)', lambda run: run['val_aux']))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, layout='constrained')
    for ax, (label, series) in zip(axes[0], panels):
        for i, run in enumerate(runs):
            for k, (term, values) in enumerate(series(run).items()):
                if values and any(v is not None for v in values):
                    ax.plot(np.array(run[x], dtype=float), [np.nan if v is None else v for v in values],
                            marker='os^v'[k % 4], ms=2.5, color=colours[i],
                            label=run['name'] + (f": {term}" if term else ''))
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _legends(fig, axes[0], len(runs))
    return _save(fig, os.path.join(out_dir, 'trajectory_loss.png'))


def _plot_grads(plt, runs, colours, out_dir, x):
    """trajectory_grads.png (runs that logged gradient statistics): the parameters' gradient norm
    (over all sublayers), and the decoded stream's gradient norm at position 0 over the mean norm at
    the other positions after the first sublayer (a gradient sink is far from 1)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
    for i, run in enumerate(runs):
        g = run.get('grads')
        if not g:
            continue
        xs = np.array(run[x], dtype=float)
        total = [np.nan if n is None else float(np.sqrt(np.sum(np.square(n)))) for n in g['sublayer']]
        axes[0].plot(xs, total, marker='o', ms=2.5, color=colours[i], label=run['name'])
        st = g['streams'][run['decoded']]
        ratio = [np.nan if p is None or o is None or not o[0] else p[0] / o[0] for p, o in zip(st['pos0'], st['other'])]
        axes[1].plot(xs, ratio, marker='o', ms=2.5, color=colours[i], label=f"{run['name']} ({run['decoded']})")
    axes[1].axhline(1.0, color='gray', ls=':', lw=0.8)
    for ax, label in zip(axes, ('parameter gradient norm (cross-entropy, stats batch)',
                                'decoded stream after sublayer 0: |grad| at position 0 / others')):
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(label, fontsize=9)
        ax.set_yscale('log')
        ax.grid(alpha=0.3)
    _legends(fig, axes, len(runs))
    return _save(fig, os.path.join(out_dir, 'trajectory_grads.png'))


# ----------------------------------------------------------------------------------------------
# Groups of runs (seeds)


def plot_groups(groups, out_dir, metrics=None, name='groups.png', title='groups', brackets=None):
    """One panel per metric (all, or the given ones): every run as a dot and each group's centre on the
    metric's scale (black square: the mean +- sample std; on the log scales, drawn on a log axis, the
    geometric mean x/÷ the geometric std); a group with no measured value is not drawn in that panel.
    A bracket joins two groups whose permutation p, Holm-adjusted over the metrics of the pair
    (p_perm_holm), is below groups['methods']['alpha']: exploration, not a study's verdict. With more
    than BRACKET_GROUPS groups the pairs are too many to draw (the text report and probe.json carry them).
    brackets {metric: [(a, b, text)]}: a study's declared tests instead (lab.study), whatever their p,
    and no other bracket: a figure of a study marks what the study tested, nothing else."""
    plt = _pyplot()
    chosen = [(m, st) for m, st in groups['metrics'].items() if (metrics is None or m in metrics)
              and any(g['n'] for g in st['per_group'].values())]
    names, alpha = groups['names'], groups['methods']['alpha']
    many = len(names) > BRACKET_GROUPS
    width = max(3.6, 0.4 * len(names) + 1.0)            # room for every group's column
    ncol = min(max(1, int(16 // width)), 4, max(1, len(chosen)))
    nrow = max(1, -(-len(chosen) // ncol))
    height = 3.4 + (0.09 * max(len(g) for g in names) if many else 0)   # and for the upright labels
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, height * nrow), squeeze=False, layout='constrained')
    colours = dict(zip(names, _colours(len(names))))
    for ax, (metric, st) in zip(axes.flat, chosen):
        marks = _significant_pairs(st, alpha, many) if brackets is None else brackets.get(metric, [])
        _group_panel(ax, metric, st, names, colours, marks, many)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis('off')
    pairs = ("brackets: the study's primary tests, permutation p Holm-adjusted over its primary family"
             if brackets is not None else
             f"{len(names)} groups: the pairs' tests are in the text report and probe.json" if many else
             f"* : permutation p < {alpha}, Holm-adjusted over the metrics of that pair (exploration)")
    text = f"{title}: runs (dots), each group's centre and spread (black; log axes: geometric); {pairs}"
    fig.suptitle(textwrap.fill(text, int(13 * width * ncol)), fontsize=10)   # ~13 characters an inch at 10 pt
    return [_save(fig, os.path.join(out_dir, name))]


def _significant_pairs(st, alpha, many):
    """[(a, b, text)]: the pairs of one metric whose p_perm_holm is below alpha (exploration)."""
    return [] if many else [(pr['a'], pr['b'], f"* p_holm {pr['p_perm_holm']:.2g}") for pr in st['pairs']
                            if pr.get('p_perm_holm') is not None and pr['p_perm_holm'] < alpha]


def _group_panel(ax, metric, st, names, colours, marks, many):
    """One metric's panel of plot_groups; marks [(a, b, text)]: the brackets to draw."""
    log = st.get('scale', 'raw') != 'raw'
    drawn = [g for g in names if st['per_group'][g]['n']]
    x = {g: i for i, g in enumerate(drawn)}
    rng = np.random.default_rng(0)          # jitter of the dots only
    top, bottom = -np.inf, np.inf
    for g in drawn:
        vals = np.array([v for v in st['per_group'][g]['values'] if v is not None and np.isfinite(v)])
        if log:                             # log(1 + m) for counts: the axis is symlog-like, so shift by 1
            vals = vals + (1.0 if st['scale'] == 'log1p' else 0.0)
            vals = vals[vals > 0]
            if not len(vals):
                continue
            centre, spread = np.exp(np.log(vals).mean()), np.exp(np.log(vals).std(ddof=1)) if len(vals) > 1 else 1.0
            lo, hi = centre / spread, centre * spread
        else:
            centre, sd = vals.mean(), vals.std(ddof=1) if len(vals) > 1 else 0.0
            lo, hi = centre - sd, centre + sd
        ax.plot(x[g] + rng.uniform(-0.12, 0.12, len(vals)), vals, 'o', ms=4, alpha=0.6, color=colours[g])
        ax.errorbar(x[g] + 0.25, centre, yerr=[[centre - lo], [hi - centre]], fmt='s', ms=6, capsize=4, color='black')
        top, bottom = max(top, vals.max(), hi), min(bottom, vals.min(), lo)
    if log:
        ax.set_yscale('log')
    span = (np.log10(top / bottom) if log else (top - bottom)) or 1.0
    up = (lambda y, k: y * 10 ** (k * span)) if log else (lambda y, k: y + k * span)
    level = up(top, 0.08)
    for a, b, text in marks:
        if a not in x or b not in x:
            continue
        xa, xb = x[a], x[b]
        ax.plot([xa, xa, xb, xb], [up(level, -0.03), level, level, up(level, -0.03)], color='black', lw=0.8)
        left = min(xa, xb) == 0                 # a label centred over the first column runs into the y axis
        ax.text(-0.4 if left else (xa + xb) / 2, level, text, ha='left' if left else 'center', va='bottom', fontsize=7)
        level = up(level, 0.14)
    ax.set_ylim(up(bottom, -0.08), up(level, 0.04))
    ax.set_xticks(range(len(drawn)))
    if many:
        ax.set_xticklabels([f"{g} (n={st['per_group'][g]['n']})" for g in drawn], fontsize=7, rotation=90)
    else:
        ax.set_xticklabels([f"{g}\n(n={st['per_group'][g]['n']})" for g in drawn], fontsize=8)
    ax.set_xlim(-0.5, max(len(drawn), 2) - 0.5)
    ax.set_title(metric + (' (1 + value)' if st.get('scale') == 'log1p' else ''), fontsize=9)
    ax.grid(alpha=0.3, axis='y')
