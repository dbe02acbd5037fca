"""probe.py on tiny CPU models whose answers are known by construction."""
import json
import os

import numpy as np
import pytest
import torch

import probe
from lab import measure, stats
from keytree import check_keys, documented_keys
from model import GPT, GPTConfig
from lab.data import write_shard

VOCAB = 512          # small vocabulary: the synthetic val shard only uses ids below it
T = 96               # > 64, so Sink_1 on the first 64 tokens differs from the full length
N = 4
CH, POS, VALUE = 3, 0, 500.0   # the planted massive activation: channel 3, position 0, ~500 ...
EMERGE = 1                     # ... written by mlp_0 (sublayer 1) and carried to the end


def planted_model():
    """A 2-layer vanilla model with a known massive activation and known attention.

    Channel 5 is 10 at position 0 only (position embedding), channel 6 is 1 everywhere; channels 3, 5, 6
    are written by no sublayer except mlp_0, whose two GELU units 100(u5 - 1) and 100(u5 - 1) - 1 are
    ~300 and ~299 at position 0 and exactly 0 elsewhere (u5 = 0 there), so 500 x their difference puts
    500 into channel 3 at position 0 only, from sublayer 1 on. Attention head 0 has q = 0 (uniform
    causal attention: alpha_1 = mean_t 1/(t+1)); head 1 has q = 100 u6 and k = 100 u5 in its first
    dimension, so every query puts all its mass on key 0 (alpha_1 = 1), in both layers.
    """
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=128, vocab_size=VOCAB)
    m = GPT(cfg)
    d, hd = 16, 8
    with torch.no_grad():
        m.wte.weight[:, [3, 5, 6]] = 0
        m.wpe.weight[:, [3, 5, 6]] = 0
        m.wpe.weight[0, 5] = 10
        m.wpe.weight[:, 6] = 1
        for sub in m.sublayers:
            sub.fn.proj.weight[[3, 5, 6], :] = 0
            if sub.fn.proj.bias is not None:
                sub.fn.proj.bias[[3, 5, 6]] = 0
        for l in range(2):
            W = m.sublayers[2 * l].fn.qkv.weight             # rows: q (0..d-1), k (d..2d-1), v
            W[:d] = 0
            W[hd, 6] = 100                                    # head 1, q dim 0 = 100 u6
            W[d + hd:2 * d] = 0
            W[d + hd, 5] = 100                                # head 1, k dim 0 = 100 u5
        mlp = m.sublayers[1].fn
        mlp.fc.weight[:2] = 0
        mlp.fc.weight[0, 5], mlp.fc.bias[0] = 100, -100
        mlp.fc.weight[1, 5], mlp.fc.bias[1] = 100, -101
        mlp.proj.weight[:, :2] = 0
        mlp.proj.weight[CH, 0], mlp.proj.weight[CH, 1] = VALUE, -VALUE
    return m.eval()


def random_model(residual='ledger', vocab=VOCAB, d=32, seed=1):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=d, block_size=128, vocab_size=vocab,
                         residual=residual)).eval()


def val_shard(root, vocab=VOCAB, n=20000):
    os.makedirs(os.path.join(root, 'builtin'), exist_ok=True)
    write_shard(os.path.join(root, 'builtin', 'builtin_val_000000.bin'),
                np.random.default_rng(0).integers(0, vocab, n))
    return str(root)


