"""
The activation statistics that training logs and the probe reports, computed the same way in both
(docs/reference.md §4): train.py calls activation_stats at every evaluation, the probe
(lab/measure.py) builds its report from the same SublayerAccumulator, and lab/trajectories.py reads
the logged keys (STATS_KEYS). The thresholds of the definitions (massive entries, sink heads,
conditional sinks) are set here once.

Everything here is a plain function of (N, T, d) activation tensors, computed in float32/float64
whatever the model ran in; nothing here knows which residual operator produced the streams.
"""

import numpy as np
import torch

from model import Observer

MASSIVE_ABS = 100.0       # Sun et al.: |x| > 100 ...
MASSIVE_REL = 1000.0      # ... and |x| >= 1000 x median(|x|) of that sequence at that sublayer
OUTLIER_REL = 50.0        # reference code's n_out50: |x| >= 50 x the token's median
SINK_EPS = 0.3            # Gu et al.: a head is a sink head when alpha_1 > 0.3 ...
SINK_T = 64               # ... measured on the first 64 tokens; on fewer, even uniform attention passes
                          # (uniform_alpha1: 0.457 at T = 5), so shorter measurements carry a warning
RMS_FLOOR = 0.1           # outlier_ratio: only sublayers whose RMS is >= this x the last sublayer's can win
COND_OTHER, COND_TRIGGER = 0.5, 0.1   # a conditional sink head: >= 0.5 of the other queries' attention
                                      # on position 0, <= 0.1 of the trigger queries' (the trigger testbed)
NOOP_V0 = 0.3             # what a sink head does: a no-op sink when ||v_0|| / mean_t ||v_t|| < 0.3 (the value it
BROADCAST_RANK = 2.0      # fetches is near zero), else a broadcast sink when its output over positions has an
                          # effective rank < 2 (one vector, written to every position), else mixed
FP16_MAX = 65504.0        # the largest finite float16: a stream entry above it overflows in fp16

# what train.py logs per stream at every evaluation: lists over sublayers, then two integers
STATS_KEYS = ('top1_median', 'kurtosis', 'feat_maxmed', 'n_massive', 'start_mass', 'start_mass_dominant',
              'top_channel', 'dominant_dim', 'peak_layer')


def lower_median(v):
    """torch's median convention (the lower of the two middle values), for numpy arrays."""
    k = (np.shape(v)[-1] - 1) // 2
    return np.partition(np.asarray(v), k, axis=-1)[..., k]


def median_last(a):
    """torch.median(a, dim=-1).values, exactly; on the CPU through numpy's SIMD partition, which is
    ~10x faster than torch's median there (the medians were most of the probe's overhead)."""
    if a.device.type != 'cpu':
        return a.median(dim=-1).values
    return torch.from_numpy(lower_median(a.numpy()))


