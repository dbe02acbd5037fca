"""What the probe measures beyond the census (issue 30): activation quantisation (W8A8) and the fp16
headroom, super weights, and what a sink head does; each against a computation by hand on tiny CPU
models whose answer is known by construction. Also: float64 models run an observed forward."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lab import measure, stats
from lab.report import report
from model import GPT, GPTConfig

V, T = 256, 48
ROW, COL, POS_CH = 7, 11, 5     # the planted super weight W[ROW, COL] of block 0's MLP; channel 5 marks position 0


def tokens(n=4, t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, t), generator=g)


def random_model(scale=5.0, seed=0, **kw):
    """A 2-layer vanilla model whose matrices are `scale` x the usual init, so that its logits depend on
    what every sublayer computes (at the usual 0.02 the loss is ln V whatever happens inside)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=V, **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return m


def plant_super_weight(m, weight=30.0):
    """Channel POS_CH is 10 at position 0 and 0 everywhere else (position embedding; nothing writes it).
    Hidden unit COL of block 0's MLP is GELU(100 u5 - 100): ~450 at position 0, 0 elsewhere, and only
    W[ROW, COL] = weight reads it: the down-projection writes ~450 x weight into channel ROW at position
    0 (Yu et al.'s super activation), which the residual stream carries on."""
    with torch.no_grad():
        m.wte.weight[:, POS_CH] = 0
        m.wpe.weight[:, POS_CH] = 0
        m.wpe.weight[0, POS_CH] = 10
        for sub in m.sublayers:
            sub.fn.proj.weight[POS_CH] = 0
        mlp = m.sublayers[1].fn
        mlp.fc.weight[COL] = 0
        mlp.fc.weight[COL, POS_CH], mlp.fc.bias[COL] = 100, -100
        mlp.proj.weight[:, COL] = 0
        mlp.proj.weight[ROW, COL] = weight
    return m


def own_targets(m, x):
    """The model's own argmax: its loss is low, and whatever damages its computation raises it."""
    with torch.no_grad():
        return m(x)[0].argmax(-1)


def by_hand_quantize(a, bits):
    """numpy: one scale per row of a 2-D array, round half to even (as torch.round), clamp."""
    q = 2 ** (bits - 1) - 1
    scale = np.abs(a).max(axis=1, keepdims=True) / q
    return np.clip(np.round(a / scale), -q, q) * scale

# ----------------------------------------------------------------------------------------------
# W8A8 and fp16


def test_fake_quantiser_equals_a_computation_by_hand():
    x = torch.tensor([[[0.5, -1.0, 0.003], [2.0, -0.2, 0.7]],
                      [[100.0, 0.01, -0.6], [0.3, 0.02, -0.01]]])                 # (B=2, T=2, d=3)
    want = by_hand_quantize(x.reshape(2, -1).numpy().astype(np.float64), 8).reshape(2, 2, 3)
    got = measure.fake_quantize(x.reshape(2, -1), 8, dim=1).reshape(2, 2, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    assert got[1, 1].abs().sum() == 0 and got[0, 0, 2] == 0                        # under half a step: zeroed
    # the Linear's input, one scale per sequence: by hand, for a 3-D input and for the (B*T, d) layout
    lin = nn.Linear(3, 2)
    act = measure.QuantizedInputs(8)
    with torch.no_grad(), act.applied(lin):
        y3 = lin(x)
        act.begin_batch(0, 2)
        y2 = lin(x.reshape(4, 3))
    want_y = torch.from_numpy(want).float() @ lin.weight.detach().T + lin.bias.detach()
    torch.testing.assert_close(y3, want_y)
    torch.testing.assert_close(y2, want_y.reshape(4, 2))
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))     # hooks gone after the block
    # weights: per output channel (rows), 4 bits
    w = torch.randn(5, 7)
    np.testing.assert_allclose(measure.fake_quantize(w, 4, dim=1).numpy(), by_hand_quantize(w.double().numpy(), 4),
                               rtol=1e-6, atol=1e-7)


