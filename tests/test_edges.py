"""Values at the edges, where a one-line bug would hide.

The other test files mostly use values far from every threshold (planted activations of 300-1,000,
sink heads near 1.0 and 0.0, queries q = 0 on which relu(0) = 0 whatever it is divided by, clipped
softmax at gamma = 0, zeta = 1 where it is softmax). A `>` written for `>=`, a wrong constant, the
wrong n or the wrong tie rule changes nothing there. Here every threshold the results depend on is
tested just below, exactly at and just above its edge (math.nextafter / np.nextafter: the nearest
floats), with the strictness docs/reference.md defines, and every formula is compared, on generic
inputs (random non-zero scores, several gamma, zeta and n), with an independent computation written
here from the formula in docs/reference.md:

- stats.py (§4.2-§4.5): the census `|x| > 100 and |x| >= 1000 x median` (lower median, per
  sequence), n_out50 (`>= 50 x` the token's median), top1/2/3, median, kurtosis (scipy), start_mass
  and start_mass_dominant;
- lab/measure.py (§4.6): Sink_1's `alpha_1 > 0.3`, the conditional sink's `other >= 0.5` and
  `trigger <= 0.1`, and the per-kind means behind them;
- model.py (§1.6): the weighting (lab.weightings.WEIGHTINGS) of every attn_softmax against float64 formulas, with a
  causal mask, slot columns and arbitrary masks, then the whole attention sublayer of GPT by hand;
- lab/data.py (§3.5, §2.3): the trigger generator (answers, ties to the smallest id, p, BOS) against
  a re-implementation, and Sampler windows with a document boundary at the first and last token of
  a shard;
- lab/trajectories.py and lab/groups.py (§5): first crossings of 10/100/1000, Holm, the exact permutation p and its floor,
  Hedges' g and Welch.

Everything is small: the file runs in a few seconds.
"""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lab import groups, measure, stats, trajectories
from lab.data import TRIGGER_BOS, Sampler, trigger_block, trigger_block_docs, trigger_documents, write_shard
from lab.weightings import WEIGHTINGS
from model import GPT, GPTConfig, Observer, attention_mask


def below(x):
    """The largest float32 below x (x a float32 value)."""
    return float(np.nextafter(np.float32(x), np.float32(-np.inf)))


def above(x):
    """The smallest float32 above x."""
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


# ----------------------------------------------------------------------------------------------
# stats.py: the census, n_out50 and the per-sublayer statistics (docs/reference.md §4.2-§4.5)

def census(x):
    """n_massive of one (N, T, d) tensor, through both entry points."""
    acc = stats.SublayerAccumulator()
    entries = acc.add(torch.as_tensor(x, dtype=torch.float32))
    n = acc.result()['n_massive']
    assert stats.sublayer_stats(torch.as_tensor(x, dtype=torch.float32))['n_massive'] == n
    assert (entries is None and n == 0) or len(entries[0]) == n
    return n


def background(N=1, T=8, d=8, value=0.001):
    return np.full((N, T, d), value, dtype=np.float32)


def test_constants_are_the_documented_ones():
    assert (stats.MASSIVE_ABS, stats.MASSIVE_REL, stats.OUTLIER_REL) == (100.0, 1000.0, 50.0)
    assert (stats.SINK_EPS, stats.SINK_T, stats.COND_OTHER, stats.COND_TRIGGER) == (0.3, 64, 0.5, 0.1)


@pytest.mark.parametrize('value, massive', [
    (100.0, False),                 # |x| > 100 is strict
    (above(100.0), True),
    (below(100.0), False),
    (-above(100.0), True),          # |x|
    (-100.0, False),
    (99.0, False), (50.0, False), (10.5, False), (10.0, False),   # between 10 and 100: huge ratio, not massive
])
def test_census_absolute_edge(value, massive):
    """Median 0.001: every entry has a ratio of at least 1e4, so only the absolute 100 decides; the
    entry is the largest of its sequence (the early return on top1 <= 100 is at the edge too)."""
    x = background()
    x[0, 3, 5] = value
    assert census(x) == int(massive)


def test_census_absolute_edge_with_several_entries():
    x = background(N=2)
    x[0, 0, 0], x[0, 1, 1], x[0, 2, 2], x[0, 3, 3] = above(100.0), 100.0, below(100.0), 1e4
    x[1, 0, 0], x[1, 5, 5] = 100.0, 99.99
    assert census(x) == 2


# median 0.125 exactly (a power of two): 1000 x median = 125.0 exactly in float32
@pytest.mark.parametrize('value, massive', [
    (125.0, True),                  # |x| >= 1000 x median is not strict
    (below(125.0), False),
    (above(125.0), True),
    (-125.0, True),
    (110.0, False),                 # above 100 but only 880 x the median
    (300.0, True),
])
def test_census_relative_edge(value, massive):
    x = background(value=0.125)
    x[0, 6, 1] = value
    assert census(x) == int(massive)


def test_census_uses_each_sequences_lower_median():
    """Sequence 0: 32 entries 0.125, 31 entries 0.25 and the planted 150: its lower median is 0.125
    (1000x = 125 <= 150, massive), its upper median 0.25 and their mean 0.1875 would not make it
    massive. Sequence 1 has the same 150 on a median of 0.25: not massive (the median is per sequence,
    not over the batch)."""
    x = np.empty((2, 8, 8), dtype=np.float32)
    flat = x[0].reshape(-1)
    flat[:32], flat[32:], flat[40] = 0.125, 0.25, 150.0
    x[1] = 0.25
    x[1, 4, 4] = 150.0
    assert float(torch.from_numpy(x[0]).abs().reshape(-1).median()) == 0.125
    assert census(x) == 1
    st = stats.sublayer_stats(torch.from_numpy(x))
    assert st['max_entry'] == dict(seq=0, position=5, channel=0, value=150.0)


