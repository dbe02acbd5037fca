"""
The probe's measurements of a model on a batch of windows (definitions: docs/reference.md §4; the
keys they end up under in probe.json: §4.10). Observers measure a forward pass (Measure) or change
it (Intervention; Capture keeps copies, for tests); measure() is the measurement pass and
run_interventions() re-measures under each intervention. probe.py runs them on checkpoints and
GPT-2 or Hugging Face models (lab/hf.py wraps those so that they run like model.GPT); bench.py
times them (measure_overhead).

What is measured (the names are those of docs/reference.md §4; lab/stats.py computes the per-stream ones):
- every stream of the model's residual operator after every one of the 2L sublayers, and its views
  (vanilla: h; ledger: D, C, and `read`, the D + lam*C that each sublayer reads; the operator
  class names and describes them, and says which one the head decodes): the Sun profile (top1/2/3, median, top1_median) and census
  (|x| > 100 and >= 1000 x the sequence's median: count, largest entry, emergence and last
  sublayer), kurtosis, feat_maxmed, n_out50; across depth on the per-channel mean |x|:
  dominant_dim, persistence, peak_layer, peak_feat_ratio, bos_concentration; position-0 rigidity
  cos(x_s[0], x_{s+1}[0]); the share of sequences that start with <|endoftext|>; start-token mass:
  start_mass = sum_c |x[0, c]| / sum_{t,c} |x[t, c]| (1/T when uniform) and start_mass_dominant =
  |x[0, c*]| / sum_t |x[t, c*]| on c* = dominant_dim, per sequence, then averaged (0 for an all-zero
  stream or channel).
- attention, from softmax probabilities computed explicitly and reduced on the fly: alpha_1 = the
  mean of A[t, 0] over the queries that can see key 0 (all of them, unless a sliding window hides
  it) per layer and head, Sink_1 = % of (layer, head) with alpha_1 > 0.3 on the first
  64 tokens (Gu et al.) and at the full length, ||k_0|| / mean_t
  ||k_t||, ||v_0|| / mean_t ||v_t|| (also per head), mean_t cos(q_t, k_0) (q, k after QK-norm when the
  model has it), whether each sequence's massive-activation position is its sink position, and per
  head the effective rank of its output over positions: what each sink head does (no-op, broadcast).
- precision and super weights: the float16 headroom of the streams (65504 / max|x|), and per MLP
  sublayer the super-weight candidate W[i*, j*] of its down-projection (Yu et al. 2024).
- interventions (probe.py --interventions): validation loss and Sink_1 with the massive entries
  zeroed, set to their mean, with the emergence sublayer's input softened, with all Linear
  weights fake-quantised to 8 and 4 bits, with W8A8 (weights and inputs at 8 bits), and with the
  super weight zeroed (and then the decoded stream's outlier). The model is left bitwise unchanged.

Sublayer s is block s // 2 (0-based), "layer" s // 2 + 1 (1-based), attention when s is even.
Averages over sequences: alpha_1 is averaged over sequences before the 0.3 threshold; the profile
(top-k, median) is per sequence, then averaged; n_massive counts entries over all N sequences.

The per-stream statistics live in lab/stats.py, so that train.py logs the same numbers during
training (activation_stats) that the probe reports afterwards.
"""

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Observer
from lab.data import task_mask
from lab.report import residual_info, short, sublayer_name
from lab.stats import (BROADCAST_RANK, COND_OTHER, COND_TRIGGER, FP16_MAX, NOOP_V0, SINK_EPS, SINK_T,
                       SublayerAccumulator, depth_structure, effective_rank, lower_median, outlier_ratio, sink_kind)

# ----------------------------------------------------------------------------------------------
# Observers: measure a forward pass, or change it (interventions)