class SublayerAccumulator:
    """Running sums of one stream at one sublayer over batches of sequences.

    Elementwise work is done in float32 (exact for the order statistics, and sums over one
    sequence's entries are pairwise); the running sums across batches are float64. The census
    mask is only built when some entry is above the absolute 100 at all.
    """

    def __init__(self):
        self.n_seq = 0
        self.n_tok = 0
        self.top = None          # (3,) summed over sequences
        self.median = 0.0
        self.sq = 0.0            # sum of x^2 over every entry (the stream's RMS)
        self.kurt = 0.0
        self.out50 = 0.0
        self.chan = None         # (d,) sum of |x| over tokens
        self.pos0 = None         # (d,) sum of |x| at position 0 over sequences
        self.start = 0.0         # sum over sequences of the start-token mass
        self.start_chan = None   # (d,) sum over sequences of |x[0, c]| / sum_t |x[t, c]|
        self.n_massive = 0
        self.massive_channels = None   # (d,) massive entries per channel
        self.massive_positions = None  # (T,) massive entries per position
        self.massive_pos0 = None       # (d,) massive entries at position 0 per channel
        self.largest = None      # (|value|, seq, position, channel, value) overall
        self.largest_massive = None
        self.seq_top = []        # per batch: (position, channel, value) of each sequence's largest |x|

    @torch.no_grad()
    def add(self, x, offset=0):
        """Add a batch x (B, T, d) whose first sequence is number `offset` of the probe set.
        Returns the massive entries as (seq, position, channel, value) tensors, or None."""
        x = x.detach().float()
        B, T, d = x.shape
        a = x.abs()
        flat = a.view(B, T * d)
        k = min(3, T * d)
        top_v, top_i = flat.topk(k, dim=1)
        top_v = torch.cat([top_v, top_v[:, -1:].expand(B, 3 - k)], 1)
        med = median_last(flat)                                           # (B,)
        # excess kurtosis over channels, per token
        z2 = (x - x.mean(-1, keepdim=True)).square_()      # in place: fresh CPU memory is slow
        var = z2.mean(-1)
        kurt = z2.square_().mean(-1) / var.square().clamp_min(1e-30) - 3.0
        tok_med = median_last(a).unsqueeze(-1)
        out50 = (a >= OUTLIER_REL * tok_med).sum(-1, dtype=torch.int32)
        seq_chan = a.sum(1)                                                # (B, d)
        chan = seq_chan.sum(0)
        pos0 = a[:, 0, :].sum(0)
        # start-token mass: the share of each sequence's |x| at position 0, overall and per channel
        start = a[:, 0, :].sum(-1) / seq_chan.sum(-1).clamp_min(1e-30)
        start_chan = (a[:, 0, :] / seq_chan.clamp_min(1e-30)).sum(0)
        # each sequence's largest entry
        pos, ch = top_i[:, 0] // d, top_i[:, 0] % d
        val = x.reshape(B, T * d).gather(1, top_i[:, :1]).squeeze(1)

        self.n_seq += B
        self.n_tok += B * T
        sums = dict(top=top_v.sum(0).double().cpu(), chan=chan.double().cpu(), pos0=pos0.double().cpu(),
                    start_chan=start_chan.double().cpu())
        for name, v in sums.items():
            cur = getattr(self, name)
            setattr(self, name, v if cur is None else cur + v)
        self.median += med.double().sum().item()
        self.sq += x.double().square().sum().item()
        self.start += start.double().sum().item()
        self.kurt += kurt.double().sum().item()
        self.out50 += out50.double().sum().item()
        b = int(top_v[:, 0].argmax())
        self._keep_largest('largest', top_v[b, 0], offset + b, pos[b], ch[b], val[b])
        self.seq_top.append((pos.cpu(), ch.cpu(), val.cpu()))
        if self.massive_channels is None:
            self.massive_channels = torch.zeros(d, dtype=torch.long)
            self.massive_positions = torch.zeros(T, dtype=torch.long)
            self.massive_pos0 = torch.zeros(d, dtype=torch.long)
        if float(top_v[b, 0]) <= MASSIVE_ABS:
            return None
        massive = (a > MASSIVE_ABS) & (a >= MASSIVE_REL * med.view(B, 1, 1))
        n = int(massive.sum())
        if n == 0:
            return None
        self.n_massive += n
        self.massive_channels += massive.sum(dim=(0, 1)).cpu()
        self.massive_positions += massive.sum(dim=(0, 2)).cpu()
        self.massive_pos0 += massive[:, 0, :].sum(0).cpu()
        seq, p, c = massive.nonzero(as_tuple=True)
        v = x[seq, p, c]
        i = int(v.abs().argmax())
        self._keep_largest('largest_massive', v[i].abs(), offset + seq[i], p[i], c[i], v[i])
        return (seq.cpu() + offset, p.cpu(), c.cpu(), v.cpu())

    def _keep_largest(self, attr, absval, seq, pos, ch, val):
        cur = getattr(self, attr)
        if cur is None or float(absval) > cur[0]:
            setattr(self, attr, (float(absval), int(seq), int(pos), int(ch), float(val)))

    def top_channel(self):
        """The channel with the largest mean |x| (the first on ties)."""
        return int(np.argmax(self.chan.numpy()))

    def result(self, channel=None):
        """The sublayer_stats dict: Python numbers only. start_mass_dominant is measured on `channel`
        (the stream's dominant_dim, which only the whole depth decides), by default on top_channel."""
        n = self.n_seq
        top = (self.top / n).tolist()
        median = self.median / n
        chan = self.chan
        _, seq, pos, ch, val = self.largest
        top_ch = self.top_channel()
        channel = top_ch if channel is None else channel
        return dict(
            top1=top[0], top2=top[1], top3=top[2], median=median,
            top1_median=top[0] / max(median, 1e-30),
            rms=(self.sq / (self.n_tok * chan.numel())) ** 0.5,
            n_massive=self.n_massive,
            max_entry=dict(seq=seq, position=pos, channel=ch, value=val),
            kurtosis=self.kurt / self.n_tok,
            feat_maxmed=(chan.max() / chan.median().clamp_min(1e-30)).item(),
            n_out50=self.out50 / self.n_tok,
            top_channel=top_ch,
            start_mass=self.start / n,
            start_mass_dominant=float(self.start_chan[channel]) / n,
        )


