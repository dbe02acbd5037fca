"""
The probe's text report of one checkpoint and the side-by-side comparison of several (probe.py
prints them; probe.json holds the same numbers). Plain functions of the result dicts that
probe.py builds: nothing here runs a model. docs/reference.md §4 defines every number.
"""

import numpy as np

from lab.weightings import WEIGHTINGS
from model import RESIDUALS
from lab.data import EOT
from lab.stats import MASSIVE_ABS, MASSIVE_REL, SINK_T

DO_NOTHING = {  # the do-nothing channels of attention variants (Observer.on_attention's extra)
    'slot': "weight on the bias / +1 slot", 'registers': "weight on the register slots",
    'total': "total weight of the row (sigmoid, relu: 0 = the head adds nothing)",
    'gate': "mean output gate (0 = the head adds nothing)",
}


def residual_info(name):
    """What log.jsonl and probe.json record about a residual operator, so that the analysis tools
    need no operator names: its streams, views and aux terms with their descriptions, the decoded
    stream, and its penalties (train key -> the aux term it weights)."""
    op = RESIDUALS[name]
    return dict(name=name, decoded=op.decoded, streams=dict(op.streams), views=dict(op.views), aux=dict(op.aux),
                penalties={key: term for key, (term, _) in op.penalties.items()})


def attention_label(args):
    """The attention variant of a model config (dict) in a few words for reports; '' for plain
    softmax attention."""
    parts = ['attn_bias'] if args.get('attn_bias') else []
    parts.append(WEIGHTINGS[args.get('attn_softmax', 'softmax')].label({'attn_softmax': 'softmax', **args}))
    if args.get('attn_gate', 'none') != 'none':
        parts.append(f"gate:{args['attn_gate']}")
    if args.get('n_registers'):
        parts.append(f"{args['n_registers']} registers")
    return '+'.join(p for p in parts if p)


def short(items, limit=6):
    return ','.join(str(i) for i in items[:limit]) + (',...' if len(items) > limit else '')


def model_kind(cfg):
    """'vanilla', 'vanilla+qk_norm', 'vanilla post-norm', 'ledger', 'ledger strict', 'vanilla,
    attention plus_one', ...: the operator's own label (Residual.label), then the backbone's variants
    and the attention variant (attention_label)."""
    op = RESIDUALS.get(cfg['residual'])
    label = op.label(cfg) if op else cfg['residual']
    name, _, rest = label.partition(' ')
    attention = attention_label(cfg)
    return name + ('+qk_norm' if cfg.get('qk_norm') else '') + (f' {rest}' if rest else '') + \
        (f', attention {attention}' if attention else '')


def sublayer_name(s):
    return f"block {s // 2}, layer {s // 2 + 1}, {'attn' if s % 2 == 0 else 'mlp'}"


def num(v, w=9):
    if v is None:
        return f"{'-':>{w}}"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{v:>{w}d}"
    return f"{v:>{w}.4g}"


