"""
Massive activations and attention sinks, measured (../shared/SPEC.md §4).

    python probe.py out/ckpt.pt [more.pt ...] [--out DIR] [--num_seqs N] [--seq_len T] [--text "..."]

The statistics below are plain functions of a (N, T, d) activation tensor so that train.py can log
the same numbers during training that the probe reports afterwards.
"""

import torch

from model import Observer

MASSIVE_ABS = 100.0       # Sun et al.: |x| > 100 ...
MASSIVE_REL = 1000.0      # ... and |x| >= 1000 x median(|x|) of that sequence at that sublayer
OUTLIER_REL = 50.0        # reference code's n_out50: |x| >= 50 x the token's median


@torch.no_grad()
def sublayer_stats(x):
    """Scalar statistics of one stream after one sublayer; x is (N, T, d), any dtype.

    Computed in float64 whatever the model ran in. Returns a dict of Python numbers:
    top1/top2/top3/median (Sun profile, per sequence then averaged), top1_median, n_massive and the
    largest massive entry (Sun census), kurtosis, feat_maxmed, n_out50 (reference-code metrics).
    """
    a = x.detach().double().abs()
    N, T, d = a.shape
    flat = a.reshape(N, T * d)
    top = flat.topk(min(3, T * d), dim=1)
    med = flat.median(dim=1).values                                   # (N,)
    massive = (a > MASSIVE_ABS) & (a >= MASSIVE_REL * med.view(N, 1, 1))
    top_seq, top_idx = top.values[:, 0].max(0)                        # the largest entry overall
    seq = int(top_idx)
    pos, ch = divmod(int(top.indices[seq, 0]), d)
    # excess kurtosis over channels, per token, averaged
    xs = x.detach().double()
    z = xs - xs.mean(-1, keepdim=True)
    var = z.pow(2).mean(-1)
    kurt = (z.pow(4).mean(-1) / var.pow(2).clamp_min(1e-30) - 3.0).mean()
    chan = a.mean(dim=(0, 1))                                         # per-channel mean |x|
    tok_med = a.median(dim=-1, keepdim=True).values
    n_out50 = (a >= OUTLIER_REL * tok_med).sum(-1).double().mean()
    stats = dict(
        top1=top.values[:, 0].mean().item(),
        top2=top.values[:, min(1, top.values.size(1) - 1)].mean().item(),
        top3=top.values[:, -1].mean().item(),
        median=med.mean().item(),
        top1_median=(top.values[:, 0].mean() / med.mean().clamp_min(1e-30)).item(),
        n_massive=int(massive.sum()),
        max_entry=dict(seq=seq, position=pos, channel=ch, value=float(xs[seq, pos, ch])),
        kurtosis=kurt.item(),
        feat_maxmed=(chan.max() / chan.median().clamp_min(1e-30)).item(),
        n_out50=n_out50.item(),
    )
    return stats


class StreamStats(Observer):
    """Reduces every stream to sublayer_stats after every sublayer, as the forward pass runs."""

    def __init__(self):
        self.stats = {}      # stream name -> list over sublayers of sublayer_stats dicts

    def on_sublayer(self, s, streams):
        for name, x in streams.items():
            self.stats.setdefault(name, []).append(sublayer_stats(x))


@torch.no_grad()
def activation_stats(model, idx, keys=('top1_median', 'kurtosis', 'feat_maxmed', 'n_massive')):
    """One forward pass on idx; returns {stream: {key: [value per sublayer]}} for the training log."""
    obs = StreamStats()
    model(idx, observer=obs)
    return {name: {k: [st[k] for st in per_sub] for k in keys} for name, per_sub in obs.stats.items()}