@torch.no_grad()
def sublayer_stats(x):
    """Scalar statistics of one stream after one sublayer; x is (N, T, d), any dtype.

    Computed in float32/float64 whatever the model ran in. Returns a dict of Python numbers:
    top1/top2/top3/median (Sun profile, per sequence then averaged), top1_median, n_massive and the
    largest entry max_entry (Sun census), kurtosis, feat_maxmed, n_out50 (reference-code metrics),
    top_channel, start_mass and start_mass_dominant (on top_channel: one sublayer has no depth).
    """
    acc = SublayerAccumulator()
    acc.add(x)
    return acc.result()


def effective_rank(m):
    """exp(entropy of the normalised singular values) of each (T, n) matrix of m (..., T, n), float64
    (Roy and Vetterli 2007): p_i = s_i / sum_j s_j, erank = exp(-sum_i p_i log p_i). 1 for a rank-1
    matrix, n for orthogonal columns of equal norm; 0 for an all-zero matrix (nothing to rank). The
    singular values are the square roots of the eigenvalues of the smaller Gram matrix (m^T m or m m^T)
    in float64: batched SVD is 10-30x slower on a busy CPU, and the values below ~1e-8 x the largest
    that the Gram matrix loses add nothing measurable to the entropy."""
    m = m.double()
    g = m.transpose(-2, -1) @ m if m.shape[-2] >= m.shape[-1] else m @ m.transpose(-2, -1)
    s = torch.linalg.eigvalsh(g).clamp_min(0).sqrt()
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(1e-300)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), torch.zeros_like(h))


def sink_kind(v0_ratio, erank):
    """What a sink head does (docs/reference.md §4.6): 'no-op' when the value at position 0 is near
    zero (v0_ratio < NOOP_V0: attending there adds almost nothing), else 'broadcast' when the head's
    output over positions is nearly one vector (effective rank < BROADCAST_RANK), else 'mixed'."""
    if v0_ratio < NOOP_V0:
        return 'no-op'
    return 'broadcast' if erank < BROADCAST_RANK else 'mixed'


def outlier_ratio(top1_median, rms, floor=RMS_FLOOR):
    """(value, sublayer): the largest top1/median over the sublayers whose RMS is at least `floor`
    times the stream's RMS at its last sublayer (docs/reference.md §4.3). A stream that starts empty
    (the ledger's C: 0 before the first commit) has a tiny median early on, where a ratio of small
    numbers would otherwise win the max without any entry being large."""
    keep = [s for s, r in enumerate(rms) if r >= floor * rms[-1]]
    s = max(keep, key=lambda i: top1_median[i])
    return top1_median[s], s