class Measure(Observer):
    """Everything the probe measures in one forward pass, reduced while the pass runs.

    streams=True (or a collection of stream names: those only): a SublayerAccumulator per stream and
    sublayer, position-0 cosines, the massive entries at each batch's first massive sublayer (the
    interventions' targets), and |x| of sequence 0 (float16, for the heatmap). attention=True:
    alpha_1, key/value norms, cos(q, k_0) and the attention each key receives, from explicit
    probabilities; heads=True also per head ||v_0|| / mean ||v_t|| and the effective rank of its
    output (sink kinds). Inside watching_down_projections: the super-weight candidates (self.down).
    alpha_1 on the first SINK_T tokens
    comes from the same maps: under causal attention the first 64 queries of a pass see exactly what
    a pass on x[:, :64] sees (a test checks it against such a pass). `edit` (an Intervention)
    changes the pass; what is measured is the changed pass. Call begin_batch/end_batch around each
    forward (run_passes does).

    task (the dataset's meta.json, for a dataset with a task such as the trigger language): the
    conditional sink as well, per layer and head the attention on position 0 from the queries whose
    next token is an answer (trigger positions) and from all other queries after position 0.
    """

    def __init__(self, streams=True, attention=True, edit=None, task=None, heads=True):
        self.streams = streams
        self.attention = attention
        self.heads = heads     # per head: ||v_0|| / mean ||v_t|| and the effective rank of its output
        self.edit = edit
        self.task = task
        self.n_queries = {'trigger': 0, 'other': 0}   # queries of each kind, summed over batches
        self.acc = {}          # stream -> [SublayerAccumulator per sublayer]
        self.cos = {}          # stream -> [sum over sequences of cos(x_s[0], x_{s+1}[0])]
        self.first = {}        # stream -> (sublayer, [entry tensors]) earliest massive sublayer
        self.sample = {}       # stream -> [|x| of sequence 0 per sublayer], float16 on the CPU
        self.att = {}          # layer -> dict of sums over sequences
        self.nothing = {}      # layer -> {do-nothing channel (Observer.on_attention's extra): {all|trigger|other: sums}}
        self.registers = {}    # stream -> [(sum over sequences of mean |x| per register, max |x| per register)]
        self.sink_pos = []     # per batch: argmax over keys of the attention received
        self.down = {}         # MLP sublayer -> super-weight candidate so far (on_down_projection)
        self.n_seq = 0
        self.offset = 0

    def begin_batch(self, offset, batch, tokens=None):
        self.offset, self._batch = offset, batch
        self._prev0, self._first, self._recv = {}, {}, None
        self._queries = None
        answers = task_mask(tokens, self.task) if tokens is not None else None
        if answers is not None:
            other = ~answers
            other[:, 0] = False                       # position 0 can only attend to itself
            self._queries = {'trigger': answers.float(), 'other': other.float()}
            for kind, m in self._queries.items():
                self.n_queries[kind] += int(m.sum())
        if self.edit is not None:
            self.edit.begin_batch(offset, batch)

    def end_batch(self):
        self.n_seq += self._batch
        for name, (s, entries) in self._first.items():
            if name not in self.first or s < self.first[name][0]:
                self.first[name] = (s, [entries])
            elif s == self.first[name][0]:
                self.first[name][1].append(entries)
        if self._recv is not None:
            self.sink_pos.append(self._recv.argmax(-1).cpu())

    def on_input(self, s, u):
        return None if self.edit is None else self.edit.on_input(s, u)

    def on_sublayer(self, s, streams):
        out = None if self.edit is None else self.edit.on_sublayer(s, streams)
        if not self.streams:
            return out
        if out:
            streams = {**streams, **out}
        for name, x in streams.items():
            if self.streams is not True and name not in self.streams:
                continue
            accs = self.acc.setdefault(name, [])
            if len(accs) <= s:
                accs.append(SublayerAccumulator())
            entries = accs[s].add(x, self.offset)
            if entries is not None and name not in self._first:
                self._first[name] = (s, entries)
            x0 = x[:, 0, :].float()
            if s > 0:
                cos = self.cos.setdefault(name, [])
                if len(cos) < s:
                    cos.append(0.0)
                cos[s - 1] += F.cosine_similarity(self._prev0[name], x0, dim=-1).double().sum().item()
            self._prev0[name] = x0
            if self.offset == 0:
                self.sample.setdefault(name, []).append(x[0].detach().float().abs().clamp(max=6e4).half().cpu())
        return out

    def on_registers(self, s, streams):
        if not self.streams:
            return
        for name, x in streams.items():
            a = x.detach().float().abs()
            rows = self.registers.setdefault(name, [])
            mean, top = a.mean(-1).sum(0).double().cpu(), a.amax(dim=(0, 2)).double().cpu()   # (R,) each
            if len(rows) <= s:
                rows.append((mean, top))
            else:
                rows[s] = (rows[s][0] + mean, torch.maximum(rows[s][1], top))

    def on_attention(self, layer, q, k, v, att, extra=None, visible0=None):
        """visible0: (B, T) bool, the queries whose mask lets them see key 0 (lab/hf.py passes it for
        sliding windows); None: every query does (causal attention)."""
        for name, t in (extra or {}).items():        # what the variant offers a head to do nothing with
            t = t.detach().float()
            acc = self.nothing.setdefault(layer, {}).setdefault(name, {})
            parts = dict(all=t.mean(-1).sum(0))       # (H,): mean over queries, summed over sequences
            if self._queries is not None:
                parts.update({kind: (t * m.unsqueeze(1)).sum(dim=(0, 2)) for kind, m in self._queries.items()})
            for part, v_ in parts.items():
                acc[part] = acc.get(part, 0) + v_.double().cpu()
        q, k, v, att = q.float(), k.float(), v.float(), att.float()
        kn, vn = k.norm(dim=-1), v.norm(dim=-1)                               # (B, H, T)
        cos_qk0 = (q @ k[:, :, :1].transpose(-2, -1)).squeeze(-1) / (q.norm(dim=-1) * kn[..., :1]).clamp_min(1e-8)
        v0 = vn[..., 0] / vn.mean(-1).clamp_min(1e-30)                         # (B, H)
        sums = dict(
            alpha1=alpha1_sums(att, visible0),                                 # (H,)
            alpha1_prefix=alpha1_sums(att[:, :, :SINK_T], None if visible0 is None else visible0[:, :SINK_T]),
            k0=(kn[..., 0] / kn.mean(-1).clamp_min(1e-30)).mean(1).sum(),
            v0=v0.mean(1).sum(),
            cos_qk0=cos_qk0.mean(-1).mean(1).sum(),
        )
        if self.heads:                                # what each head's output is over positions (sink kinds)
            sums.update(v0_head=v0.sum(0), erank=effective_rank(att @ v).sum(0))
        if self._queries is not None:                 # conditional sink: attention on position 0 by query kind
            for kind, m in self._queries.items():
                sums[f'sink_{kind}'] = (att[..., 0] * m.unsqueeze(1)).sum(dim=(0, 2))     # (H,)
        acc = self.att.setdefault(layer, {})
        for name, v in sums.items():
            acc[name] = acc.get(name, 0) + v.double().cpu()
        recv = att.sum(dim=(1, 2))                   # (B, T) attention received, summed over heads and queries
        self._recv = recv if self._recv is None else self._recv + recv

    def on_down_projection(self, s, inp, out):
        """The super-weight search (Yu et al. 2024) at MLP sublayer s, from its down-projection's input
        inp (B, T, 4d) and output out (B, T, d) (any layout with the batch's sequences first): the entry
        of largest |out| over the probe set (its token and row i*), at that token the input channel j* of
        largest |inp|, and the largest |inp| anywhere."""
        B = self._batch
        a = out.detach().float().abs().reshape(B, -1, out.shape[-1])
        u = inp.detach().float().abs().reshape(B, -1, inp.shape[-1])
        top, idx = a.reshape(-1).max(0)
        best = self.down.get(s)
        if best is None or float(top) > best['out_abs']:
            b, rest = divmod(int(idx), a.shape[1] * a.shape[2])
            t, i = divmod(rest, a.shape[2])
            j = int(u[b, t].argmax())
            best = dict(sublayer=s, row=i, column=j, seq=self.offset + b, position=t, out_abs=float(top),
                        in_abs=float(u[b, t, j]), in_max=best['in_max'] if best else 0.0)
        best['in_max'] = max(best['in_max'], float(u.max()))
        self.down[s] = best