def windows(n=N, t=T, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# ----------------------------------------------------------------------------------------------


def test_sublayer_stats_keys_and_census():
    x = torch.randn(2, 8, 16) * 0.01
    x[1, 4, 7] = -300.0
    st = stats.sublayer_stats(x)
    assert set(st) == {'top1', 'top2', 'top3', 'median', 'top1_median', 'rms', 'n_massive', 'max_entry',
                       'kurtosis', 'feat_maxmed', 'n_out50', 'top_channel', 'start_mass', 'start_mass_dominant'}
    assert st['rms'] == pytest.approx(x.double().square().mean().sqrt().item(), rel=1e-9)
    assert st['top_channel'] == 7
    assert st['n_massive'] == 1
    assert st['max_entry'] == dict(seq=1, position=4, channel=7, value=-300.0)
    med = x.abs().reshape(2, -1).median(1).values.mean().item()
    assert st['median'] == pytest.approx(med, rel=1e-6)
    top1 = x.abs().reshape(2, -1).max(1).values.mean().item()
    assert st['top1'] == pytest.approx(top1, rel=1e-6)
    # the float32 implementation agrees with a plain float64 one of the definitions (docs/reference.md §4)
    xs = (torch.randn(3, 10, 24) * torch.rand(24) * 5).double()
    xs[0, 0, 5] = 1000.0
    st = stats.sublayer_stats(xs)
    a = xs.abs()
    z = xs - xs.mean(-1, keepdim=True)
    kurt = (z.pow(4).mean(-1) / z.pow(2).mean(-1).pow(2) - 3).mean().item()
    chan = a.mean(dim=(0, 1))
    n_out50 = (a >= 50 * a.median(-1, keepdim=True).values).sum(-1).double().mean().item()
    assert st['kurtosis'] == pytest.approx(kurt, rel=1e-5)
    assert st['feat_maxmed'] == pytest.approx((chan.max() / chan.median()).item(), rel=1e-5)
    assert st['n_out50'] == pytest.approx(n_out50) and st['n_out50'] > 0
    assert st['top2'] == pytest.approx(a.reshape(3, -1).topk(2).values[:, 1].mean().item(), rel=1e-6)
    # batches accumulate to the same numbers as one big batch
    st = stats.sublayer_stats(x)
    acc = stats.SublayerAccumulator()
    acc.add(x[:1])
    acc.add(x[1:], offset=1)
    for k, v in acc.result().items():
        assert v == pytest.approx(st[k], rel=1e-5) if not isinstance(v, dict) else v == st[k]


def test_planted_massive_activation():
    model = planted_model()
    x, y = windows()
    r, _ = measure.measure(model, x, y, batch_size=3)       # batches of 3 + 1 sequences
    h = r['streams']['h']
    p, sm = h['per_sublayer'], h['summary']
    assert p['n_massive'] == [0, N, N, N]                 # one entry per sequence from sublayer 1 on
    assert sm['emergence_sublayer'] == EMERGE and sm['last_sublayer'] == 3
    lm = sm['largest_massive']
    assert (lm['position'], lm['channel']) == (POS, CH)
    assert lm['value'] == pytest.approx(VALUE, rel=1e-4)
    assert sm['massive_channels'] == [[CH, 3 * N]] and sm['massive_positions'] == [[POS, 3 * N]]
    assert sm['pos0_massive_channels'] == [CH]
    for s in (1, 2, 3):
        assert p['top1'][s] == pytest.approx(VALUE, rel=1e-4)
        assert p['max_entry'][s]['channel'] == CH and p['max_entry'][s]['position'] == POS
    # across depth, by hand: channel 3 has mean |x| 500/T at s >= 1, channel 6 is 1 everywhere
    assert sm['dominant_dim'] == CH
    assert p['top_channel'] == [6, CH, CH, CH]
    assert sm['persistence'] == pytest.approx(0.75)
    assert sm['peak_layer'] == EMERGE                     # equal at s = 1, 2, 3: the first one
    assert sm['bos_concentration'] == pytest.approx(T, rel=1e-4)
    cap = measure.Capture()
    model(x, observer=cap)
    h1 = cap.streams['h'][EMERGE].abs().mean(dim=(0, 1))
    assert sm['peak_feat_ratio'] == pytest.approx((h1.max() / h1.median()).item(), rel=1e-4)
    assert h['channel_mean_abs'][EMERGE][CH] == pytest.approx(VALUE / T, rel=1e-4)
    assert h['pos0_abs'][EMERGE][CH] == pytest.approx(VALUE, rel=1e-4)
    x0 = [cap.streams['h'][s][:, 0] for s in range(4)]
    cos = [torch.nn.functional.cosine_similarity(x0[s], x0[s + 1], dim=-1).mean().item() for s in range(3)]
    assert p['pos0_cos_next'] == pytest.approx(cos, rel=1e-5)
    # the massive position is the sink position in every sequence
    assert r['attention']['cooccurrence'] == 1.0 and sm['cooccurrence'] == 1.0
    assert r['attention']['sink_positions'] == [[0, N]]


def test_start_token_mass_by_hand():
    """Start-token mass (docs/reference.md §4.5): per sequence, then averaged; 1/T when every position carries the same mass."""
    t, d = 10, 4
    st = stats.sublayer_stats(-2.0 * torch.ones(3, t, d))
    assert st['start_mass'] == pytest.approx(1 / t) and st['start_mass_dominant'] == pytest.approx(1 / t)
    x = torch.ones(2, t, d)
    x[0, 0, 2], x[1, 0, 2] = 100.0, -50.0          # a start-token activation, different in each sequence
    st = stats.sublayer_stats(x)
    assert st['top_channel'] == 2
    assert st['start_mass'] == pytest.approx(np.mean([(d - 1 + v) / (t * d - 1 + v) for v in (100, 50)]))
    assert st['start_mass_dominant'] == pytest.approx(np.mean([v / (v + t - 1) for v in (100, 50)]))
    # the planted model: channel 3 (dominant_dim) is 0 before mlp_0, then 500 at position 0 only
    model = planted_model()
    x, y = windows()
    r, _ = measure.measure(model, x, y, batch_size=3)
    p, sm = r['streams']['h']['per_sublayer'], r['streams']['h']['summary']
    cap = measure.Capture()
    model(x, observer=cap)
    for s in range(4):
        a = cap.streams['h'][s].abs().double()
        assert p['start_mass'][s] == pytest.approx((a[:, 0].sum(-1) / a.sum(dim=(1, 2))).mean().item(), rel=1e-5)
    assert p['start_mass_dominant'] == pytest.approx([0.0, 1.0, 1.0, 1.0], abs=1e-6)
    assert (sm['start_mass'], sm['start_mass_dominant']) == (p['start_mass'][EMERGE], p['start_mass_dominant'][EMERGE])
    # what train.py logs: the same numbers, with dominant_dim and peak_layer per stream
    st = stats.activation_stats(model, x)
    assert list(st) == ['h'] and set(st['h']) == set(stats.STATS_KEYS)
    assert (st['h']['dominant_dim'], st['h']['peak_layer']) == (CH, EMERGE)
    assert st['h']['top_channel'] == p['top_channel'] == [6, CH, CH, CH]
    for key in ('start_mass', 'start_mass_dominant', 'top1_median', 'n_massive'):
        assert st['h'][key] == pytest.approx(p[key], rel=1e-5), key


def test_attention_alpha1_and_sink_rate_by_hand():
    model = planted_model()
    x, y = windows()
    r, _ = measure.measure(model, x, y)
    a = r['attention']
    uniform = lambda t: sum(1 / (i + 1) for i in range(t)) / t      # mean_t 1/(t+1)
    assert a['T'] == T and a['prefix_T'] == 64 and a['epsilon'] == 0.3
    for l in range(2):
        assert a['alpha1'][l] == pytest.approx([uniform(T), 1.0], abs=1e-6)
        assert a['alpha1_prefix'][l] == pytest.approx([uniform(64), 1.0], abs=1e-6)
    assert a['sink1'] == 50.0 and a['sink1_prefix'] == 50.0
    assert a['sink_heads'] == [1, 1] and a['sink_heads_prefix'] == [1, 1]
    # sink rate from alpha_1 alone
    assert measure.sink_rate([[0.31, 0.3], [0.9, 0.0]]) == 50.0


def test_prefix_alpha1_equals_a_64_token_pass():
    """alpha_1 on the first 64 tokens comes from the full pass; causality makes it a 64-token pass."""
    model = random_model('ledger')
    x, y = windows()
    full, _ = measure.measure(model, x, y)
    short, _ = measure.measure(model, x[:, :64], y[:, :64])
    assert np.allclose(full['attention']['alpha1_prefix'], short['attention']['alpha1'], rtol=1e-5, atol=1e-7)
    assert full['attention']['sink1_prefix'] == short['attention']['sink1']


def test_interventions_change_only_their_targets():
    model = planted_model()
    x, y = windows()
    before = snapshot(model)
    r, obs = measure.measure(model, x, y, batch_size=3)
    tg = measure.intervention_targets(r, obs)
    assert not tg['fallback'] and tg['sublayer'] == EMERGE and tg['streams'] == ['h']
    assert tg['n_entries'] == N and tg['soften_k'] == 1
    plain = measure.Capture()
    model(x, observer=plain)
    target = torch.zeros(N, T, 16, dtype=torch.bool)
    target[:, POS, CH] = True
    # zero and mean: the stream after the emergence sublayer differs only at the massive entries
    for name, expect in (('zero', 0.0), ('mean', plain.streams['h'][EMERGE][:, POS, CH].mean().item())):
        cap = measure.Capture(tg[name][0])
        model(x, observer=cap)
        for s in range(EMERGE):
            assert torch.equal(cap.streams['h'][s], plain.streams['h'][s])
        changed = cap.streams['h'][EMERGE] != plain.streams['h'][EMERGE]
        assert not (changed & ~target).any()
        assert cap.streams['h'][EMERGE][:, POS, CH] == pytest.approx([expect] * N, rel=1e-6)
    # soften: the input of the emergence sublayer loses its largest channel at position 0 (channel 5)
    cap = measure.Capture(tg['soften'][0])
    model(x, observer=cap)
    changed = cap.inputs[EMERGE] != plain.inputs[EMERGE]
    assert changed.nonzero(as_tuple=True)[1].unique().tolist() == [0]
    assert changed.nonzero(as_tuple=True)[2].unique().tolist() == [5]
    assert torch.all(cap.inputs[EMERGE][:, 0, 5] == 0)
    assert torch.all(cap.streams['h'][EMERGE][:, POS, CH].abs() < 1e-3)   # nothing planted any more
    iv = measure.run_interventions(model, x, y, r, obs, batch_size=3)
    assert set(iv) == {'none', 'zero', 'mean', 'soften', 'quant8', 'quant4', 'w8a8', 'super_weight'}
    assert iv['none']['val_loss'] == r['val_loss']
    assert iv['mean']['val_loss'] == pytest.approx(r['val_loss'], abs=1e-4)
    assert iv['zero']['val_loss'] != r['val_loss'] and iv['soften']['val_loss'] != r['val_loss']
    assert iv['quant4']['val_loss'] != r['val_loss']
    assert_unchanged(model, before)


def test_interventions_fallback_on_a_ledger_without_massive_activations():
    model = random_model('ledger')
    x, y = windows(seed=3)
    before = snapshot(model)
    r, obs = measure.measure(model, x, y)
    tg = measure.intervention_targets(r, obs)
    assert tg['fallback'] and len(tg['streams']) == 1 and tg['streams'][0] in ('D', 'C')
    name, s = tg['streams'][0], tg['sublayer']
    assert s == int(np.argmax(r['streams'][name]['per_sublayer']['top1']))
    plain = measure.Capture()
    model(x, observer=plain)
    ref = plain.streams[name][s]
    flat = ref.abs().reshape(N, -1).argmax(1)
    target = torch.zeros_like(ref, dtype=torch.bool).reshape(N, -1)
    target[torch.arange(N), flat] = True
    target = target.view_as(ref)
    for kind in ('zero', 'mean'):
        cap = measure.Capture(tg[kind][0])
        model(x, observer=cap)
        changed = cap.streams[name][s] != ref
        assert not (changed & ~target).any()
        other = {'D': 'C', 'C': 'D'}[name]
        assert torch.equal(cap.streams[other][s], plain.streams[other][s])
        if kind == 'zero':
            assert torch.all(cap.streams[name][s][target] == 0)
        else:  # each entry becomes the mean of the targeted entries of its channel
            chans = flat % ref.size(-1)
            vals = ref[target]
            for c in chans.unique():
                sel = (chans == c)
                assert torch.allclose(cap.streams[name][s][target][sel], vals[sel].mean())
    measure.run_interventions(model, x, y, r, obs)
    assert_unchanged(model, before)


def test_fake_quantized_restores_weights_exactly():
    model = random_model('vanilla')
    before = snapshot(model)
    with measure.fake_quantized(model, 4):
        w = model.sublayers[1].fn.fc.weight
        assert not torch.equal(w, before['sublayers.1.fn.fc.weight'])
        scale = before['sublayers.1.fn.fc.weight'].abs().amax(1, keepdim=True) / 7
        assert torch.allclose(w / scale, (w / scale).round(), atol=1e-4)   # on the 4-bit grid
    assert_unchanged(model, before)
    with pytest.raises(ZeroDivisionError):
        with measure.fake_quantized(model, 8):
            1 / 0
    assert_unchanged(model, before)


def test_measure_overhead_returns_times():
    model = random_model('vanilla')
    x, _ = windows(2, 32)
    plain, instrumented = measure.measure_overhead(model, x, repeats=1)
    assert plain > 0 and instrumented > 0


# ----------------------------------------------------------------------------------------------
# The command line: JSON keys, PNGs, comparison table, errors


def test_cli_two_checkpoints_json_pngs_comparison(tmp_path, capsys, save_ckpt):
    root = val_shard(tmp_path / 'data')
    a = save_ckpt(planted_model(), tmp_path / 'vanilla' / 'ckpt.pt', root)
    b = save_ckpt(random_model('ledger'), tmp_path / 'ledger.pt', root)
    out = tmp_path / 'out'
    models = [planted_model(), random_model('ledger')]
    assert probe.main([a, b, '--out', str(out), '--num_seqs', '3', '--seq_len', str(T),
                       '--interventions', '--batch_size', '2']) == 0
    text = capsys.readouterr().out
    data = json.loads((out / 'probe.json').read_text())
    tree = documented_keys('probe.json')
    assert [k for k, _ in tree] == ['args', 'checkpoints[]', 'comparison', 'groups']
    check_keys(data, [node for node in tree if node[0] != 'groups'], 'probe.json')   # groups: tests/test_runs.py
    assert data['groups'] is None
    v, l = data['checkpoints']
    assert v['name'] == 'vanilla' and l['name'] == 'ledger'
    assert set(v['streams']) == {'h'} and set(l['streams']) == {'D', 'C', 'read'}
    assert v['data']['num_seqs'] == 3 and v['data']['seq_len'] == T and v['data']['source'] == 'val'
    assert len(v['sublayers']) == 4 and v['sublayers'][3] == dict(s=3, block=1, layer=2, kind='mlp')
    sm = v['streams']['h']['summary']
    assert (sm['emergence_sublayer'], sm['dominant_dim'], sm['largest_massive']['channel']) == (EMERGE, CH, CH)
    # the same windows for both checkpoints: same dataset, same seed
    assert v['data']['shards'] == l['data']['shards']
    assert data['comparison']['columns'] == ['vanilla', 'ledger']
    assert '=== comparison ===' in text and 'Sink_1' in text and 'interventions' in text
    assert 'block' in text and 'layer' in text
    for name in ('vanilla', 'ledger'):
        for kind in ('layerwise', 'tokens_channels', 'pos0_depth', 'alpha1'):
            png = out / f'{name}_{kind}.png'
            assert png.stat().st_size > 1000, png
    assert (out / 'overlay_top1_median.png').stat().st_size > 1000
    # probing leaves the checkpoint's weights as they were (the files are not touched either)
    for path, m in zip((a, b), models):
        sd = torch.load(path, weights_only=True)['model']
        for k, w in m.state_dict().items():
            assert torch.equal(sd[k], w), k


def test_short_windows_carry_a_sink_warning(tmp_path, capsys, save_ckpt):
    """Below T = 64 even uniform attention passes Gu et al.'s 0.3 (alpha_1 = H(T)/T, 0.457 at T = 5):
    the planted model's head 0 attends uniformly, and at T = 5 it counts as a sink head. The report
    warns and probe.json flags it; at T = 64 neither."""
    root = val_shard(tmp_path / 'data')
    path = save_ckpt(planted_model(), tmp_path / 'planted.pt', root)
    assert probe.main([path, '--out', str(tmp_path / 'o5'), '--num_seqs', '2', '--seq_len', '5']) == 0
    text = capsys.readouterr().out
    a = json.loads((tmp_path / 'o5' / 'probe.json').read_text())['checkpoints'][0]['attention']
    assert a['prefix_T'] == a['T'] == 5 and a['short_T'] is True
    assert a['uniform_alpha1'] == a['uniform_alpha1_prefix'] == pytest.approx((1 + 1/2 + 1/3 + 1/4 + 1/5) / 5)
    assert a['alpha1'][0] == pytest.approx([a['uniform_alpha1'], 1.0], abs=1e-6)   # head 0 only attends uniformly ...
    assert a['sink1_prefix'] == a['sink1'] == 100.0                               # ... and counts as a sink
    assert ("warning: T=5 < 64: alpha_1 and Sink_1 are not comparable with Gu et al.'s (T=64); uniform causal "
            "attention alone gives alpha_1 = 0.457 at T=5 (above epsilon 0.3; above it up to T=9)") in text
    assert measure.uniform_alpha1(9) > 0.3 > measure.uniform_alpha1(10)
    assert probe.main([path, '--out', str(tmp_path / 'o64'), '--num_seqs', '2', '--seq_len', '64']) == 0
    assert 'warning: T=' not in capsys.readouterr().out
    a = json.loads((tmp_path / 'o64' / 'probe.json').read_text())['checkpoints'][0]['attention']
    assert a['short_T'] is False and a['sink1_prefix'] == 50.0


def test_one_length_when_the_prefix_is_the_whole_window(tmp_path, capsys, save_ckpt):
    """At T = 64 the prefix is the whole window: the report gives Sink_1 and the alpha_1 columns once and
    the figure draws one panel (two at T = 96); on every colour bar 'eps 0.3' is a tick label of its own,
    with no other tick label within 8 % of the bar."""
    from lab import plots
    root = val_shard(tmp_path / 'data')
    path = save_ckpt(planted_model(), tmp_path / 'planted.pt', root)
    for t, panels in ((64, 1), (96, 2)):
        assert probe.main([path, '--out', str(tmp_path / f'o{t}'), '--num_seqs', '2', '--seq_len', str(t)]) == 0
        text = capsys.readouterr().out
        a = json.loads((tmp_path / f'o{t}' / 'probe.json').read_text())['checkpoints'][0]['attention']
        if t == 64:
            assert 'Sink_1 = 50.0% at T=64 (epsilon 0.3)' in text and '% at T=64, ' not in text
            assert text.count('a1_mean@64') == 1 and '(epsilon); T=64\n' in text
        else:
            assert 'Sink_1 = 50.0% at T=64, 50.0% at T=96 (epsilon 0.3)' in text
        fig = plots._alpha1_figure(plots._pyplot(), a, 'p')
        heatmaps = [ax for ax in fig.axes if ax.images]
        bars = [ax for ax in fig.axes if ax not in heatmaps]
        assert len(heatmaps) == len(bars) == panels
        for bar in bars:
            ticks = {lab.get_text(): y for lab, y in zip(bar.get_yticklabels(), bar.get_yticks())}
            assert ticks['eps 0.3'] == pytest.approx(0.3)
            assert all(abs(y - 0.3) > 0.08 * bar.get_ylim()[1] for k, y in ticks.items() if k != 'eps 0.3')


def test_conditional_sink_table_has_a_head_header():
    from lab.report import conditional_lines
    cs = dict(other=[[0.9, 0.1, 0.2], [0.05, 0.6, 0.7]], trigger=[[0.0, 0.3, 0.1], [0.2, 0.05, 0.5]], n_other=10,
              n_trigger=3, heads=[[0, 0], [1, 1]], thresholds=dict(other=0.5, trigger=0.1), max_gap=0.9,
              max_gap_head=[0, 0])
    lines = conditional_lines(dict(conditional=cs))
    header, rows = lines[2], lines[3:5]
    assert header.split()[:5] == ['blk', 'layer', 'head', '0', 'head'] and header.count('head ') == 3
    for h in range(3):                       # each header stands over its column's cells (11 wide, one space apart)
        col = slice(12 + 12 * h, 23 + 12 * h)
        assert header[col].strip() == f'head {h}'
        assert [row[col].strip() for row in rows] == [f"{cs['other'][l][h]:.2f}/{cs['trigger'][l][h]:.2f}"
                                                      + ('*' if [l, h] in cs['heads'] else '') for l in range(2)]


def test_the_report_names_its_two_peaks(tmp_path, capsys, save_ckpt):
    """top1/median peaks where one entry stands out most from the median; peak_layer is where the
    dominant channel's mean |x| peaks. When they differ the report says they measure different things."""
    root = val_shard(tmp_path / 'data')
    path = save_ckpt(random_model('ledger'), tmp_path / 'ledger.pt', root)
    assert probe.main([path, '--out', str(tmp_path / 'o'), '--num_seqs', '2', '--seq_len', '32']) == 0
    text = capsys.readouterr().out
    streams = json.loads((tmp_path / 'o' / 'probe.json').read_text())['checkpoints'][0]['streams']
    differ = {n: st['summary'] for n, st in streams.items()
              if st['summary']['max_top1_median_sublayer'] != st['summary']['peak_layer']}
    assert differ, "no stream whose two peaks differ: the test shows nothing"
    for sm in differ.values():
        assert (f"two peaks, two measures: top1/median (one token's largest |x| against the median) peaks at "
                f"s={sm['max_top1_median_sublayer']}; peak_layer s={sm['peak_layer']} is where dominant_dim's mean "
                f"|x| over all tokens peaks") in text


def test_cli_text_prompts(tmp_path, capsys, save_ckpt):
    model = random_model('vanilla', vocab=50257, d=16)
    path = save_ckpt(model, tmp_path / 'tiny.pt', str(tmp_path / 'nowhere'))
    out = tmp_path / 'out'
    assert probe.main([path, '--out', str(out), '--text', 'Hello world, this is a longer prompt.',
                       '--text', '<|endoftext|>Hello world']) == 0
    data = json.loads((out / 'probe.json').read_text())['checkpoints'][0]['data']
    assert [l for l in capsys.readouterr().out.splitlines() if l.startswith('data:')] == [
        'data: 2 --text prompt(s), T=3 (prompt lengths [9, 3], truncated to the shortest)']
    assert data['source'] == 'text' and data['seq_len'] == 3 and data['num_seqs'] == 2
    assert data['bos_at_pos0'] == 0.5 and data['bos'] == 50256 and data['task'] is None
    x, y, _ = probe.text_windows(['Hello world'], 100)
    assert x.tolist() == [[15496, 995]] and y.tolist() == [[995, -1]]


def test_cli_errors_are_one_line(tmp_path, cli, one_line_error, save_ckpt):
    good = save_ckpt(random_model('vanilla'), tmp_path / 'good.pt', str(tmp_path / 'empty_root'))
    raw = open(good, 'rb').read()
    (tmp_path / 'trunc.pt').write_bytes(raw[:len(raw) // 2])
    (tmp_path / 'notes.pt').write_text('not a checkpoint\n')
    torch.save([1, 2, 3], tmp_path / 'list.pt')
    cases = [str(tmp_path / 'missing.pt'), str(tmp_path / 'trunc.pt'), str(tmp_path / 'notes.pt'),
             str(tmp_path / 'list.pt'), good]          # the last: its dataset is not on disk
    for path in cases:
        res = cli('probe.py', path, '--out', tmp_path / 'out')
        assert res.returncode == 2, path
        one_line_error(res.stderr, 'probe.py')
    assert 'prepare.py' in res.stderr                   # the dataset error names the fix


def test_seq_len_longer_than_block_size_is_an_error(tmp_path, capsys, save_ckpt):
    path = save_ckpt(random_model('vanilla'), tmp_path / 'm.pt', val_shard(tmp_path / 'data'))
    assert probe.main([path, '--seq_len', '1000', '--out', str(tmp_path / 'o')]) == 2
    assert 'block_size' in capsys.readouterr().err


def test_data_root_finds_the_dataset_of_a_checkpoint_that_records_none(tmp_path, capsys, save_ckpt):
    """A checkpoint whose config has no data_root (trained with the default data/) is probed on the
    dataset under --data_root, as GPT-2's built-in corpus is."""
    root = val_shard(tmp_path / 'data')
    path = save_ckpt(random_model('vanilla'), tmp_path / 'm.pt', root)
    ckpt = torch.load(path, weights_only=True)
    ckpt['config']['data_root'] = None
    torch.save(ckpt, path)
    assert probe.main([path, '--out', str(tmp_path / 'o'), '--num_seqs', '2', '--seq_len', '32',
                       '--data_root', root]) == 0
    r = json.loads((tmp_path / 'o' / 'probe.json').read_text())['checkpoints'][0]
    assert r['data']['shards'] == [os.path.join(root, 'builtin', 'builtin_val_000000.bin')]