def test_n_out50_edge_on_each_tokens_lower_median():
    """n_out50: per token, channels with |x| >= 50 x that token's (lower) median, averaged over tokens."""
    x = np.ones((1, 4, 8), dtype=np.float32)
    x[0, 0] = [1, 1, 1, 1, 1, 50.0, below(50.0), -51.0]       # median 1: 50 and 51 count, 49.99.. not
    x[0, 1] = [2, 2, 2, 2, 2, 100.0, below(100.0), 2]          # median 2: the token's own, not the sequence's
    x[0, 2] = [1, 1, 1, 1, 2, 2, 2, 75.0]                      # lower median 1 (upper 2 would not count 75)
    x[0, 3] = 1                                                # nothing
    st = stats.sublayer_stats(torch.from_numpy(x))
    assert st['n_out50'] == (2 + 1 + 1 + 0) / 4


def random_streams(seed=0, N=3, T=6, d=10):
    """Generic activations: signed, every sequence and channel on its own scale, a few outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, d, generator=g) * torch.rand(N, 1, d, generator=g).mul(3).add(0.1)
    x *= torch.tensor([1.0, 7.0, 0.3])[:N].view(N, 1, 1)
    x[0, 2, 3] = 40.0
    return x


def test_profile_start_mass_and_kurtosis_by_hand():
    from scipy.stats import kurtosis
    x = random_streams()
    a = x.double().abs().numpy()
    N, T, d = a.shape
    st = stats.sublayer_stats(x)
    per_seq = np.sort(a.reshape(N, -1), axis=1)[:, ::-1]
    lower = np.sort(a.reshape(N, -1), axis=1)[:, (T * d - 1) // 2]        # T*d even: the lower median
    for k, key in enumerate(('top1', 'top2', 'top3')):
        assert st[key] == pytest.approx(per_seq[:, k].mean(), rel=1e-6)
    assert st['median'] == pytest.approx(lower.mean(), rel=1e-6)
    assert st['top1_median'] == pytest.approx(per_seq[:, 0].mean() / lower.mean(), rel=1e-6)
    kurt = kurtosis(x.double().numpy(), axis=-1, fisher=True, bias=True)     # per token
    assert st['kurtosis'] == pytest.approx(kurt.mean(), rel=1e-5)
    start = (a[:, 0, :].sum(-1) / a.sum(axis=(1, 2))).mean()               # per sequence, then averaged
    assert st['start_mass'] == pytest.approx(start, rel=1e-6)
    chan = a.sum(axis=(0, 1))
    top = int(chan.argmax())
    assert st['top_channel'] == top
    assert st['start_mass_dominant'] == pytest.approx((a[:, 0, top] / a[:, :, top].sum(1)).mean(), rel=1e-6)
    assert st['feat_maxmed'] == pytest.approx(chan.max() / np.sort(chan)[(d - 1) // 2], rel=1e-6)
    # averaged ratios and ratios of sums differ here, so the test tells them apart
    assert abs(start - a[:, 0, :].sum() / a.sum()) > 1e-3
    # the dominant channel's start mass on a channel given from outside (activation_stats' dominant_dim)
    acc = stats.SublayerAccumulator()
    acc.add(x)
    other = (top + 1) % d
    assert acc.result(channel=other)['start_mass_dominant'] == pytest.approx(
        (a[:, 0, other] / a[:, :, other].sum(1)).mean(), rel=1e-6)


def test_statistics_accumulate_over_batches():
    """Two batches added one after the other give the statistics of the whole set."""
    x = random_streams(seed=1, N=3)
    acc = stats.SublayerAccumulator()
    acc.add(x[:1])
    acc.add(x[1:], offset=1)
    whole = stats.sublayer_stats(x)
    for key, v in acc.result().items():
        assert v == pytest.approx(whole[key], rel=1e-6), key


# ----------------------------------------------------------------------------------------------
# lab/measure.py: Sink_1 and the conditional sink (docs/reference.md §4.6)

def test_sink_rate_edge():
    """alpha_1 > 0.3, strict; alpha_1 as lab/measure.py has it (float64 sums, Python floats)."""
    eps = 0.3
    alpha1 = [[eps, math.nextafter(eps, 1.0), math.nextafter(eps, 0.0)], [0.31, 0.29, 1.0]]
    assert measure.sink_rate(alpha1) == pytest.approx(100.0 * 3 / 6)
    assert measure.sink_rate([[eps]]) == 0.0 and measure.sink_rate([[math.nextafter(eps, 1.0)]]) == 100.0


def summary_obs(alpha1, prefix=None, sink=None, n_queries=None):
    """A stand-in for a Measure after one sequence: its attention sums are the values themselves."""
    L = len(alpha1)
    att = {}
    for l in range(L):
        att[l] = dict(alpha1=torch.tensor(alpha1[l], dtype=torch.float64),
                      alpha1_prefix=torch.tensor((prefix or alpha1)[l], dtype=torch.float64),
                      k0=torch.tensor(1.0, dtype=torch.float64), v0=torch.tensor(1.0, dtype=torch.float64),
                      cos_qk0=torch.tensor(0.0, dtype=torch.float64))
        for kind, values in (sink or {}).items():
            att[l][f'sink_{kind}'] = torch.tensor(values[l], dtype=torch.float64)
    return SimpleNamespace(n_seq=1, att=att, nothing={}, n_queries=n_queries or {'trigger': 0, 'other': 0})


def test_sink_heads_per_layer_at_the_edge():
    eps = 0.3
    alpha1 = [[eps, math.nextafter(eps, 1.0)], [math.nextafter(eps, 0.0), 0.9]]
    prefix = [[0.2, 0.5], [eps, math.nextafter(eps, 1.0)]]
    s = measure.attention_summary(summary_obs(alpha1, prefix), 2)
    assert s['sink_heads'] == [1, 1] and s['sink1'] == 50.0
    assert s['sink_heads_prefix'] == [1, 1] and s['sink1_prefix'] == 50.0
    assert s['conditional'] is None


def test_uniform_alpha1_passes_the_threshold_up_to_T_9():
    assert all(measure.uniform_alpha1(T) > stats.SINK_EPS for T in range(1, 10))
    assert all(measure.uniform_alpha1(T) < stats.SINK_EPS for T in range(10, 70))
    assert measure.uniform_alpha1(64) == pytest.approx(sum(1 / t for t in range(1, 65)) / 64, rel=1e-12)


def test_conditional_sink_edges():
    """A conditional sink head: other >= 0.5 and trigger <= 0.1, both inclusive. The sums are the
    means here (one query of each kind)."""
    O, Tr = 0.5, 0.1
    other = [[O, math.nextafter(O, 0.0), math.nextafter(O, 1.0), 0.9]]
    trigger = [[Tr, 0.0, 0.05, math.nextafter(Tr, 1.0)]]
    obs = summary_obs([[0.0] * 4], sink=dict(other=other, trigger=trigger), n_queries={'trigger': 1, 'other': 1})
    c = measure.conditional_sink(obs, 1)
    assert c['heads'] == [[0, 0], [0, 2]]
    assert c['thresholds'] == dict(other=0.5, trigger=0.1)
    gaps = [o - t for o, t in zip(other[0], trigger[0])]
    assert c['max_gap'] == max(gaps) and c['max_gap_head'] == [0, int(np.argmax(gaps))]
    # inside on one side only
    for o, t in [(math.nextafter(O, 0.0), Tr), (O, math.nextafter(Tr, 1.0))]:
        obs = summary_obs([[0.0]], sink=dict(other=[[o]], trigger=[[t]]), n_queries={'trigger': 1, 'other': 1})
        assert measure.conditional_sink(obs, 1)['heads'] == []


def test_conditional_sink_means_by_query_kind_by_hand():
    """Measure on a random attention map: the mean of A[t, 0] over the trigger queries (input is a
    TRIGGER) and over the other queries after position 0, pooled over the batch."""
    B, H, T, hd = 3, 2, 10, 4
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(2, 6, (B, T), generator=g)
    toks[0, [2, 5]] = 1
    toks[1, 3] = 1
    toks[2, [1, 9]] = 1
    att = torch.rand(B, H, T, T, generator=g).tril()
    att = att / att.sum(-1, keepdim=True)
    q, k, v = (torch.randn(B, H, T, hd, generator=g) for _ in range(3))
    obs = measure.Measure(streams=False, attention=True, task={'trigger': 1})
    obs.begin_batch(0, B, toks)
    obs.on_attention(0, q, k, v, att)
    obs.end_batch()
    c = measure.conditional_sink(obs, 1)
    trig = toks == 1
    other = ~trig
    other[:, 0] = False
    a0 = att[..., 0].double()                                  # (B, H, T)
    for kind, m in (('trigger', trig), ('other', other)):
        want = [(a0[:, h][m]).mean().item() for h in range(H)]
        assert c[kind][0] == pytest.approx(want, rel=1e-6), kind
    assert (c['n_trigger'], c['n_other']) == (int(trig.sum()), int(other.sum()))
    s = measure.attention_summary(obs, 1)
    assert s['alpha1'][0] == pytest.approx(a0.mean(-1).mean(0).tolist(), rel=1e-6)
    assert s['alpha1_prefix'][0] == pytest.approx(a0.mean(-1).mean(0).tolist(), rel=1e-6)   # T < 64


# ----------------------------------------------------------------------------------------------
# model.py: the attention weightings (docs/reference.md §1.6)

def reference_weights(scores, mask, kind, gamma=0.0, zeta=1.0):
    """float64, one row at a time, from the formulas of docs/reference.md §1.6; 0 where masked."""
    s = scores.double().numpy()
    m = np.broadcast_to(mask.numpy(), s.shape)
    out = np.zeros_like(s)
    for idx in np.ndindex(*s.shape[:-1]):
        row, seen = s[idx], m[idx]
        n = int(seen.sum())
        vis = row[seen]
        if kind in ('softmax', 'plus_one', 'clipped'):
            e = np.exp(vis - vis.max())
            w = e / e.sum()
            if kind == 'clipped':
                w = np.clip((zeta - gamma) * w + gamma, 0.0, 1.0)
        elif kind == 'sigmoid':
            w = 1.0 / (1.0 + np.exp(-(vis - math.log(n))))
        elif kind == 'relu':
            w = np.maximum(vis, 0.0) / n
        out[idx][seen] = w
    return torch.from_numpy(out)


def attention_weights(scores, mask, kind='softmax', gamma=0.0, zeta=1.0):
    """The model's weighting of that kind (lab.weightings.WEIGHTINGS[kind]), built from a config as Attention builds it."""
    config = GPTConfig(n_layer=1, n_head=1, n_embd=8, attn_softmax=kind, clip_gamma=gamma, clip_zeta=zeta)
    return WEIGHTINGS[kind](config)(scores, mask)