def alpha1_sums(att, visible0=None):
    """Per head, alpha_1 summed over sequences: A[t, 0] averaged over the queries t that can see key 0
    (Gu et al.: the queries that attend causally to it). visible0 (B, T) bool; None: every query, as under
    causal attention, where this is mean_t A[t, 0]; under a sliding window only the queries whose window
    still holds position 0."""
    a0 = att[..., 0]                                                           # (B, H, T)
    if visible0 is None:
        return a0.mean(-1).sum(0)
    vis = visible0.to(a0.dtype).unsqueeze(1)                                   # (B, 1, T)
    return ((a0 * vis).sum(-1) / vis.sum(-1).clamp_min(1)).sum(0)


class Intervention(Observer):
    """Changes a forward pass at one sublayer.

    entries: {stream: (seq, position, channel, new value)} written into the streams after sublayer s
    (zero/mean); the sequence numbers are those of the probe set. soften_k > 0: zero the soften_k
    channels of largest |u| at position 0 of sublayer s's normalised input u (per sequence).
    """

    def __init__(self, s, entries=None, soften_k=0):
        self.s, self.entries, self.soften_k = s, entries or {}, soften_k
        self.offset, self.batch = 0, None

    def begin_batch(self, offset, batch, tokens=None):
        self.offset, self.batch = offset, batch

    def on_input(self, s, u):
        if s != self.s or self.soften_k <= 0:
            return None
        u = u.clone()
        top = u[:, 0, :].abs().topk(min(self.soften_k, u.size(-1)), dim=-1).indices   # (B, k)
        u[:, 0, :] = u[:, 0, :].scatter(-1, top, 0.0)
        return u

    def on_sublayer(self, s, streams):
        if s != self.s or not self.entries:
            return None
        out = {}
        for name, (seq, pos, ch, val) in self.entries.items():
            x = streams[name]
            B, T, _ = x.shape
            keep = (seq >= self.offset) & (seq < self.offset + (self.batch or B)) & (pos < T)
            x = x.clone()
            idx = [t[keep].to(x.device) for t in (seq - self.offset, pos, ch)]
            x[idx[0], idx[1], idx[2]] = val[keep].to(x.device, x.dtype)
            out[name] = x
        return out


class Capture(Observer):
    """Keeps copies of every stream after every sublayer and every sublayer input (tests, notebooks);
    with `edit`, of the changed pass."""

    def __init__(self, edit=None):
        self.edit, self.streams, self.inputs = edit, {}, {}
        if edit is not None:
            edit.begin_batch(0, None)

    def on_input(self, s, u):
        new = None if self.edit is None else self.edit.on_input(s, u)
        self.inputs[s] = (u if new is None else new).detach().clone()
        return new

    def on_sublayer(self, s, streams):
        out = None if self.edit is None else self.edit.on_sublayer(s, streams)
        for name, x in {**streams, **(out or {})}.items():
            self.streams.setdefault(name, {})[s] = x.detach().clone()
        return out

# ----------------------------------------------------------------------------------------------
# Forward passes