def test_w8a8_hurts_only_with_an_outlier_at_a_linear_input():
    """Without outliers W8A8 changes the loss little; a super activation (~450 at one hidden unit of
    position 0) sets every sequence's scale at the down-projection to ~3.5, which zeroes the rest."""
    x = tokens()
    deltas = {}
    for planted in (False, True):
        m = random_model()
        if planted:
            plant_super_weight(m)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        y = own_targets(m, x)
        r, obs = measure.measure(m, x, y)
        iv = measure.run_interventions(m, x, y, r, obs)
        deltas[planted] = iv['w8a8']['delta_loss']
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        assert iv['w8a8']['target'].startswith('quant8, and')
    assert abs(deltas[False]) < 0.01
    assert deltas[True] > 0.3


def test_w8a8_does_not_depend_on_the_batch_size():
    m = plant_super_weight(random_model())
    x = tokens(n=5)
    y = own_targets(m, x)
    losses = []
    for bs in (1, 2, 5):
        act = measure.QuantizedInputs(8)
        obs = measure.Measure(streams=False, attention=False, edit=act)
        with measure.w8a8(m, act):
            loss, count, _, _ = measure.run_passes(m, x, y, obs, batch_size=bs)
        losses.append(loss / count)
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)


def test_fp16_headroom_is_the_largest_entry_of_every_stream():
    for residual, weight in (('vanilla', 30.0), ('ledger', 30.0), ('vanilla', 300.0)):
        m = random_model(residual=residual)
        if residual == 'vanilla':
            plant_super_weight(m, weight)
        x = tokens()
        r, _ = measure.measure(m, x)
        cap = measure.Capture()
        with torch.no_grad():
            m(x, observer=cap)
        top = max((float(t.abs().max()), name, s) for name, by_s in cap.streams.items() for s, t in by_s.items())
        f = r['fp16']
        assert f['max_abs'] == pytest.approx(top[0], rel=1e-6) and (f['stream'], f['sublayer']) == top[1:]
        assert f['fp16_max'] == 65504.0 and f['headroom'] == pytest.approx(65504.0 / top[0], rel=1e-6)
        if weight == 300.0:     # ~135,000 at position 0: above float16's range
            assert f['headroom'] < 1 and (f['position'], f['channel']) == (0, ROW)
            assert 'OVERFLOWS float16' in report_of(m, x)

# ----------------------------------------------------------------------------------------------
# Super weights