def random_scores(shape, seed, scale=2.0):
    s = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    assert (s != 0).all() and (s > 0).any() and (s < 0).any()
    return s


def masks(T=7):
    g = torch.Generator().manual_seed(5)
    free = torch.rand(T, T + 2, generator=g) < 0.5
    free[:, 3] = True                                    # every row sees something
    return {'causal': attention_mask(T, 0, 'cpu'), 'slots': attention_mask(T, 2, 'cpu'), 'arbitrary': free}


CLIPS = [(-0.025, 1.0), (-0.2, 1.1), (-0.1, 1.0), (0.0, 1.05), (-0.3, 1.3), (0.0, 1.0)]


@pytest.mark.parametrize('mask_name', ['causal', 'slots', 'arbitrary'])
@pytest.mark.parametrize('kind', ['softmax', 'sigmoid', 'relu'])
def test_attention_weights_against_the_formula(kind, mask_name):
    mask = masks()[mask_name]
    seed = 10 * ['softmax', 'sigmoid', 'relu'].index(kind) + ['causal', 'slots', 'arbitrary'].index(mask_name)
    scores = random_scores((2, 3, *mask.shape), seed=seed)
    got = attention_weights(scores.clone(), mask, kind)
    want = reference_weights(scores, mask, kind)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert (got[..., ~mask] == 0).all()                  # masked entries exactly 0
    if kind == 'relu':
        assert ((got == 0) & mask).any() and ((got > 0) & mask).any()   # both sides of relu's kink