def _autocast(device, dtype):
    if dtype == 'bfloat16':
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_batch_size(T):
    """As many sequences as fit 4096 tokens: bounds the explicit attention maps and the logits."""
    return max(1, 4096 // max(T, 1))


@torch.no_grad()
def run_passes(model, x, y=None, observer=None, batch_size=None, dtype='float32', bar=None, task=None):
    """Forward x (N, T) in batches with `observer`; returns (sum of CE over targets, count, task
    answers predicted right (argmax), task answers). y may hold -1 (no target). task: the dataset's
    meta.json when it scores a task (prepare.task_mask), else the last two are 0. Measure and
    Intervention observers get begin_batch (with the batch's tokens) and end_batch."""
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(x.size(1))
    loss_sum, count, hits, answers = 0.0, 0, 0, 0
    for i in range(0, x.size(0), batch_size):
        xb = x[i:i + batch_size].to(device)
        if observer is not None and hasattr(observer, 'begin_batch'):
            observer.begin_batch(i, xb.size(0), xb)
        with _autocast(device, dtype):
            logits = model(xb, observer=observer)[0]
        if observer is not None and hasattr(observer, 'end_batch'):
            observer.end_batch()
        if y is not None:
            yb = y[i:i + batch_size, :xb.size(1)].to(device)
            loss_sum += F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), ignore_index=-1,
                                        reduction='sum').item()
            count += int((yb != -1).sum())
            mask = task_mask(xb, task)
            if mask is not None:
                hits += int(((logits.argmax(-1) == yb) & mask).sum())
                answers += int(mask.sum())
        if bar is not None:
            bar.update(1)
    return loss_sum, count, hits, answers


def n_batches(N, T, batch_size=None):
    return math.ceil(N / (batch_size or default_batch_size(T)))


def attention_summary(obs, n_layer):
    """alpha_1 [L][H] and the per-layer key/value/query numbers from a Measure's attention sums."""
    n = obs.n_seq
    alpha1 = [(obs.att[l]['alpha1'] / n).tolist() for l in range(n_layer)]
    alpha1_prefix = [(obs.att[l]['alpha1_prefix'] / n).tolist() for l in range(n_layer)]
    return dict(
        alpha1=alpha1,
        sink1=sink_rate(alpha1),
        sink_heads=[sum(a > SINK_EPS for a in row) for row in alpha1],
        alpha1_prefix=alpha1_prefix,
        sink1_prefix=sink_rate(alpha1_prefix),
        sink_heads_prefix=[sum(a > SINK_EPS for a in row) for row in alpha1_prefix],
        k0_ratio=[float(obs.att[l]['k0']) / n for l in range(n_layer)],
        v0_ratio=[float(obs.att[l]['v0']) / n for l in range(n_layer)],
        cos_q_k0=[float(obs.att[l]['cos_qk0']) / n for l in range(n_layer)],
        conditional=conditional_sink(obs, n_layer),
        do_nothing=do_nothing(obs, n_layer),
        **(sink_kinds(obs, alpha1) if 'erank' in obs.att[0] else {}),
    )


def sink_kinds(obs, alpha1):
    """Per head ||v_0|| / mean_t ||v_t|| and the effective rank of its output over positions (means over
    sequences), and what each sink head (alpha_1 > SINK_EPS at length T) does: stats.sink_kind."""
    n, L = obs.n_seq, len(alpha1)
    v0 = [(obs.att[l]['v0_head'] / n).tolist() for l in range(L)]
    erank = [(obs.att[l]['erank'] / n).tolist() for l in range(L)]
    heads = [dict(layer=l, head=h, alpha1=a, v0_ratio=v0[l][h], erank=erank[l][h], kind=sink_kind(v0[l][h], erank[l][h]))
             for l, row in enumerate(alpha1) for h, a in enumerate(row) if a > SINK_EPS]
    return dict(v0_ratio_head=v0, erank=erank,
                sink_kinds=dict(thresholds=dict(v0_ratio=NOOP_V0, erank=BROADCAST_RANK), heads=heads))


def do_nothing(obs, n_layer):
    """{channel: {mean: [L][H], trigger: [L][H], other: [L][H]}}: per layer and head the mean over
    queries of what an attention variant offers a head to do nothing with (Observer.on_attention's
    extra: the slot's weight, the registers', the total weight of sigmoid/relu rows, the gate), and,
    with a task, by query kind as for the conditional sink. None for plain attention."""
    if not obs.nothing:
        return None
    out = {}
    for name in obs.nothing[0]:
        sums = [obs.nothing[l][name] for l in range(n_layer)]
        out[name] = dict(mean=[(s_['all'] / obs.n_seq).tolist() for s_ in sums])
        for kind, n in obs.n_queries.items():
            out[name][kind] = [(s_[kind] / n).tolist() for s_ in sums] if n and kind in sums[0] else None
    return out


def conditional_sink(obs, n_layer):
    """The trigger testbed's signature, per layer and head: the mean attention on position 0 from
    trigger queries (whose next token is an answer: the head must act) and from the other queries
    after position 0 (the head should do nothing). None for datasets without a task. A conditional
    sink head sinks only when it must do nothing: other >= COND_OTHER and trigger <= COND_TRIGGER."""
    n = obs.n_queries
    if not n['trigger'] or not n['other']:
        return None
    mean = {kind: [(obs.att[l][f'sink_{kind}'] / n[kind]).tolist() for l in range(n_layer)] for kind in n}
    pairs = [(mean['other'][l][h] - mean['trigger'][l][h], l, h)
             for l in range(n_layer) for h in range(len(mean['other'][l]))]
    gap, l, h = max(pairs)
    return dict(trigger=mean['trigger'], other=mean['other'], n_trigger=n['trigger'], n_other=n['other'],
                heads=[[l_, h_] for _, l_, h_ in pairs if mean['other'][l_][h_] >= COND_OTHER
                       and mean['trigger'][l_][h_] <= COND_TRIGGER],
                thresholds=dict(other=COND_OTHER, trigger=COND_TRIGGER), max_gap=gap, max_gap_head=[l, h])