def report(r):
    """The text report of one checkpoint's result."""
    lines = []
    cfg, data = r['model_args'], r['data']
    kind = model_kind(cfg)
    lines.append(f"=== {r['name']}: {r['path']} ===")
    w = r.get('weights')
    hf = w is not None and w.get('kind') == 'hf'
    where = f"{w['architecture']} ({w['dtype']}) {w['spec']}" if hf else \
        f"GPT-2 weights{' ' + w['name'] if w and w['name'] else ''} ({w['dtype']}) from {w['folder']}" if w \
        else f"iter {r['iter_num']}"
    lines.append(f"model: {kind}, {cfg['n_layer']} layers x {cfg['n_embd']} wide x {cfg['n_head']} heads, "
                 f"{r['params'] / 1e6:.2f}M params, {where}; ran on {r['device']}")
    if data['source'] == 'val':
        source = (f"of the {data['dataset']} corpus' val documents (this Python's standard library) in the model's "
                  f"own tokenizer ({w['tokenizer']}), the same passages for every hf: model" if hf else
                  f"from the {data['dataset']} val shards")
        lines.append(f"data: {data['num_seqs']} windows x T={data['seq_len']} {source} "
                     f"(seed {data['seed']}{', doc-aligned' if data['doc_aligned'] else ''})"
                     + (" -- GPT-2 has no val split of ours: the built-in corpus (this Python's standard library); "
                        "--text for your own" if w and not hf else ""))
    else:
        lines.append(f"data: {data['num_seqs']} --text prompt(s), T={data['seq_len']} "
                     f"(prompt lengths {data['truncated_from']}, truncated to the shortest)")
    if w:
        lines.append("blocks: Sun et al.'s raw output of block i is the h row of s = 2i + 1 (mlp) below"
                     + (f"; {w['sublayers']}" if hf else ""))
    bos = '<|endoftext|>' if data['bos'] == EOT else f"BOS (token {data['bos']})"
    lines.append(f"position 0 holds {bos} in {100 * data['bos_at_pos0']:.0f}% of sequences"
                 + (f" ({data['bos_note']})" if data.get('bos_note') else "") + f"; val loss {num(r['val_loss'], 0)}")
    if data['task']:
        lines.append(f"task ({data['dataset']}): accuracy {num(r['task_acc'], 0)} on the {r['task_answers']} tokens "
                     f"after a TRIGGER (argmax; chance 1/{data['task']['vocab_size'] - 2})")
    for name, st in r['streams'].items():
        lines += stream_lines(name, st, data['seq_len'])
    lines += attention_lines(r) + sink_kind_lines(r['attention']) + precision_lines(r) + super_weight_lines(r)
    lines += intervention_lines(r)
    return '\n'.join(lines)


def stream_lines(name, st, T):
    """One stream's table and summary lines (T: the window length)."""
    p, sm = st['per_sublayer'], st['summary']
    lines = [""]
    lines.append(f"stream {name}: {st['where']}")
    lines.append("   s blk layer kind      top1      top2      top3    median  top1/med  kurtosis "
                 "feat_maxmed  n_out50 n_massive top_ch start_mass start_dom")
    for s in range(len(p['top1'])):
        lines.append(f"{s:4d} {s // 2:3d} {s // 2 + 1:5d} {'attn' if s % 2 == 0 else 'mlp ':4s} "
                     f"{num(p['top1'][s])} {num(p['top2'][s])} {num(p['top3'][s])} {num(p['median'][s])} "
                     f"{num(p['top1_median'][s])} {num(p['kurtosis'][s])} {num(p['feat_maxmed'][s], 11)} "
                     f"{num(p['n_out50'][s], 8)} {num(p['n_massive'][s])} {p['top_channel'][s]:6d} "
                     f"{num(p['start_mass'][s], 10)} {num(p['start_mass_dominant'][s])}")
    if sm['emergence_sublayer'] is None:
        lines.append(f"  census: no massive entry (|x| > {MASSIVE_ABS:g} and >= {MASSIVE_REL:g} x median); "
                     f"max top1/median {sm['max_top1_median']:.4g} at s={sm['max_top1_median_sublayer']}")
    else:
        lm = sm['largest_massive']
        lines.append(f"  census: emergence s={sm['emergence_sublayer']} ({sublayer_name(sm['emergence_sublayer'])}), "
                     f"last s={sm['last_sublayer']}, up to {sm['n_massive_max']} entries per sublayer; largest "
                     f"{lm['value']:.4g} at seq {lm['seq']} position {lm['position']} channel {lm['channel']} "
                     f"(s={lm['sublayer']}); channels {short([c for c, _ in sm['massive_channels']])}, "
                     f"positions {short([q for q, _ in sm['massive_positions']])}; "
                     f"max top1/median {sm['max_top1_median']:.4g} at s={sm['max_top1_median_sublayer']}")
    lines.append(f"  depth: dominant_dim {sm['dominant_dim']}, persistence {sm['persistence']:.3f}, "
                 f"peak_layer s={sm['peak_layer']} ({sublayer_name(sm['peak_layer'])}), peak_feat_ratio "
                 f"{sm['peak_feat_ratio']:.4g}, bos_concentration {sm['bos_concentration']:.4g}, "
                 f"pos0 cos(s, s+1) mean {num(sm['pos0_cos_mean'], 0)}")
    if sm['max_top1_median_sublayer'] != sm['peak_layer']:
        lines.append(f"  two peaks, two measures: top1/median (one token's largest |x| against the median) "
                     f"peaks at s={sm['max_top1_median_sublayer']}; peak_layer s={sm['peak_layer']} is where "
                     f"dominant_dim's mean |x| over all tokens peaks")
    lines.append(f"  start-token mass at peak_layer: start_mass {sm['start_mass']:.4g} (uniform: 1/T = "
                 f"{1 / T:.4g}), start_mass_dominant {sm['start_mass_dominant']:.4g} "
                 f"(share of dominant_dim's |x| on position 0)")
    if st.get('registers'):                      # the register slots' own rows
        top = np.array(st['registers']['max_abs'])                              # (S, R)
        lines.append(f"  register slots (not in the statistics above; position 0 is the first token): largest "
                     f"|x| per sublayer {', '.join(f'{v:.3g}' for v in top.max(1))}; by register at the last "
                     f"sublayer {', '.join(f'{v:.3g}' for v in top[-1])}")
    return lines