def test_a_planted_super_weight_is_found_exactly_and_zeroing_it_removes_the_outlier():
    m = plant_super_weight(random_model())
    x = tokens()
    y = own_targets(m, x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r, obs = measure.measure(m, x, y, batch_size=3)
    sw = r['super_weight']
    assert sw['note'] is None and [c['sublayer'] for c in sw['candidates']] == [1, 3]
    c = sw['chosen']
    assert (c['sublayer'], c['row'], c['column'], c['position'], c['weight']) == (1, ROW, COL, 0, 30.0)
    # by hand: the down-projection's input and output of block 0's MLP
    with torch.no_grad():
        mlp = m.sublayers[1].fn
        cap = measure.Capture()
        m(x, observer=cap)
        hidden = F.gelu(mlp.fc(cap.inputs[1]))
        out = mlp.proj(hidden)
    b, t, i = np.unravel_index(int(out.abs().argmax()), out.shape)
    assert (t, i) == (0, ROW) and int(hidden[b, t].abs().argmax()) == COL
    assert c['out_abs'] == pytest.approx(float(out.abs().max()), rel=1e-5)
    assert c['in_abs'] == pytest.approx(float(hidden.abs().max()), rel=1e-5) == c['in_max']
    # zeroing that one weight removes the outlier from the stream, and the weight comes back
    iv = measure.run_interventions(m, x, y, r, obs, batch_size=3)
    o0, o1 = iv['none']['outlier'], iv['super_weight']['outlier']
    assert o0['stream'] == o1['stream'] == 'h'
    assert o0['max_abs'] == pytest.approx(r['fp16']['max_abs']) and o0['max_abs'] > 1e4
    assert o1['max_abs'] < 20 and o1['outlier_ratio'] < o0['outlier_ratio'] / 100
    assert o1['down_out_abs'] < 20 and o0['down_out_abs'] == c['out_abs']
    assert iv['super_weight']['delta_loss'] > 0.01
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert iv['quant8']['outlier'] is None


def test_the_chosen_candidate_comes_before_the_stream_peak():
    """A later MLP that writes a larger entry after the decoded stream's top1 peak (as the last layers that
    cancel a massive activation do) is a candidate, but not the chosen one."""
    m = plant_super_weight(random_model())
    with torch.no_grad():       # channel ROW: the super activation at position 0, exactly 0 elsewhere ...
        m.wte.weight[:, ROW] = 0
        m.wpe.weight[:, ROW] = 0
        for s in (0, 2):
            m.sublayers[s].fn.proj.weight[ROW] = 0
        m.sublayers[1].fn.proj.weight[ROW, :COL] = 0
        m.sublayers[1].fn.proj.weight[ROW, COL + 1:] = 0
        mlp = m.sublayers[3].fn  # ... and block 1's MLP, reading it, writes -40 x ~450 there: below the stream's peak
        mlp.fc.weight[COL] = 0
        mlp.fc.weight[COL, ROW], mlp.fc.bias[COL] = 100, -100
        mlp.proj.weight[:, COL] = 0
        mlp.proj.weight[ROW, COL] = -40.0
    r, _ = measure.measure(m, tokens())
    sw = r['super_weight']
    by_s = {c['sublayer']: c for c in sw['candidates']}
    assert by_s[3]['out_abs'] > by_s[1]['out_abs'] and sw['peak_sublayer'] < 3
    assert sw['chosen']['sublayer'] == 1

# ----------------------------------------------------------------------------------------------
# What a sink head does


def test_effective_rank_by_hand():
    g = np.random.default_rng(0)
    u, v = g.standard_normal((20, 1)), g.standard_normal((1, 6))
    ortho = np.linalg.qr(g.standard_normal((20, 6)))[0] * 3.0
    rand = g.standard_normal((5, 20, 6))
    got = stats.effective_rank(torch.from_numpy(np.stack([u @ v, ortho, np.zeros((20, 6))])))
    assert got.tolist() == pytest.approx([1.0, 6.0, 0.0], abs=1e-5)
    s = np.linalg.svd(rand, compute_uv=False)
    p = s / s.sum(-1, keepdims=True)
    want = np.exp(-(p * np.log(p)).sum(-1))
    np.testing.assert_allclose(stats.effective_rank(torch.from_numpy(rand)).numpy(), want, rtol=1e-5)
    assert stats.sink_kind(0.1, 1.0) == 'no-op' and stats.sink_kind(0.5, 1.5) == 'broadcast'
    assert stats.sink_kind(0.5, 2.5) == 'mixed'
    assert (stats.NOOP_V0, stats.BROADCAST_RANK) == (0.3, 2.0)


def sink_model():
    """1 layer, 3 heads of 8. Heads 0 and 1 put every query's weight on key 0 (q = 100 u6, k = 100 u5,
    u5 nonzero at position 0 only); head 0's v reads channel 7, which is 0 at position 0 and 1 elsewhere,
    so v_0 = 0: a no-op sink; head 1 fetches v_0, a random vector, at every position: a broadcast sink.
    Head 2 has q = 0: uniform causal attention, a sink by alpha_1 at T = 6 only (H(6)/6 = 0.41)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=3, n_embd=24, block_size=16, vocab_size=V)).eval()
    d = 24
    with torch.no_grad():
        m.wte.weight[:, [5, 6, 7]] = 0
        m.wpe.weight[:, [5, 6, 7]] = 0
        m.wpe.weight[0, 5] = 10
        m.wpe.weight[:, 6] = 1
        m.wpe.weight[1:, 7] = 1
        W = m.sublayers[0].fn.qkv.weight
        W[:d] = 0
        W[d:2 * d] = 0
        for h in (0, 1):
            W[8 * h, 6] = 100
            W[d + 8 * h, 5] = 100
        W[2 * d:2 * d + 8] = 0
        W[2 * d:2 * d + 8, 7] = 1
    return m


class Heads(measure.Capture):
    attention = True

    def on_attention(self, layer, q, k, v, att, extra=None, visible0=None):
        self.qkv = (v.detach().clone(), att.detach().clone())


def test_sink_kinds_against_a_computation_by_hand():
    m = sink_model()
    x = tokens(n=3, t=6)
    r, _ = measure.measure(m, x)
    a = r['attention']
    rec = Heads()
    with torch.no_grad():
        m(x, observer=rec)
    v, att = (t.double().numpy() for t in rec.qkv)
    out = att @ v                                                             # (B, H, T, hd): each head's output
    s = np.linalg.svd(out, compute_uv=False)
    p = s / np.maximum(s.sum(-1, keepdims=True), 1e-300)
    erank = np.where(s.sum(-1) > 0, np.exp(-(p * np.log(np.where(p > 0, p, 1))).sum(-1)), 0.0).mean(0)
    vn = np.linalg.norm(v, axis=-1)
    v0 = (vn[..., 0] / vn.mean(-1)).mean(0)
    np.testing.assert_allclose(a['erank'][0], erank, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a['v0_ratio_head'][0], v0, rtol=1e-5, atol=1e-7)
    assert a['erank'][0][:2] == pytest.approx([0.0, 1.0], abs=1e-4)
    heads = a['sink_kinds']['heads']
    assert [(h['layer'], h['head'], h['kind']) for h in heads] == [(0, 0, 'no-op'), (0, 1, 'broadcast'), (0, 2, 'mixed')]
    assert a['sink_kinds']['thresholds'] == dict(v0_ratio=0.3, erank=2.0)
    text = report_of(m, x)
    assert 'sink heads at T=6, what they do' in text and 'broadcast' in text and 'no-op' in text


def report_of(m, x):
    """The text report of measure()'s result, with what probe.py adds around it."""
    r, _ = measure.measure(m, x)
    r.update(name='m', path='-', iter_num=0, tokens=None, weights=None, model_args=dict(vars(m.config)),
             params=m.num_params(), device='cpu', interventions=None,
             data=dict(source='val', dataset='d', num_seqs=x.size(0), seq_len=x.size(1), seed=0, doc_aligned=False,
                       bos=0, bos_at_pos0=0.0, task=None))
    return report(r)

# ----------------------------------------------------------------------------------------------
# float64 models


@pytest.mark.parametrize('softmax', ['softmax', 'clipped', 'sigmoid', 'relu'])
def test_a_float64_model_runs_observed_and_matches_float32(softmax):
    """model.Attention.explicit returns the model's dtype: a float64 model runs every observed forward
    (lab.measure.measure: explicit attention, every observer hook) and the explicit weightings."""
    torch.manual_seed(0)
    m32 = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=V, attn_softmax=softmax)).eval()
    m64 = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=V, attn_softmax=softmax)).eval()
    m64.load_state_dict(m32.state_dict())
    m64.double()
    x = tokens(n=2, t=20)
    y = torch.roll(x, -1, 1)
    with torch.no_grad():
        l32, l64 = m32(x)[0], m64(x)[0]
    assert l64.dtype == torch.float64
    torch.testing.assert_close(l64.float(), l32, rtol=1e-4, atol=1e-5)
    r32, _ = measure.measure(m32, x, y)
    r64, _ = measure.measure(m64, x, y)
    assert r64['val_loss'] == pytest.approx(r32['val_loss'], rel=1e-5)
    np.testing.assert_allclose(r64['attention']['alpha1'], r32['attention']['alpha1'], rtol=1e-4, atol=1e-6)
    assert r64['fp16']['max_abs'] == pytest.approx(r32['fp16']['max_abs'], rel=1e-4)
    assert r64['super_weight']['chosen']['sublayer'] == r32['super_weight']['chosen']['sublayer']