def uniform_alpha1(T):
    """alpha_1 of uniform causal attention over T tokens: query t gives 1/(t+1) to position 0, so
    mean_t 1/(t+1) = H(T) / T. Above SINK_EPS up to T = 9: a baseline that short prompts must beat."""
    return sum(1 / (t + 1) for t in range(T)) / T


def sink_rate(alpha1):
    """Gu et al.'s Sink_1: percent of (layer, head) pairs with alpha_1 > epsilon."""
    flat = [a for row in alpha1 for a in row]
    return 100.0 * sum(a > SINK_EPS for a in flat) / len(flat)


def _counts(values, limit=32):
    """[[value, count], ...] most frequent first."""
    vals, cnt = np.unique(np.asarray(values), return_counts=True)
    order = np.argsort(-cnt, kind='stable')[:limit]
    return [[int(vals[i]), int(cnt[i])] for i in order]


def stream_summary(accs, cos, sink_pos):
    """Per-sublayer lists and the across-depth summary of one stream (docs/reference.md §4.10 lists them)."""
    chan, pos0, dom, peak = depth_structure(accs)                           # chan, pos0: (S, d)
    per = [a.result(channel=dom) for a in accs]
    S = len(per)
    n_seq = accs[0].n_seq
    lists = {k: [p[k] for p in per] for k in per[0]}
    lists['pos0_cos_next'] = [c / n_seq for c in cos]
    massive_s = [s for s in range(S) if per[s]['n_massive'] > 0]
    largest = None
    for s in massive_s:
        lm = accs[s].largest_massive
        if largest is None or lm[0] > abs(largest['value']):
            largest = dict(sublayer=s, seq=lm[1], position=lm[2], channel=lm[3], value=lm[4])
    ch_counts = sum(a.massive_channels for a in accs)
    pos_counts = sum(a.massive_positions for a in accs)
    pos0_ch = sum(a.massive_pos0 for a in accs)
    ratio = lists['top1_median']
    # co-occurrence: each sequence's largest |x| at the sublayer where top1 peaks vs its sink position
    top_s = int(np.argmax(lists['top1']))
    massive_pos = torch.cat([p for p, _, _ in accs[top_s].seq_top])
    outlier, outlier_s = outlier_ratio(ratio, lists['rms'])
    summary = dict(
        max_top1_median=max(ratio),
        max_top1_median_sublayer=int(np.argmax(ratio)),
        outlier_ratio=outlier,
        outlier_ratio_sublayer=outlier_s,
        start_mass_last=lists['start_mass'][-1],
        top1_median_last=ratio[-1],
        dominant_dim=dom,
        persistence=float(np.mean(chan.argmax(1) == dom)),
        peak_layer=peak,
        peak_feat_ratio=float(chan[peak, dom] / max(lower_median(chan[peak]), 1e-30)),
        bos_concentration=float(pos0[peak, dom] / max(chan[peak, dom], 1e-30)),
        start_mass=lists['start_mass'][peak],
        start_mass_dominant=lists['start_mass_dominant'][peak],
        pos0_cos_mean=float(np.mean(lists['pos0_cos_next'])) if cos else None,
        emergence_sublayer=massive_s[0] if massive_s else None,
        last_sublayer=massive_s[-1] if massive_s else None,
        n_massive_max=max(lists['n_massive']),
        largest_massive=largest,
        massive_channels=[[int(c), int(ch_counts[c])] for c in torch.argsort(-ch_counts, stable=True)[:32]
                          if ch_counts[c] > 0],
        massive_positions=[[int(p), int(pos_counts[p])] for p in torch.argsort(-pos_counts, stable=True)[:32]
                           if pos_counts[p] > 0],
        pos0_massive_channels=[int(c) for c in pos0_ch.nonzero().flatten()],
        cooccurrence=float((massive_pos == sink_pos).double().mean()) if sink_pos is not None else None,
    )
    return dict(per_sublayer=lists, channel_mean_abs=chan.tolist(), pos0_abs=pos0.tolist(),
                summary=summary), massive_pos