def attention_lines(r):
    """The attention part of the report: alpha_1 and Sink_1 per layer, the conditional sink and the
    do-nothing channels."""
    a, lines = r['attention'], [""]
    one = a['prefix_T'] == a['T']               # the prefix is the whole window: one length to report
    lines.append(f"attention: alpha_1 = mean of A[t, 0] over the queries t that can see key 0; sink head: alpha_1 > "
                 f"{a['epsilon']} (epsilon); " + (f"T={a['T']}" if one else f"T={a['prefix_T']} and T={a['T']}"))
    lengths = [('', a['T'])] if one else [('_prefix', a['prefix_T']), ('', a['T'])]
    lines.append(" blk layer  " + ''.join(f"a1_mean@{T:<4d} a1_max@{T:<4d} sinks@{T:<4d} " for _, T in lengths)
                 + "|k0|/|k|  |v0|/|v| cos(q,k0)")
    for l in range(len(a['alpha1'])):
        lines.append(f"{l:4d} {l + 1:5d}" + ''.join(f" {num(float(np.mean(a['alpha1' + k][l])), 12)} "
                     f"{num(max(a['alpha1' + k][l]), 11)} {a['sink_heads' + k][l]:10d}" for k, _ in lengths)
                     + f" {num(a['k0_ratio'][l])} {num(a['v0_ratio'][l])} {num(a['cos_q_k0'][l])}")
    lines.append(f"Sink_1 = {a['sink1']:.1f}% at T={a['T']}" if one else
                 f"Sink_1 = {a['sink1_prefix']:.1f}% at T={a['prefix_T']}, {a['sink1']:.1f}% at T={a['T']}")
    lines[-1] += f" (epsilon {a['epsilon']})"
    if a['short_T']:
        lines.append(f"warning: T={a['T']} < {SINK_T}: alpha_1 and Sink_1 are not comparable with Gu et al.'s "
                     f"(T={SINK_T}); uniform causal attention alone gives alpha_1 = {a['uniform_alpha1']:.3f} at "
                     f"T={a['T']} ({'above' if a['uniform_alpha1'] > a['epsilon'] else 'below'} epsilon "
                     f"{a['epsilon']}; above it up to T=9), so a sink here means little: probe {SINK_T} tokens or more")
    lines.append(f"sink position (argmax of attention received) [position, sequences]: {a['sink_positions'][:5]}; "
                 f"massive position {a['massive_positions'][:5]}; coincide in "
                 f"{100 * a['cooccurrence']:.0f}% of sequences")
    return lines + conditional_lines(a) + do_nothing_lines(r)