def test_sigmoid_and_relu_divide_by_the_keys_each_query_sees():
    """n is per row: the number of visible keys (slots included). At zero scores a sigmoid row sums
    to n sigmoid(-log n) = n / (n + 1); a relu row of scores s has total sum relu(s) / n."""
    mask = attention_mask(5, 2, 'cpu')
    n = torch.arange(3, 8, dtype=torch.float64)          # query i sees 2 slots and i + 1 keys
    sig = attention_weights(torch.zeros(5, 7), mask, 'sigmoid').double()
    torch.testing.assert_close(sig.sum(-1), n / (n + 1), atol=1e-6, rtol=0)
    ones = attention_weights(torch.full((5, 7), 3.0), mask, 'relu').double()
    torch.testing.assert_close(ones.sum(-1), torch.full((5,), 3.0, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(ones[:, 0], 3.0 / n, atol=1e-7, rtol=0)


def test_plus_one_is_a_zero_score_slot():
    """plus_one: a_ij = exp(s_ij) / (1 + sum_j' exp(s_ij')), the zero slot being score column 0."""
    T = 6
    data = random_scores((2, 2, T, T), seed=3)
    mask = attention_mask(T, 1, 'cpu')
    scores = torch.cat([torch.zeros(2, 2, T, 1), data], -1)
    got = attention_weights(scores.clone(), mask, 'plus_one').double()
    e = data.double().exp() * torch.ones(T, T, dtype=torch.bool).tril()
    want = e / (1 + e.sum(-1, keepdim=True))
    torch.testing.assert_close(got[..., 1:], want, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(got[..., 0], 1 / (1 + e.sum(-1)), atol=1e-7, rtol=1e-6)
    assert (got.sum(-1) - 1).abs().max() < 1e-6


@pytest.mark.parametrize('gamma, zeta', CLIPS)
@pytest.mark.parametrize('mask_name', ['causal', 'slots'])
def test_clipped_against_the_formula_with_exact_zeros_and_ones(gamma, zeta, mask_name):
    """clip((zeta - gamma) softmax + gamma, 0, 1): entries whose unclipped value is below 0 are
    exactly 0 and those above 1 exactly 1; masked entries exactly 0."""
    mask = masks(8)[mask_name]
    scores = random_scores((2, 2, *mask.shape), seed=11, scale=2.5)
    got = attention_weights(scores.clone(), mask, 'clipped', gamma, zeta)
    want = reference_weights(scores, mask, 'clipped', gamma, zeta)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    p = reference_weights(scores, mask, 'softmax')
    raw = (zeta - gamma) * p + gamma
    zeros, ones = mask & (raw < -1e-6), mask & (raw > 1 + 1e-6)
    assert (got[zeros] == 0).all() and (got[ones] == 1).all()
    assert (got[..., ~mask] == 0).all()
    if gamma < 0:
        assert zeros.sum() >= 10                     # the edge is exercised
    if zeta > 1 and mask_name == 'causal':
        assert ones.sum() >= 4                       # at least query 0 (p = 1) in every row group
    inside = mask & (raw > 1e-6) & (raw < 1 - 1e-6)
    assert (got[inside] > 0).all() and (got[inside] < 1).all()


def test_clipped_edge_between_zero_and_positive():
    """Two keys with softmax p and 1 - p: at gamma = -0.2, zeta = 1 an entry is 0 exactly when
    p <= 0.2 / 1.2 = 1/6."""
    gamma, zeta = -0.2, 1.0
    edge = -gamma / (zeta - gamma)
    for p, zero in [(edge * 0.999, True), (edge * 1.001, False), (0.05, True), (0.3, False)]:
        s = torch.tensor([[math.log(p), math.log(1 - p)]])
        w = attention_weights(s.clone(), torch.ones(1, 2, dtype=torch.bool), 'clipped', gamma, zeta)
        assert (w[0, 0] == 0) == zero, p
        assert float(w[0, 0]) == pytest.approx(max(0.0, (zeta - gamma) * p + gamma), abs=1e-6)


# the whole attention sublayer by hand, in float64, on random weights where q is far from 0

VARIANTS = [
    dict(),
    dict(attn_softmax='plus_one'),
    dict(attn_bias=True),
    dict(attn_softmax='clipped'),
    dict(attn_softmax='clipped', clip_gamma=-0.2, clip_zeta=1.1),
    dict(attn_softmax='sigmoid'),
    dict(attn_softmax='sigmoid', attn_bias=True),
    dict(attn_softmax='relu'),
    dict(attn_softmax='relu', n_registers=2),
    dict(attn_softmax='relu', qk_norm=True),
]


class Capture(Observer):
    attention = True

    def __init__(self):
        self.seen = {}

    def on_attention(self, layer, q, k, v, att, extra=None):
        self.seen[layer] = (q, k, v, att, extra)


@pytest.mark.parametrize('flags', VARIANTS, ids=lambda f: '-'.join(f'{k}={v}' for k, v in f.items()) or 'softmax')
def test_attention_sublayer_by_hand(flags):
    """GPT with random weights scaled so that scores are O(1) and of both signs: the output of each
    attention sublayer equals a float64 computation from its input and weights (scores q k / sqrt(hd),
    the slot as one more key and value, the weighting of §1.6, output projection), and the observer
    gets q, k, v and the weights of the data keys (for sigmoid and relu their share of the row's
    total, which extra['total'] holds)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32, **flags)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for sub in model.sublayers[::2]:
            sub.fn.qkv.weight.mul_(12.0)
    H, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    R = cfg.n_registers
    kind = cfg.attn_softmax
    got = {}

    def hook(layer):
        def fn(module, inputs, output):
            got[layer] = (inputs[0].detach().clone(), output.detach().clone())
        return fn

    handles = [model.sublayers[2 * l].fn.register_forward_hook(hook(l)) for l in range(cfg.n_layer)]
    obs = Capture()
    x = torch.randint(0, 32, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x, observer=obs)
        plain = model(x)[0]                     # without the observer: the same function
    for h_ in handles:
        h_.remove()
    for l in range(cfg.n_layer):
        fn = model.sublayers[2 * l].fn
        u, out = got[l]
        B, T, C = u.shape
        W = fn.qkv.weight.detach().double()
        qkv = u.double() @ W.T
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in qkv.split(C, -1))
        if cfg.qk_norm:
            rms = lambda t, w: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w.double()
            q, k = rms(q, fn.q_norm.weight.detach()), rms(k, fn.k_norm.weight.detach())
        S = 0
        if cfg.attn_bias:
            ks, vs = (t.detach().double().expand(B, -1, -1, -1) for t in fn.slot)
            k, v, S = torch.cat([ks, k], 2), torch.cat([vs, v], 2), 1
        elif kind == 'plus_one':
            z = torch.zeros(B, H, 1, hd, dtype=torch.float64)
            k, v, S = torch.cat([z, k], 2), torch.cat([z, v], 2), 1
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(T, S, dtype=torch.bool), causal], 1)
        data = scores[..., S:][..., causal]
        assert data.abs().min() > 0 and (data > 0.5).any() and (data < -0.5).any()   # q far from 0
        w = reference_weights(scores, mask, kind, cfg.clip_gamma, cfg.clip_zeta)
        y = (w @ v).transpose(1, 2).reshape(B, T, C) @ fn.proj.weight.detach().double().T
        torch.testing.assert_close(out.double(), y, atol=2e-5, rtol=1e-5)
        # what the observer got: data positions only (after the registers), data keys only
        oq, ok, ov, oatt, extra = obs.seen[l]
        torch.testing.assert_close(oq.double(), q[:, :, R:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ok.double(), k[:, :, S + R:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ov.double(), v[:, :, S + R:], atol=1e-5, rtol=1e-5)
        total = w.sum(-1)
        share = w / total.clamp_min(1e-30).unsqueeze(-1) if kind in ('sigmoid', 'relu') else w
        torch.testing.assert_close(oatt.double(), share[:, :, R:, S + R:], atol=1e-5, rtol=1e-5)
        if kind in ('sigmoid', 'relu'):
            torch.testing.assert_close(extra['total'].double(), total[:, :, R:], atol=1e-5, rtol=1e-5)
        if S:
            torch.testing.assert_close(extra['slot'].double(), share[:, :, R:, 0], atol=1e-5, rtol=1e-5)
        if R:
            torch.testing.assert_close(extra['registers'].double(), share[:, :, R:, S:S + R].sum(-1),
                                       atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, observer=obs)[0], plain, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# lab/data.py: the trigger generator (docs/reference.md §3.5)

def replay_trigger_block(rng, n, V, p, seq_len):
    """The documented generator, one document at a time in plain Python, on the random stream the
    docstring of trigger_block describes (per position: n uniforms, then n content symbols). Returns
    (docs, number of answers decided by a tie)."""
    draws = [(rng.random(n), rng.integers(2, V, size=n)) for _ in range(seq_len)]
    docs, ties = [], 0
    for r in range(n):
        doc, counts = [0], {}
        for t in range(1, seq_len + 1):
            u, sym = draws[t - 1][0][r], int(draws[t - 1][1][r])
            if doc[-1] == 1:                                      # the answer
                best = max(counts.values())
                leaders = sorted(c for c, k in counts.items() if k == best)
                ties += len(leaders) > 1
                s = leaders[0]                                    # ties: the smallest id
            elif counts and u < p:
                s = 1
            else:
                s = sym
            if s != 1:
                counts[s] = counts.get(s, 0) + 1                  # answers count too
            doc.append(s)
        docs.append(doc)
    return np.array(docs, dtype=np.uint16), ties


@pytest.mark.parametrize('V, p, seq_len', [(4, 0.45, 24), (5, 0.3, 40), (34, 0.06, 64)])
def test_trigger_block_against_a_replay(V, p, seq_len):
    n = 400
    got = trigger_block(np.random.default_rng([7, V]), n, V, p, seq_len)
    want, ties = replay_trigger_block(np.random.default_rng([7, V]), n, V, p, seq_len)
    assert got.dtype == np.uint16 and got.shape == (n, seq_len + 1)
    assert (got[:, 0] == TRIGGER_BOS).all() and (got[:, 1:] != TRIGGER_BOS).all()
    np.testing.assert_array_equal(got, want)
    if V <= 5:
        assert ties >= 100                       # ties are frequent with few symbols: the rule is exercised


def test_trigger_answers_and_rate_on_tie_heavy_documents():
    """Independently of the random stream: on documents of trigger_documents, every answer is the
    most frequent content symbol so far, the smallest id on ties, with answers counted; triggers
    never follow a trigger or come before the first content symbol; and the trigger rate among the
    positions that may hold one is p (binomial, 5 sigma)."""
    V, p, seq_len = 4, 0.3, 30
    docs = np.concatenate(list(trigger_documents(3000, 'val', vocab_size=V, p=p, seq_len=seq_len, seed=2)))
    assert docs.shape == (3000, seq_len + 1)
    ties = largest_wins = eligible = triggers = 0
    for doc in docs.tolist():
        assert doc[0] == 0 and 0 not in doc[1:]
        counts = {}
        for t in range(1, len(doc)):
            s, prev = doc[t], doc[t - 1]
            if prev == 1:
                best = max(counts.values())
                leaders = [c for c in counts if counts[c] == best]
                assert s == min(leaders), (doc, t)
                ties += len(leaders) > 1
                largest_wins += len(leaders) > 1 and max(leaders) == prev_content
            else:
                if counts:
                    eligible += 1
                    triggers += s == 1
                else:
                    assert s != 1
            if s != 1:
                counts[s] = counts.get(s, 0) + 1
                prev_content = s
    assert ties >= 500 and largest_wins >= 100     # ties, also where the most recent symbol has the larger id
    assert abs(triggers / eligible - p) < 5 * math.sqrt(p * (1 - p) / eligible)


def test_trigger_documents_blocks_and_splits():
    """Block k of a split is trigger_block on default_rng([seed, split id, k]); document i is the
    same whatever n is."""
    V = 600                                            # 2**22 // 598 = 7013 documents per block
    block = trigger_block_docs(V)
    assert block == 2**22 // (V - 2) and trigger_block_docs(34) == 8192
    first = list(trigger_documents(block + 3, 'train', vocab_size=V, p=0.2, seq_len=6, seed=4))
    assert [len(b) for b in first] == [block, 3]
    want = trigger_block(np.random.default_rng([4, 0, 1]), block, V, 0.2, 6)[:3]
    np.testing.assert_array_equal(first[1], want)
    val = next(trigger_documents(5, 'val', vocab_size=V, p=0.2, seq_len=6, seed=4))
    np.testing.assert_array_equal(val, trigger_block(np.random.default_rng([4, 1, 0]), block, V, 0.2, 6)[:5])


# ----------------------------------------------------------------------------------------------
# lab.data.Sampler: document boundaries at the first and last token of a shard (docs/reference.md §2.3)

def shard_with(tmp_path, name, n, bos_at, bos=0):
    """A shard of n distinct tokens (so a window is found by its contents) with bos at the given
    positions."""
    tokens = np.arange(1, n + 1) + 1000 * (len(list(tmp_path.iterdir())) + 1)
    tokens[list(bos_at)] = bos
    path = str(tmp_path / name)
    write_shard(path, tokens)
    return path, tokens


def starts_of(sampler, shards, steps=60):
    """(shard, start) of every window the sampler draws, each window located in its shard."""
    found = set()
    for step in range(steps):
        x, y = sampler.get(step)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            hits = [(i, s) for i, tok in enumerate(shards) for s in range(len(tok) - len(row) + 1)
                    if (tok[s:s + len(row)] == row).all()]
            assert len(hits) == 1, row                   # one contiguous slice of one shard: no crossing
            found.add(hits[0])
    return found


def test_doc_aligned_windows_at_shard_edges(tmp_path):
    """Window 8 (block_size 7) in shards of 20 tokens: a bos at position 0 and at 12 = 20 - 8 (the last
    start that leaves room) are window starts; a bos at 13 or at the last token (19) is not."""
    a, ta = shard_with(tmp_path, 'a.bin', 20, [0, 12, 13, 19])
    b, tb = shard_with(tmp_path, 'b.bin', 20, [0, 19])               # a document boundary at both ends
    c, tc = shard_with(tmp_path, 'c.bin', 20, [5, 19])               # only the last token is past the edge
    s = Sampler([a, b, c], batch_size=8, block_size=7, seed=0, doc_aligned=True, bos=0)
    assert list(s.doc_starts(0)) == [0, 12] and list(s.doc_starts(1)) == [0] and list(s.doc_starts(2)) == [5]
    found = starts_of(s, [ta, tb, tc])
    assert found == {(0, 0), (0, 12), (1, 0), (2, 5)}
    for step in range(5):
        assert (s.get(step)[0][:, 0] == 0).all()
    # a shard whose only bos is its last token cannot be sampled doc-aligned
    d, _ = shard_with(tmp_path, 'd.bin', 20, [19])
    with pytest.raises(ValueError, match='no bos'):
        Sampler([d], 2, 7, seed=0, doc_aligned=True, bos=0).get(0)
    # ... and one whose only bos leaves exactly a window can
    e, te = shard_with(tmp_path, 'e.bin', 20, [12])
    assert starts_of(Sampler([e], 4, 7, seed=0, doc_aligned=True, bos=0), [te], steps=3) == {(0, 12)}


def test_plain_windows_reach_every_start_and_never_cross_a_shard_end(tmp_path):
    """Shards of window + 2 tokens and of exactly a window: every start 0..len - window is drawn and
    none past it; a shard one token short of a window is left out; shards are picked in proportion
    to their number of starts."""
    a, ta = shard_with(tmp_path, 'a.bin', 10, [0, 9])           # bos at both ends: no effect here
    b, tb = shard_with(tmp_path, 'b.bin', 8, [7])
    c, _ = shard_with(tmp_path, 'c.bin', 7, [])
    s = Sampler([a, b, c], batch_size=8, block_size=7, seed=0)
    assert s.paths == [a, b]
    np.testing.assert_allclose(s.shard_probs, [3 / 4, 1 / 4])
    assert starts_of(s, [ta, tb]) == {(0, 0), (0, 1), (0, 2), (1, 0)}
    with pytest.raises(ValueError, match='no shard holds a window'):
        Sampler([c], 1, 7, seed=0)
    Sampler([b], 1, 7, seed=0).get(0)                            # exactly a window: usable


# ----------------------------------------------------------------------------------------------
# lab/trajectories.py and lab/groups.py: first crossings and the group statistics (docs/reference.md §5)

def test_first_crossings_at_each_threshold():
    assert trajectories.THRESHOLDS == (10, 100, 1000)
    values = [math.nextafter(10, 0), 10.0, math.nextafter(100, 0), None, 100.0, 999.999, math.nextafter(1000, 2000)]
    iters = [10 * i for i in range(len(values))]
    tokens = [1000 * i for i in iters]
    c = trajectories.first_crossings(iters, tokens, values)
    assert c == {'10': dict(iter=10, tokens=10_000), '100': dict(iter=40, tokens=40_000),
                 '1000': dict(iter=60, tokens=60_000)}
    c = trajectories.first_crossings([1, 2, 3], [5, 6, 7], [math.nextafter(10, 0), 100.0, math.nextafter(1000, 0)])
    assert c == {'10': dict(iter=2, tokens=6), '100': dict(iter=2, tokens=6), '1000': None}
    assert trajectories.first_crossings([1], [2], [None]) == {'10': None, '100': None, '1000': None}


def holm_by_formula(ps):
    """p_adj(i) = max_{j <= i} min(1, (m - j + 1) p_(j)), j 1-based over the m p-values that exist."""
    have = [(p, i) for i, p in enumerate(ps) if p is not None]
    order = sorted(have)
    m = len(order)
    out = [None] * len(ps)
    for i in range(m):
        out[order[i][1]] = max(min(1.0, (m - j) * order[j][0]) for j in range(i + 1))
    return out


def test_holm_at_the_edges():
    # ties get the same adjusted p; None is kept and not counted in m
    assert groups.holm([0.01, None, 0.01, 0.04]) == pytest.approx([0.03, None, 0.03, 0.04])
    assert groups.holm([0.01, None, 0.01, 0.04])[1] is None
    # adjusted p reach 1 and stay there (the running maximum)
    assert groups.holm([0.6, 0.5, 0.9]) == pytest.approx([1.0, 1.0, 1.0])
    assert groups.holm([0.3, 0.5, 1.0]) == pytest.approx([0.9, 1.0, 1.0])
    # monotone: a larger raw p never gets a smaller adjusted p
    assert groups.holm([0.011, 0.01, 0.5]) == pytest.approx([0.03, 0.03, 0.5])
    assert groups.holm([]) == [] and groups.holm([None]) == [None] and groups.holm([0.2]) == [0.2]
    rng = np.random.default_rng(0)
    for trial in range(50):
        ps = [None if r < 0.15 else float(np.round(rng.random() ** 3, 2)) for r in rng.random(9)]   # ties, zeros
        got, want = groups.holm(ps), holm_by_formula(ps)
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], abs=1e-12)


def permutation_by_enumeration(a, b):
    pooled = np.concatenate([a, b])
    n = len(pooled)
    d = abs(np.mean(b) - np.mean(a))
    hits = total = 0
    for idx in itertools.combinations(range(n), len(a)):
        rest = [i for i in range(n) if i not in idx]
        total += 1
        hits += abs(pooled[rest].mean() - pooled[list(idx)].mean()) >= d * (1 - 1e-12)
    return hits / total


def test_permutation_p_floor_and_by_enumeration():
    p, test, p_min = groups.permutation_p([1.0, 2.0, 3.0], [10.0, 11.0, 12.0])
    assert p == pytest.approx(0.1) and p_min == pytest.approx(0.1) and test == 'exact: 20 splits (all)'
    p, test, p_min = groups.permutation_p([1, 2, 3, 4, 5], [10, 11, 12, 13, 14])
    assert p == pytest.approx(2 / 252) and p_min == pytest.approx(2 / 252) and test == 'exact: 252 splits (all)'
    p, _, p_min = groups.permutation_p([1, 2, 3], [10, 11, 12, 13])       # unequal sizes: no mirror split
    assert p == pytest.approx(1 / 35) and p_min == pytest.approx(1 / 35)
    rng = np.random.default_rng(1)
    for na, nb in [(3, 3), (4, 5), (5, 5), (2, 6)]:
        a, b = rng.normal(0, 1, na), rng.normal(0.7, 1.5, nb)
        assert groups.permutation_p(a, b)[0] == pytest.approx(permutation_by_enumeration(a, b), abs=1e-12)
    # ties in the data: splits with |d*| equal to the observed count
    a, b = [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]
    assert groups.permutation_p(a, b)[0] == pytest.approx(permutation_by_enumeration(np.array(a), np.array(b)))


def test_permutation_p_switches_to_random_above_max_exact():
    a, b = [1.0, 2.0, 3.0], [10.0, 11.0, 12.0]
    assert groups.permutation_p(a, b, max_exact=20)[1] == 'exact: 20 splits (all)'
    p, test, p_min = groups.permutation_p(a, b, max_exact=19, permutations=999)
    assert test == 'random: 999 random permutations' and p_min == pytest.approx(1 / 1000)
    hits = p * 1000 - 1
    assert abs(hits - round(hits)) < 1e-6 and abs(p - 0.1) < 0.04


def test_hedges_g_against_the_formula():
    rng = np.random.default_rng(2)
    for na, nb in [(2, 2), (3, 5), (5, 5), (8, 3)]:
        a, b = rng.normal(1, 2, na), rng.normal(2, 0.5, nb)
        s2 = ((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / (na + nb - 2)
        want = (b.mean() - a.mean()) / math.sqrt(s2) * (1 - 3 / (4 * (na + nb) - 9))
        assert groups.hedges_g(a, b) == pytest.approx(want, rel=1e-12)
    # one group without spread: s_pooled from the other alone
    assert groups.hedges_g([1, 2, 3], [5, 5, 5]) == pytest.approx(3 / math.sqrt(0.5) * (1 - 3 / 15))
    assert groups.hedges_g([1.0], [2.0, 3.0]) is None and groups.hedges_g([1, 1], [2, 2]) is None


def test_welch_against_the_formula():
    from scipy import stats as st
    rng = np.random.default_rng(3)
    for na, nb in [(2, 2), (3, 5), (5, 5), (9, 3)]:
        a, b = rng.normal(0, 1, na), rng.normal(1, 3, nb)
        va, vb = np.var(a, ddof=1) / na, np.var(b, ddof=1) / nb
        se = math.sqrt(va + vb)
        df = se ** 4 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
        d = b.mean() - a.mean()
        half = st.t.ppf(0.975, df) * se
        ci, p, nu = groups.welch(a, b)
        assert nu == pytest.approx(df, rel=1e-10)
        assert ci == pytest.approx([d - half, d + half], rel=1e-9)
        assert p == pytest.approx(2 * st.t.sf(abs(d) / se, df), rel=1e-9)
    ci, p, nu = groups.welch([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])        # one group without spread: defined
    assert nu == pytest.approx(2.0) and ci[0] < 2.0 < ci[1]
    assert groups.welch([1.0, 1.0], [2.0, 2.0]) == (None, None, None)
    assert groups.welch([1.0], [2.0, 3.0]) == (None, None, None)


# the stream outlier ratio (docs/reference.md §4.3): the max of top1/median only over sublayers whose RMS
# is at least RMS_FLOOR (0.1) x the last sublayer's

def test_outlier_ratio_skips_nearly_empty_sublayers_at_the_edge():
    ratio = [5000.0, 40.0, 60.0, 30.0]
    last = 2.0
    for rms0, wins in [(0.1 * last * 0.999, False), (0.1 * last, True), (0.1 * last * 1.001, True)]:
        value, s = stats.outlier_ratio(ratio, [rms0, 1.0, 1.5, last])
        assert (s == 0) == wins and value == (5000.0 if wins else 60.0), rms0
    assert stats.outlier_ratio([1.0, 9.0], [3.0, 1.0]) == (9.0, 1)           # a stream that shrinks: all count
    assert stats.RMS_FLOOR == 0.1


def test_outlier_ratio_of_a_ledger_reads_C_where_it_carries_mass():
    """A fresh ledger: C is 0 before the first commit and small for the first sublayers, where its
    top1/median can be huge; the outlier ratio is taken where C's RMS is >= 0.1 x its final RMS."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, residual='ledger', ledger_rank=8))
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    result, _ = measure.measure(model.eval(), x, x)
    per, sm = result['streams']['C']['per_sublayer'], result['streams']['C']['summary']
    keep = [s for s, r in enumerate(per['rms']) if r >= 0.1 * per['rms'][-1]]
    assert sm['outlier_ratio'] == max(per['top1_median'][s] for s in keep)
    assert sm['outlier_ratio_sublayer'] in keep and sm['start_mass_last'] == per['start_mass'][-1]
    assert 0 not in keep                         # C after sublayer 0 carries one commit of ~e^-4: below the floor