@torch.no_grad()
def measure(model, x, y=None, batch_size=None, dtype='float32', bar=None, task=None):
    """The probe's measurement pass on x (N, T): every stream statistic and attention, in batches;
    for a dataset with a task (task: its meta.json), the task accuracy and the conditional sink.
    Returns (result dict, the Measure observer)."""
    obs = Measure(streams=True, attention=True, task=task)
    with watching_down_projections(model, obs):
        loss_sum, count, hits, answers = run_passes(model, x, y, obs, batch_size, dtype, bar, task)
    att = attention_summary(obs, model.config.n_layer)
    T = x.size(1)
    sink_pos = torch.cat(obs.sink_pos)
    info = residual_info(model.config.residual)
    decoded = info['decoded']
    streams, massive_pos = {}, {}
    for name, accs in obs.acc.items():
        streams[name], massive_pos[name] = stream_summary(accs, obs.cos.get(name, []), sink_pos)
        streams[name] = dict(where=stream_where(info, name), **streams[name], registers=None)
        if name in obs.registers:                    # the register slots' own rows: [sublayer][register]
            streams[name]['registers'] = dict(mean_abs=[(m / obs.n_seq).tolist() for m, _ in obs.registers[name]],
                                              max_abs=[top.tolist() for _, top in obs.registers[name]])
    attention = dict(T=T, prefix_T=min(T, SINK_T), epsilon=SINK_EPS, short_T=T < SINK_T,
                     uniform_alpha1_prefix=uniform_alpha1(min(T, SINK_T)), uniform_alpha1=uniform_alpha1(T), **att,
                     sink_positions=_counts(sink_pos.numpy()),
                     massive_positions=_counts(massive_pos[decoded].numpy()),
                     cooccurrence=streams[decoded]['summary']['cooccurrence'])
    result = dict(residual=info, val_loss=loss_sum / count if count else None,
                  task_acc=hits / answers if answers else None, task_answers=answers,
                  streams=streams, attention=attention, fp16=fp16_headroom(obs),
                  super_weight=super_weight(model, obs, streams[decoded]))
    return result, obs


def fp16_headroom(obs):
    """The largest |x| over every measured stream and view, sublayer, sequence, position and channel,
    where it is, and the float16 headroom FP16_MAX / max|x| (below 1: that entry overflows in float16)."""
    (top, seq, pos, ch, _), name, s = max(((a.largest, name, s) for name, accs in obs.acc.items()
                                           for s, a in enumerate(accs)), key=lambda e: e[0][0])
    return dict(max_abs=top, stream=name, sublayer=s, seq=seq, position=pos, channel=ch, fp16_max=FP16_MAX,
                headroom=FP16_MAX / top if top > 0 else None)


def down_projections(model):
    """({MLP sublayer s: its down-projection, an nn.Linear whose weight is d x 4d}, None), or ({}, why
    there is none): ours and GPT-2 (lab/gpt2.py) have MLP.proj; lab/hf.py's wrapper knows its families'."""
    if hasattr(model, 'down_projections'):
        return model.down_projections()
    subs = getattr(model, 'sublayers', None)
    if subs is None:
        return {}, f"{type(model).__name__} does not say where its MLP down-projections are"
    return {s: sub.fn.proj for s, sub in enumerate(subs) if s % 2 == 1}, None