def heads_header(n_heads, width=11):
    """' blk layer  ' and one right-aligned 'head h' column per head (the per-head tables)."""
    return " blk layer  " + ' '.join(f"{f'head {h}':>{width}s}" for h in range(n_heads))


def conditional_lines(a):
    cs = a.get('conditional')
    if not cs:
        return []
    lines = ["", f"conditional sink: attention on position 0 from the {cs['n_other']} other queries / from the "
                 f"{cs['n_trigger']} trigger queries (whose next token is an answer), per layer and head; "
                 f"'*': a conditional sink head (other >= {cs['thresholds']['other']}, trigger <= "
                 f"{cs['thresholds']['trigger']})"]
    lines.append(heads_header(len(cs['other'][0])) + "   (other/trigger)")
    heads = {tuple(h) for h in cs['heads']}
    for l in range(len(cs['other'])):
        cells = [f"{cs['other'][l][h]:.2f}/{cs['trigger'][l][h]:.2f}{'*' if (l, h) in heads else ' '}"
                 for h in range(len(cs['other'][l]))]
        lines.append(f"{l:4d} {l + 1:5d}  " + ' '.join(f"{c:>11s}" for c in cells))
    gl, gh = cs['max_gap_head']
    lines.append(f"{len(cs['heads'])} conditional sink head(s); largest other - trigger {cs['max_gap']:.3f} "
                 f"(layer {gl + 1}, head {gh})")
    return lines


def do_nothing_lines(r):
    a = r['attention']
    dn = a.get('do_nothing')
    if not dn:
        return []
    cs = a.get('conditional')
    lines = ["", f"do-nothing channels of the attention variant ({attention_label(r['model_args'])}), per layer and "
                 "head, mean over queries" + (" (other / trigger queries)" if cs else "") + ": " +
                 '; '.join(f"{name}: {DO_NOTHING[name]}" for name in dn)]
    for name, d in dn.items():
        for l in range(len(d['mean'])):
            cells = [f"{d['other'][l][h]:.2f}/{d['trigger'][l][h]:.2f}" if d.get('trigger') else f"{d['mean'][l][h]:.3f}"
                     for h in range(len(d['mean'][l]))]
            lines.append(f"{name:>9s} {l:4d} {l + 1:5d}  " + ' '.join(f"{c:>11s}" for c in cells))
    weighting = r['model_args'].get('attn_softmax', 'softmax')
    if not WEIGHTINGS[weighting].normalised:
        lines.append(f"({weighting} weights are not normalised: alpha_1, Sink_1 and the conditional sink above are "
                     "the share of each row's total weight on position 0)")
    return lines


def sink_kind_lines(a):
    """What each sink head does (docs/reference.md §4.6): its v0 ratio, the effective rank of its output, its kind."""
    sk = a.get('sink_kinds')
    if sk is None:
        return []
    th = sk['thresholds']
    rule = (f"no-op: |v0|/|v| < {th['v0_ratio']:g}; else broadcast: effective rank of the head's output over "
            f"positions < {th['erank']:g}; else mixed")
    if not sk['heads']:
        return ["", f"sink heads, what they do ({rule}): no sink head at T={a['T']}"]
    lines = ["", f"sink heads at T={a['T']}, what they do ({rule}):",
             " layer head   alpha_1  |v0|/|v|  eff.rank  kind"]
    for h in sk['heads']:
        lines.append(f"{h['layer'] + 1:6d} {h['head']:4d} {num(h['alpha1'])} {num(h['v0_ratio'])} {num(h['erank'])}  "
                     f"{h['kind']}")
    return lines


def precision_lines(r):
    """fp16 headroom of the streams (docs/reference.md §4.12)."""
    f = r.get('fp16')
    if not f:
        return []
    room = f"headroom {f['fp16_max']:g} / max|x| = {f['headroom']:.4g}" if f['headroom'] else "headroom: all zero"
    return ["", f"fp16: largest |x| {f['max_abs']:.4g} (stream {f['stream']}, s={f['sublayer']}, seq {f['seq']}, "
                f"position {f['position']}, channel {f['channel']}); {room}"
                + (" -- OVERFLOWS float16" if f['headroom'] is not None and f['headroom'] < 1 else "")]