def depth_structure(accs):
    """(chan (S, d) mean |x| per channel, pos0 (S, d) mean |x| at position 0, dominant_dim, peak_layer)
    of one stream's accumulators over its S sublayers (docs/reference.md §4, structure across depth)."""
    chan = np.stack([a.chan.numpy() / a.n_tok for a in accs])
    pos0 = np.stack([a.pos0.numpy() / a.n_seq for a in accs])
    dom = int(chan.mean(0).argmax())
    return chan, pos0, dom, int(chan[:, dom].argmax())


class StreamStats(Observer):
    """A SublayerAccumulator per stream and sublayer, filled as the forward pass runs."""

    def __init__(self):
        self.acc = {}        # stream name -> [SublayerAccumulator per sublayer]

    def on_sublayer(self, s, streams):
        for name, x in streams.items():
            acc = SublayerAccumulator()
            acc.add(x)
            self.acc.setdefault(name, []).append(acc)


@torch.no_grad()
def activation_stats(model, idx, keys=STATS_KEYS):
    """One forward pass on idx; returns {stream: {key: [value per sublayer]}} for the training log,
    except dominant_dim and peak_layer, one integer per stream (start_mass_dominant is on dominant_dim)."""
    obs = StreamStats()
    model(idx, observer=obs)
    out = {}
    for name, accs in obs.acc.items():
        _, _, dom, peak = depth_structure(accs)
        per = [a.result(channel=dom) for a in accs]
        scalars = dict(dominant_dim=dom, peak_layer=peak)
        out[name] = {k: scalars[k] if k in scalars else [st[k] for st in per] for k in keys}
    return out


class StreamGrads(Observer):
    """Hands every stream after every sublayer back to the model as its replacement, unchanged, so
    that the very tensors the rest of the forward uses are kept, and the loss can be differentiated
    with respect to them."""

    def __init__(self, names):
        self.names, self.kept = names, []     # names: the operator's streams (not its views)

    def on_sublayer(self, s, streams):
        kept = {name: streams[name] for name in self.names}
        self.kept.append(kept)
        return kept


def gradient_stats(model, x, y):
    """The cross-entropy's gradient on one batch (docs/reference.md §4.11): per sublayer the norm of
    its parameters' gradient, and per stream and sublayer the mean norm of the gradient at position 0
    and over the other positions (a 'gradient sink' is a position-0 norm far from the rest).
    torch.autograd.grad leaves every parameter's .grad alone, so a training run is not changed."""
    obs = StreamGrads(list(model.residual.streams))
    with torch.enable_grad():
        _, loss, _ = model(x, y, observer=obs)
        params = [[p for p in sub.parameters() if p.requires_grad] for sub in model.sublayers]
        tensors = [t for kept in obs.kept for t in kept.values()]
        grads = torch.autograd.grad(loss, [p for ps in params for p in ps] + tensors, allow_unused=True)
    n_params = sum(len(ps) for ps in params)
    param_grads, stream_grads = grads[:n_params], grads[n_params:]
    norms, i = [], 0
    for ps in params:
        sq = sum(float(g.double().square().sum()) for g in param_grads[i:i + len(ps)] if g is not None)
        norms.append(sq ** 0.5)
        i += len(ps)
    out = dict(sublayer=norms, streams={name: dict(pos0=[], other=[]) for name in obs.names})
    for s, kept in enumerate(obs.kept):
        for j, (name, t) in enumerate(kept.items()):
            g = stream_grads[s * len(kept) + j]           # None: the loss does not depend on it (the ledger's last D)
            g = torch.zeros_like(t) if g is None else g
            norm = g.double().norm(dim=-1)                # (B, T): per position
            out['streams'][name]['pos0'].append(float(norm[:, 0].mean()))
            out['streams'][name]['other'].append(float(norm[:, 1:].mean()) if norm.size(1) > 1 else None)
    return out