@contextlib.contextmanager
def watching_down_projections(model, obs):
    """Inside the block, every forward of an MLP down-projection calls obs.on_down_projection(s, input, output)."""
    projs, _ = down_projections(model)
    handles = [lin.register_forward_hook(lambda m, args, out, s=s: obs.on_down_projection(s, args[0], out))
               for s, lin in projs.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


SUPER_RULE = ("per MLP sublayer, at the token of its down-projection's largest |output| (row i*), the input "
              "channel j* of largest |input|: W[i*, j*]; chosen: the candidate with the largest |output| among "
              "the MLP sublayers up to the decoded stream's top1 peak (all of them if the peak comes first)")


def super_weight(model, obs, decoded):
    """The super-weight candidate of every MLP sublayer (Measure.on_down_projection; weight read from
    the model now) and the chosen one, by SUPER_RULE; decoded: the decoded stream's measure() entry."""
    projs, why = down_projections(model)
    if why or not obs.down:
        return dict(rule=SUPER_RULE, note=why or "no MLP down-projection ran", peak_sublayer=None,
                    candidates=None, chosen=None)
    cands = [dict(obs.down[s], weight=float(projs[s].weight[obs.down[s]['row'], obs.down[s]['column']]))
             for s in sorted(obs.down)]
    peak = int(np.argmax(decoded['per_sublayer']['top1']))
    chosen = max([c for c in cands if c['sublayer'] <= peak] or cands, key=lambda c: c['out_abs'])
    return dict(rule=SUPER_RULE, note=None, peak_sublayer=peak, candidates=cands, chosen=chosen)


def stream_where(info, name):
    """What a measured stream is, in words, from the operator's own descriptions (residual_info)."""
    if name in info['streams']:
        return f"{info['streams'][name]}, after each sublayer" + (" (decoded)" if name == info['decoded'] else "")
    return info['views'].get(name, name)


def measure_overhead(model, idx, repeats=3):
    """(plain seconds, instrumented seconds): a plain forward of idx (N, T) vs the probe's
    measurement of idx (every statistic, explicit attention), both in one batch; best of `repeats`
    alternating runs, the least disturbed by other processes. The goal: at most 1.5x."""
    device = next(model.parameters()).device

    def timed(fn):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    plain, instrumented = [], []
    with torch.no_grad():
        for i in range(repeats + 1):   # the first round warms up
            p = timed(lambda: model(idx))
            m = timed(lambda: measure(model, idx, batch_size=idx.size(0)))
            if i > 0:
                plain.append(p)
                instrumented.append(m)
    return min(plain), min(instrumented)

# ----------------------------------------------------------------------------------------------
# Interventions


def fake_quantize(x, bits, dim):
    """Symmetric round-to-nearest fake quantisation with one scale per slice: q = 2^(bits-1) - 1, scale =
    max|x| over `dim` / q, x -> clamp(round(x / scale), -q, q) * scale; computed in float32 (float64
    stays), returned in x's dtype. An all-zero slice stays zero."""
    f = x.to(torch.promote_types(x.dtype, torch.float32))
    qmax = 2 ** (bits - 1) - 1
    scale = f.abs().amax(dim=dim, keepdim=True) / qmax
    return ((f / scale.clamp_min(1e-30)).round().clamp(-qmax, qmax) * scale).to(x.dtype)


@contextlib.contextmanager
def fake_quantized(model, bits):
    """All nn.Linear weights fake-quantised to `bits` (symmetric, per output channel) inside the
    block; the exact original weights are copied back afterwards, even on errors."""
    linears = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    saved = {k: w.detach().clone() for k, w in linears.items()}
    try:
        with torch.no_grad():
            for w in linears.values():
                w.copy_(fake_quantize(w, bits, dim=1))
        yield model
    finally:
        with torch.no_grad():
            for k, w in linears.items():
                w.copy_(saved[k])


class QuantizedInputs(Observer):
    """The activation half of W8A8: inside `applied(model)` every nn.Linear's input is fake-quantised per
    tensor, one tensor per sequence (all of its T x d_in entries share scale = max|x| / q, as when the
    model serves that sequence alone, so --batch_size changes nothing). As a Measure's edit it learns
    from begin_batch how many sequences an input holds (OPT's MLP in lab/hf.py runs on (B*T, d));
    otherwise a 3-D input's first axis is its sequences and a 2-D input is one tensor."""

    def __init__(self, bits=8):
        self.bits, self.batch = bits, None

    def begin_batch(self, offset, batch, tokens=None):
        self.batch = batch

    def _hook(self, module, args):
        x = args[0]
        B = self.batch or (x.shape[0] if x.dim() >= 3 else 1)
        return (fake_quantize(x.reshape(B, -1), self.bits, dim=1).reshape(x.shape),) + tuple(args[1:])

    @contextlib.contextmanager
    def applied(self, model):
        handles = [m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            yield model
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def zeroed_weight(linear, row, column):
    """linear.weight[row, column] = 0 inside the block; the exact value is put back afterwards."""
    saved = linear.weight[row, column].detach().clone()
    try:
        with torch.no_grad():
            linear.weight[row, column] = 0
        yield linear
    finally:
        with torch.no_grad():
            linear.weight[row, column] = saved


def intervention_targets(result, measure_obs, soften_k=None):
    """Where and what the zero/mean/soften interventions change, from the census.

    The massive entries are taken at the emergence sublayer of the operator's own streams (h; or D
    and C — views such as the ledger's `read` are derived from them, so they are never edited
    directly); when several streams emerge at the same sublayer all of them are edited. Without any massive entry, the fallback is each sequence's
    largest |x| at the sublayer where the stream's top1 peaks, in the stream with the largest top1.
    mean: every target entry is set to the mean of the target entries of its channel.
    soften: the same sublayer's input, top-k channels of position 0; k = soften_k, else the number
    of channels massive at position 0 in the edited streams (at least 1).
    """
    streams = result['streams']
    own = [n for n in result['residual']['streams'] if n in streams]
    emerging = {n: streams[n]['summary']['emergence_sublayer'] for n in own
                if streams[n]['summary']['emergence_sublayer'] is not None}
    if emerging:
        s = min(emerging.values())
        names = [n for n in own if emerging.get(n) == s]
        entries = {}
        for n in names:
            es, batches = measure_obs.first[n]
            assert es == s
            entries[n] = tuple(torch.cat([b[i] for b in batches]) for i in range(4))
        pos0 = sorted({c for n in names for c in streams[n]['summary']['pos0_massive_channels']})
        k = soften_k or max(1, len(pos0))
        fallback = False
    else:
        name = max(own, key=lambda n: max(streams[n]['per_sublayer']['top1']))
        top1 = streams[name]['per_sublayer']['top1']
        s = int(np.argmax(top1))
        names = [name]
        pos, ch, val = (torch.cat(t) for t in zip(*measure_obs.acc[name][s].seq_top))
        entries = {name: (torch.arange(len(pos)), pos, ch, val)}
        k = soften_k or 1
        fallback = True
    means, channel_means = {}, {}
    for n, (seq, pos, ch, val) in entries.items():
        mean_val = val.clone()
        for c in ch.unique():
            mean_val[ch == c] = val[ch == c].double().mean().float()
            channel_means[f"{n}:{int(c)}"] = float(mean_val[ch == c][0])
        means[n] = (seq, pos, ch, mean_val)
    zeros = {n: (seq, pos, ch, torch.zeros_like(val)) for n, (seq, pos, ch, val) in entries.items()}
    where = f"{'+'.join(names)} after s={s} ({sublayer_name(s)})"
    n_entries = sum(len(e[0]) for e in entries.values())
    chans = sorted({int(c) for e in entries.values() for c in e[2]})
    what = f"{n_entries} {'top-1 (no massive) ' if fallback else 'massive '}entries, channels {short(chans)}"
    shown = ', '.join(f"{c} {m:.4g}" for c, m in list(channel_means.items())[:4])
    return dict(
        zero=(Intervention(s, zeros), f"{where}: {what} -> 0"),
        mean=(Intervention(s, means), f"{where}: {what} -> their channel's mean ({shown})"),
        soften=(Intervention(s, soften_k=k), f"input u of s={s}, position 0: top-{k} channel(s) by |u| -> 0"),
        fallback=fallback, sublayer=s, streams=names, n_entries=n_entries, soften_k=k,
    )


@contextlib.contextmanager
def w8a8(model, act):
    """W8A8: weights per output channel (fake_quantized) and inputs per tensor (act, a QuantizedInputs)."""
    with fake_quantized(model, act.bits), act.applied(model):
        yield model


def intervention_runs(model, targets, chosen):
    """[(name, edit observer, target in words, context manager factory, why it does not apply)] in the
    order of the report; chosen: the super-weight candidate (super_weight()['chosen']) or None."""
    runs = []
    for name in ('zero', 'mean', 'soften'):
        edit = targets[name][0]
        why = getattr(model, 'cannot_edit', None) and edit.entries and model.cannot_edit(edit.s)
        runs.append((name, edit, targets[name][1], None, why or None))  # why: e.g. hf.py's parallel partial sums
    for b in (8, 4):
        runs.append((f'quant{b}', None, f"all nn.Linear weights fake-quantised to {b} bits (symmetric, per output "
                     "channel)", lambda b=b: fake_quantized(model, b), None))
    act = QuantizedInputs(8)
    runs.append(('w8a8', act, "quant8, and every nn.Linear's input fake-quantised to 8 bits per tensor (one scale "
                 "per sequence: max|x| / 127)", lambda: w8a8(model, act), None))
    if chosen is None:
        runs.append(('super_weight', None, None, None, "no super-weight candidate (see super_weight.note)"))
    else:
        lin = down_projections(model)[0][chosen['sublayer']]
        runs.append(('super_weight', None, f"the super weight W[{chosen['row']}, {chosen['column']}] = "
                     f"{chosen['weight']:.4g} of s={chosen['sublayer']}'s MLP down-projection -> 0",
                     lambda: zeroed_weight(lin, chosen['row'], chosen['column']), None))
    return runs


def stream_outlier(accs, name, down=None):
    """The outlier of one stream (its outlier_ratio, §4.2, and largest |x|) from its accumulators, and
    down: the largest |output| of the super weight's down-projection (None: not watched)."""
    per = [a.result() for a in accs]
    ratio, s = outlier_ratio([p['top1_median'] for p in per], [p['rms'] for p in per])
    return dict(stream=name, outlier_ratio=ratio, outlier_ratio_sublayer=s, max_abs=max(a.largest[0] for a in accs),
                down_out_abs=down)


def run_interventions(model, x, y, result, measure_obs, soften_k=None, batch_size=None,
                      dtype='float32', bar=None, task=None):
    """Validation loss, Sink_1 (full length and first 64 tokens) and the task accuracy (datasets
    with a task) under each intervention; for the super weight's, also the decoded stream's outlier."""
    base_loss = result['val_loss']
    att = result['attention']
    decoded, chosen = result['residual']['decoded'], result['super_weight']['chosen']
    out = dict(none=dict(target='unmodified model', val_loss=base_loss,
                         delta_loss=None if base_loss is None else 0.0,
                         sink1_prefix=att['sink1_prefix'], sink1=att['sink1'], task_acc=result['task_acc'],
                         outlier=stream_outlier(measure_obs.acc[decoded], decoded,
                                                chosen and chosen['out_abs'])))
    targets = intervention_targets(result, measure_obs, soften_k)
    for name, edit, target, applied, why in intervention_runs(model, targets, chosen):
        if why:
            out[name] = dict(target=f"does not apply: {why}", val_loss=None, delta_loss=None, sink1_prefix=None,
                             sink1=None, task_acc=None, outlier=None)
            continue
        sw = name == 'super_weight'
        obs = Measure(streams=(decoded,) if sw else False, attention=True, edit=edit, task=task, heads=False)
        with (applied() if applied else contextlib.nullcontext()), \
                (watching_down_projections(model, obs) if sw else contextlib.nullcontext()):
            loss_sum, count, hits, answers = run_passes(model, x, y, obs, batch_size, dtype, bar, task)
        att = attention_summary(obs, model.config.n_layer)
        loss = loss_sum / count if count else None
        out[name] = dict(target=target, val_loss=loss,
                         delta_loss=None if loss is None or base_loss is None else loss - base_loss,
                         sink1_prefix=att['sink1_prefix'], sink1=att['sink1'],
                         task_acc=hits / answers if answers else None,
                         outlier=stream_outlier(obs.acc[decoded], decoded, obs.down[chosen['sublayer']]['out_abs'])
                         if sw else None)
    for name in ('zero', 'mean'):
        out[name].update({k: targets[k] for k in ('fallback', 'sublayer', 'streams', 'n_entries')})
    out['soften'].update(sublayer=targets['sublayer'], k=targets['soften_k'])
    return out