def super_weight_lines(r):
    """The super-weight candidates of the MLP sublayers and the chosen one (docs/reference.md §4.12)."""
    sw = r.get('super_weight')
    if not sw:
        return []
    if sw['candidates'] is None:
        return ["", f"super weight: does not apply: {sw['note']}"]
    lines = ["", f"super weight (Yu et al. 2024; '*': chosen): {sw['rule']}",
             "   s layer   row  column      weight   |output|    |input|  max|input| seq position"]
    chosen = sw['chosen']
    for c in sw['candidates']:
        lines.append(f"{c['sublayer']:4d} {c['sublayer'] // 2 + 1:5d} {c['row']:5d} {c['column']:7d} {num(c['weight'], 11)} "
                     f"{num(c['out_abs'], 10)} {num(c['in_abs'], 10)} {num(c['in_max'], 11)} {c['seq']:3d} "
                     f"{c['position']:8d}" + (' *' if c == chosen else ''))
    return lines


def intervention_lines(r):
    iv = r.get('interventions')
    if not iv:
        return []
    a = r['attention']
    lines = ["", "interventions (val loss on the probe windows; Sink_1 in %)",
             f" {'name':12s} {'val_loss':>9s} {'delta':>9s} {'Sink@' + str(a['prefix_T']):>9s} "
             f"{'Sink@' + str(a['T']):>9s} {'task_acc':>9s}  target"]
    for name, v in iv.items():
        lines.append(f" {name:12s} {num(v['val_loss'])} {num(v['delta_loss'])} {num(v['sink1_prefix'])} "
                     f"{num(v['sink1'])} {num(v['task_acc'])}  {v['target']}")
    if iv['zero'].get('fallback'):
        lines.append(" (no massive activation: zero/mean target each sequence's top-1 entry at the top1 peak)")
    before, after = iv['none'].get('outlier'), iv.get('super_weight', {}).get('outlier')
    if before and after:
        lines.append(f" super weight zeroed: stream {before['stream']} outlier ratio {before['outlier_ratio']:.4g} -> "
                     f"{after['outlier_ratio']:.4g}, max|x| {before['max_abs']:.4g} -> {after['max_abs']:.4g}; its "
                     f"down-projection's largest |output| {num(before['down_out_abs'], 0)} -> {num(after['down_out_abs'], 0)}")
    return lines


def comparison(results):
    """Side-by-side rows of the key summary numbers: {'columns': names, 'rows': [[label, values]]}."""
    rows = []

    def add(label, fn):
        vals = []
        for r in results:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError):
                vals.append(None)
        rows.append([label, vals])

    add('residual', lambda r: model_kind(r['model_args']))
    add('params (M)', lambda r: round(r['params'] / 1e6, 2))
    add('iter', lambda r: r['iter_num'])
    add('tokens seen', lambda r: r['tokens'])
    add('val loss', lambda r: r['val_loss'])
    add('task accuracy', lambda r: r['task_acc'])
    add('attention variant', lambda r: attention_label(r['model_args']) or 'softmax')
    for name in DO_NOTHING:
        add(f'do-nothing: {name} (mean over heads)',
            lambda r, name=name: float(np.mean(r['attention']['do_nothing'][name]['mean'])))
    add('conditional sink heads', lambda r: len(r['attention']['conditional']['heads']))
    add('conditional sink: max other - trigger', lambda r: r['attention']['conditional']['max_gap'])
    if any(r['attention']['short_T'] for r in results):
        add('T of Sink_1 (T=64) (< 64: not comparable)', lambda r: r['attention']['prefix_T'])
    add('Sink_1 % (T=64)', lambda r: r['attention']['sink1_prefix'])
    add('Sink_1 % (T=full)', lambda r: r['attention']['sink1'])
    add('massive pos == sink pos (frac)', lambda r: r['attention']['cooccurrence'])
    add('decoded stream', lambda r: r['residual']['decoded'])
    others = [n for r in results for n in r['streams'] if n != r['residual']['decoded']]
    for role in ['decoded'] + list(dict.fromkeys(others)):   # the decoded stream, then the rest by name
        def stream(r, role=role):
            return r['streams'][r['residual']['decoded'] if role == 'decoded' else role]
        tag = role
        add(f'[{tag}] max top1/median', lambda r: stream(r)['summary']['max_top1_median'])
        add(f'[{tag}] max top1', lambda r: max(stream(r)['per_sublayer']['top1']))
        add(f'[{tag}] peak_layer (s)', lambda r: stream(r)['summary']['peak_layer'])
        add(f'[{tag}] dominant_dim', lambda r: stream(r)['summary']['dominant_dim'])
        add(f'[{tag}] persistence', lambda r: stream(r)['summary']['persistence'])
        add(f'[{tag}] bos_concentration', lambda r: stream(r)['summary']['bos_concentration'])
        add(f'[{tag}] start_mass (peak)', lambda r: stream(r)['summary']['start_mass'])
        add(f'[{tag}] start_mass_dominant (peak)', lambda r: stream(r)['summary']['start_mass_dominant'])
        add(f'[{tag}] emergence (s)', lambda r: stream(r)['summary']['emergence_sublayer'])
        add(f'[{tag}] n_massive (max)', lambda r: stream(r)['summary']['n_massive_max'])
        add(f'[{tag}] kurtosis (max)', lambda r: max(stream(r)['per_sublayer']['kurtosis']))
    add('fp16 headroom (65504 / max|x|)', lambda r: r['fp16']['headroom'])
    add('super weight (s, row, column)', lambda r: '{sublayer},{row},{column}'.format(**r['super_weight']['chosen']))
    add('super weight value', lambda r: r['super_weight']['chosen']['weight'])
    for kind in ('no-op', 'broadcast', 'mixed'):
        add(f'sink heads (T=full): {kind}',
            lambda r, kind=kind: sum(h['kind'] == kind for h in r['attention']['sink_kinds']['heads']))
    for name in ('zero', 'mean', 'soften', 'quant8', 'quant4', 'w8a8', 'super_weight'):
        add(f'delta val loss: {name}', lambda r, name=name: r['interventions'][name]['delta_loss'])
    add('outlier ratio: super weight zeroed', lambda r: r['interventions']['super_weight']['outlier']['outlier_ratio'])
    for name in ('zero', 'mean', 'soften'):
        add(f'Sink_1 % (T=64): {name}', lambda r, name=name: r['interventions'][name]['sink1_prefix'])
    return dict(columns=[r['name'] for r in results], rows=rows)


def comparison_text(comp, width=160):
    """The table, cut into blocks of columns that fit `width` characters (many snapshots)."""
    strings = [v for _, vals in comp['rows'] for v in vals if isinstance(v, str)]
    w = max(12, max(len(c) for c in comp['columns'] + strings) + 2)
    lw = max(len(label) for label, _ in comp['rows']) + 1
    per_block = max(1, (width - lw) // w)
    n = len(comp['columns'])
    lines = ["=== comparison ===" + (f" ({n} checkpoints, {per_block} per block)" if n > per_block else "")]
    for c0 in range(0, n, per_block):
        if c0:
            lines.append("")
        cols = slice(c0, c0 + per_block)
        lines.append(f"{'':{lw}s}" + ''.join(f"{c:>{w}s}" for c in comp['columns'][cols]))
        for label, vals in comp['rows']:
            cells = [f"{v:>{w}s}" if isinstance(v, str) else num(v, w) for v in vals[cols]]
            lines.append(f"{label:{lw}s}" + ''.join(cells))
    return '\n'.join(lines)
