"""
Massive activations and attention sinks, measured (definitions: docs/reference.md §4).

    python probe.py out/ckpt.pt [more.pt ...] [--out DIR] [--num_seqs N] [--seq_len T]
                    [--text "..." ...] [--interventions] [--soften_k K] [--seed S] [--doc_aligned]
                    [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16] [--batch_size B]
                    [--trust_checkpoint] [--base_url URL] [--data_root DIR]
    python probe.py gpt2 out/ledger_160m/ckpt.pt            # OpenAI GPT-2 (fetched once) next to a checkpoint
    python probe.py out/ckpt.pt hf:EleutherAI/pythia-160m    # any Hugging Face causal LM (hf.py) next to it
    python probe.py hf:EleutherAI/pythia-160m@step1000,step8000   # its revisions, also drawn as a run
    python probe.py out/run/snapshots/*.pt                  # a run's snapshots (named run_i000100, ...)
    python probe.py out/run_a [out/run_b/log.jsonl ...]     # training runs: trajectories from log.jsonl
    python probe.py --group vanilla=a.pt,b.pt,c.pt --group ledger=d.pt,e.pt,f.pt   # seeds, statistics

Three modes, by input (input_kind): checkpoint files are probed (below); training runs (an out_dir
holding log.jsonl, or a .jsonl file) are read, not run; --group probes checkpoints and compares
groups. Runs and checkpoints cannot be mixed in one command. Bad input: one line and exit code 2.
Wherever a checkpoint goes, OpenAI GPT-2 can go too: a name (gpt2, gpt2-medium, gpt2-large,
gpt2-xl; prepare.fetch_gpt2 downloads config.json + model.safetensors once into
<data_root>/gpt2/<name>/, resumable, then offline) or a folder holding a GPT-2 config.json and
model.safetensors; model.load_gpt2 loads them into model.GPT (docs/reference.md §6). Without --text GPT-2 is
probed on validation windows of the built-in corpus (built on first use), and the report says so.
So can any decoder-only causal LM that transformers loads (hf.py; transformers is imported only
then): hf:REPO_OR_FOLDER[@REVISION], hf:REPO@a,b,c for several revisions. It is probed with its own
tokenizer and BOS convention, on --text or on the built-in corpus' validation documents tokenised by
it; revisions that name a step (step1000, checkpoint-500) of one model are also drawn as a training
run against that step (trajectory.json, trajectory_*.png). docs/reference.md §4.9 says what its
sublayers are.

For each checkpoint: N windows of T tokens from the validation shards of the checkpoint's dataset
(prepare.Sampler, fixed seed, so every checkpoint of one dataset sees the same windows), or the
--text prompts. Several prompts are truncated to the shortest one so that they stack into one
batch; nothing is prepended (write <|endoftext|> into a prompt to start it with that token).

What is measured (the names are those of docs/reference.md §4; stats.py computes the per-stream ones):
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
- attention, from softmax probabilities computed explicitly and reduced on the fly: alpha_1 =
  mean_t A[t, 0] per layer and head, Sink_1 = % of (layer, head) with alpha_1 > 0.3 on the first
  64 tokens (Gu et al.) and at the full length, ||k_0|| / mean_t
  ||k_t||, ||v_0|| / mean_t ||v_t||, mean_t cos(q_t, k_0) (q, k after QK-norm when the model has it),
  and whether each sequence's massive-activation position is its sink position.
- --interventions: validation loss and Sink_1 with the massive entries zeroed, set to their mean,
  with the emergence sublayer's input softened, and with all Linear weights fake-quantised to
  8 and 4 bits. The model is left bitwise unchanged.

Sublayer s is block s // 2 (0-based), "layer" s // 2 + 1 (1-based), attention when s is even.
Averages over sequences: alpha_1 is averaged over sequences before the 0.3 threshold; the profile
(top-k, median) is per sequence, then averaged; n_massive counts entries over all N sequences.

Training runs (trajectories) and --group (statistics over runs): runs.py says what is computed and
holds trajectory.json's key tree.

Outputs: a text report on stdout, DIR/probe.json, and PNGs in DIR named <checkpoint>_*.png
(layerwise, tokens_channels, pos0_depth, alpha1) plus overlay_top1_median.png for several
checkpoints (groups.png instead in --group mode); for runs DIR/trajectory.json and PNGs
trajectory_<stream>.png, trajectory_loss.png, trajectory_heatmap_<run>.png (plots.py draws them all).
probe.json (tests/test_probe.py checks that every key below is there):

    args                  the command line options
    checkpoints[]         one entry per checkpoint, in command-line order
      path                the checkpoint file
      name                short name used in tables and PNG file names
      iter_num            training step of the checkpoint (None for GPT-2 weights; hf: the revision's step or None)
      tokens              tokens seen in training (None for checkpoints that do not say)
      weights             None for a train.py checkpoint; GPT-2: {kind: 'gpt2', folder, dtype, name}; hf: see hf.load
      model_args          GPTConfig fields
      kind                the model in a few words: operator, QK-norm, attention variant (model_kind)
      residual            the residual operator, as the class describes itself (model.residual_info)
        name              its key in model.RESIDUALS
        decoded           the stream the LM head reads
        streams           stream name -> what it holds, in state order
        views             name -> what it is, for tensors derived from the state (may be empty)
        has_gates         whether it has commit gates (a commit rate, the sparsity penalty)
      params              parameter count
      device              where the probe ran, and dtype: float32 or bfloat16 (autocast)
      data                what was probed
        source            'val' (validation shards) or 'text' (--text prompts)
        dataset           the checkpoint's dataset (None for text; 'builtin' for GPT-2)
        shards            validation shard files used (empty for text)
        texts             the prompts (empty for val)
        truncated_from    token count of each prompt before truncation (empty for val)
        num_seqs          N
        seq_len           T
        seed              Sampler seed
        doc_aligned       windows start at <|endoftext|>
        bos               the token that starts a document (50256 <|endoftext|>; 0 for the trigger language)
        bos_at_pos0       fraction of sequences whose position 0 holds it
        bos_prepended     whether the probe put a BOS at position 0 (hf: models whose tokenizer does; never ours)
        bos_note          hf: what position 0 is, in words; None for ours
        task              the dataset's meta.json when it scores a task (the trigger language), else None
      sublayers[]         one entry per sublayer: s, block (0-based), layer (1-based), kind (attn|mlp)
        s
        block
        layer
        kind
      val_loss            mean next-token cross-entropy over the probe windows (None: no targets)
      task_acc            datasets with a task (trigger): argmax accuracy on the answers (None: no task)
      task_answers        how many answers it was measured on
      streams             stream and view name -> statistics (h; or D, C, read)
        <stream>
          where           what the stream is and when it is measured
          per_sublayer    lists over the 2L sublayers
            top1          Sun profile: largest |x| per sequence, averaged over sequences
            top2
            top3
            median        median |x| over the T x d entries, averaged over sequences
            top1_median   top1 / median
            n_massive     Sun census: massive entries at this sublayer, all sequences together
            max_entry     largest |x| entry: {seq, position, channel, value}
            kurtosis      excess kurtosis over channels per token, averaged
            feat_maxmed   max / median of the per-channel mean |x|
            n_out50       channels with |x| >= 50 x the token's median, averaged over tokens
            top_channel   channel with the largest mean |x|
            start_mass    share of |x| on position 0: sum_c |x[0,c]| / sum_t,c |x[t,c]|, averaged over sequences
            start_mass_dominant  the same for dominant_dim alone: |x[0,c*]| / sum_t |x[t,c*]|
            pos0_cos_next cos(x_s[0], x_{s+1}[0]) averaged over sequences (2L - 1 values)
          channel_mean_abs   [2L][d] mean |x| per channel over all tokens
          pos0_abs           [2L][d] mean |x| per channel at position 0
          registers          None without n_registers; else the register slots (in no other statistic)
            mean_abs         [2L][R] mean |x| of each register slot
            max_abs          [2L][R] largest |x| of each register slot
          summary
            max_top1_median            largest top1/median over depth ...
            max_top1_median_sublayer   ... and where
            dominant_dim               channel with the highest mean |x| over depth
            persistence                fraction of sublayers whose top channel is dominant_dim
            peak_layer                 sublayer where dominant_dim is largest (first on ties)
            peak_feat_ratio            dominant_dim's mean |x| / median channel's, at peak_layer
            bos_concentration          dominant_dim's mean |x| at position 0 / over all positions, at peak_layer
            start_mass                 start_mass at peak_layer
            start_mass_dominant        start_mass_dominant at peak_layer
            pos0_cos_mean              mean of pos0_cos_next
            emergence_sublayer         first sublayer with a massive entry (None: none)
            last_sublayer              last sublayer with a massive entry
            n_massive_max              largest per-sublayer n_massive
            largest_massive            {sublayer, seq, position, channel, value} or None
            massive_channels           [[channel, entries over all sublayers], ...], most first
            massive_positions          [[position, entries over all sublayers], ...], most first
            pos0_massive_channels      channels that are massive at position 0 at some sublayer
            cooccurrence               share of sequences whose massive position is the sink position
      attention
        T                 full sequence length
        prefix_T          length of the Sink_1 pass (64, or T if shorter)
        epsilon           0.3
        short_T           True when prefix_T < 64: alpha_1 and Sink_1 are not comparable with Gu et al.'s (the report warns)
        uniform_alpha1_prefix  alpha_1 of uniform causal attention on prefix_T tokens: H(prefix_T) / prefix_T (0.457 at 5)
        uniform_alpha1    the same at T (H(n) = 1 + 1/2 + ... + 1/n; above epsilon up to T = 9, 0.074 at 64)
        alpha1            [L][H] alpha_1 at length T
        alpha1_prefix     [L][H] alpha_1 on the first prefix_T tokens
        sink1             Sink_1 at length T, percent
        sink1_prefix      Sink_1 on the first prefix_T tokens, percent (Gu et al.'s number)
        sink_heads        [L] heads with alpha_1 > epsilon, at length T
        sink_heads_prefix [L] the same on the prefix
        k0_ratio          [L] ||k_0|| / mean_t ||k_t||, mean over heads and sequences
        v0_ratio          [L] ||v_0|| / mean_t ||v_t||
        cos_q_k0          [L] mean_t cos(q_t, k_0)
        sink_positions    [[position, sequences], ...]: argmax over keys of the attention received
        massive_positions [[position, sequences], ...]: each sequence's largest |x| at the decoded stream's top1 peak
        cooccurrence      share of sequences where the two coincide (decoded stream)
        conditional       None without a task; else the conditional sink (trigger testbed):
          trigger         [L][H] mean attention on position 0 from trigger queries (next token: an answer)
          other           [L][H] the same from every other query after position 0
          n_trigger       trigger queries measured
          n_other         other queries measured
          heads           [[layer, head], ...] with other >= 0.5 and trigger <= 0.1: conditional sink heads
          thresholds      {other: 0.5, trigger: 0.1}
          max_gap         the largest other - trigger over heads ...
          max_gap_head    ... and its [layer, head]
        do_nothing        None for plain attention; else per do-nothing channel of the variant (report.DO_NOTHING)
          <channel>
            mean          [L][H] mean over queries and sequences
            trigger       [L][H] over the trigger queries (None without a task)
            other         [L][H] over the other queries after position 0 (None without a task)
      interventions       None without --interventions; else name -> result for
        <intervention>    none, zero, mean, soften, quant8, quant4
          target          what was changed, in words
          val_loss
          delta_loss      val_loss - the unmodified model's
          sink1_prefix
          sink1
          task_acc        None without a task
    comparison            None for one checkpoint; else the side-by-side table
      columns             checkpoint names
      rows                [[label, [value per checkpoint]], ...]
    groups                None without --group; else
      names               group names, in command-line order
      members             group -> checkpoint names
      methods             how the pairs below are computed (runs.py says more)
        level             0.95, of every interval
        interval          Welch's t interval of d = mean(B) - mean(A), in words
        p                 Welch's two-sided p, in words
        permutation       statistic, max_exact, permutations, seed
        holm              which p-values are Holm-adjusted, over which metrics
        hedges_g          its formula
        bca               min_runs (8), resamples, seed
        min_runs          3: fewer runs in a group get a note that intervals and tests are weak
        alpha             0.05: the text and groups.png mark p_holm below it
      metrics             metric -> statistics (a metric no group measured is left out)
        <metric>
          per_group       group -> its runs
            <group>
              n           runs that measured the metric
              values      one per run (None: not measured)
              mean
              std         sample std (ddof 1); None for one run
              note        e.g. 'one run: no std, no interval'; None from 3 runs
          pairs[]         one per pair of groups A, B with A listed first
            a
            b
            n_a           runs of A that measured the metric
            n_b
            diff          d = mean(B) - mean(A)
            ci            [low, high] Welch's 95% interval of d; None with one run in a group or no spread
            p             Welch's two-sided p (the headline test); None when ci is
            df            Welch-Satterthwaite degrees of freedom
            p_holm        p Holm-adjusted over the metrics of this pair that have a p
            p_perm        two-sided permutation p of |d|; None with one run in a group
            p_perm_holm   p_perm Holm-adjusted over the metrics of this pair that have one
            test          'exact: N splits (all)' or 'random: N random permutations'
            p_perm_min    the smallest p_perm this test can give (2/20 = 0.1 at 3 vs 3)
            hedges_g      Hedges' g; None with one run in a group or no spread
            ci_bca        [low, high] 95% BCa bootstrap interval of d; None below 8 runs in a group
            note          why something is None, and a warning below 3 runs; None when nothing to say

The per-stream statistics live in stats.py, so that train.py logs the same numbers during training
(activation_stats) that the probe reports afterwards.
"""

import contextlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Observer, residual_info, resolve_device
from lab.plots import plot_checkpoint, plot_groups, plot_overlay, plot_trajectories   # matplotlib loads on first use
from lab.groups import group_statistics, groups_text
from lab.trajectories import THRESHOLDS, jsonable, read_run, trajectory_text, write_trajectories
from lab.cli import OneLineParser
from lab.data import EOT, task_mask
from lab.report import comparison, comparison_text, model_kind, report, short, sublayer_name
from lab.stats import COND_OTHER, COND_TRIGGER, SINK_EPS, SINK_T, SublayerAccumulator, depth_structure, lower_median

# ----------------------------------------------------------------------------------------------
# Observers: measure a forward pass, or change it (interventions)


class Measure(Observer):
    """Everything the probe measures in one forward pass, reduced while the pass runs.

    streams=True: a SublayerAccumulator per stream and sublayer, position-0 cosines, the massive
    entries at each batch's first massive sublayer (the interventions' targets), and |x| of
    sequence 0 (float16, for the heatmap). attention=True: alpha_1, key/value norms, cos(q, k_0) and
    the attention each key receives, from explicit probabilities. alpha_1 on the first SINK_T tokens
    comes from the same maps: under causal attention the first 64 queries of a pass see exactly what
    a pass on x[:, :64] sees (a test checks it against such a pass). `edit` (an Intervention)
    changes the pass; what is measured is the changed pass. Call begin_batch/end_batch around each
    forward (run_passes does).

    task (the dataset's meta.json, for a dataset with a task such as the trigger language): the
    conditional sink as well, per layer and head the attention on position 0 from the queries whose
    next token is an answer (trigger positions) and from all other queries after position 0.
    """

    def __init__(self, streams=True, attention=True, edit=None, task=None):
        self.streams = streams
        self.attention = attention
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

    def on_attention(self, layer, q, k, v, att, extra=None):
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
        sums = dict(
            alpha1=att[..., 0].mean(-1).sum(0),                                # (H,)
            alpha1_prefix=att[..., :SINK_T, 0].mean(-1).sum(0),
            k0=(kn[..., 0] / kn.mean(-1).clamp_min(1e-30)).mean(1).sum(),
            v0=(vn[..., 0] / vn.mean(-1).clamp_min(1e-30)).mean(1).sum(),
            cos_qk0=cos_qk0.mean(-1).mean(1).sum(),
        )
        if self._queries is not None:                 # conditional sink: attention on position 0 by query kind
            for kind, m in self._queries.items():
                sums[f'sink_{kind}'] = (att[..., 0] * m.unsqueeze(1)).sum(dim=(0, 2))     # (H,)
        acc = self.att.setdefault(layer, {})
        for name, v in sums.items():
            acc[name] = acc.get(name, 0) + v.double().cpu()
        recv = att.sum(dim=(1, 2))                   # (B, T) attention received, summed over heads and queries
        self._recv = recv if self._recv is None else self._recv + recv


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
    )


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
    """Per-sublayer lists and the across-depth summary of one stream (see the module docstring)."""
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
    summary = dict(
        max_top1_median=max(ratio),
        max_top1_median_sublayer=int(np.argmax(ratio)),
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
                  streams=streams, attention=attention)
    return result, obs


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


@contextlib.contextmanager
def fake_quantized(model, bits):
    """All nn.Linear weights fake-quantised to `bits` (symmetric, per output channel) inside the
    block; the exact original weights are copied back afterwards, even on errors."""
    qmax = 2 ** (bits - 1) - 1
    linears = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    saved = {k: w.detach().clone() for k, w in linears.items()}
    try:
        with torch.no_grad():
            for w in linears.values():
                scale = w.abs().amax(dim=1, keepdim=True).float() / qmax
                q = (w.float() / scale.clamp_min(1e-30)).round().clamp(-qmax, qmax) * scale
                w.copy_(q.to(w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for k, w in linears.items():
                w.copy_(saved[k])


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


def run_interventions(model, x, y, result, measure_obs, soften_k=None, batch_size=None,
                      dtype='float32', bar=None, task=None):
    """Validation loss, Sink_1 (full length and first 64 tokens) and the task accuracy (datasets
    with a task) under each intervention."""
    base_loss = result['val_loss']
    att = result['attention']
    out = dict(none=dict(target='unmodified model', val_loss=base_loss,
                         delta_loss=None if base_loss is None else 0.0,
                         sink1_prefix=att['sink1_prefix'], sink1=att['sink1'], task_acc=result['task_acc']))
    targets = intervention_targets(result, measure_obs, soften_k)
    runs = [(name, targets[name][0], targets[name][1], None) for name in ('zero', 'mean', 'soften')]
    runs += [(f'quant{b}', None, f"all nn.Linear weights fake-quantised to {b} bits (symmetric, per output channel)", b)
             for b in (8, 4)]
    for name, edit, target, bits in runs:
        why = getattr(model, 'cannot_edit', None) and edit is not None and edit.entries and model.cannot_edit(edit.s)
        if why:   # e.g. a parallel block's partial sum (hf.py): no tensor to edit, so no number either
            out[name] = dict(target=f"does not apply: {why}", val_loss=None, delta_loss=None, sink1_prefix=None,
                             sink1=None, task_acc=None)
            continue
        with (fake_quantized(model, bits) if bits else contextlib.nullcontext()):
            obs = Measure(streams=False, attention=True, edit=edit, task=task)
            loss_sum, count, hits, answers = run_passes(model, x, y, obs, batch_size, dtype, bar, task)
        att = attention_summary(obs, model.config.n_layer)
        loss = loss_sum / count if count else None
        out[name] = dict(target=target, val_loss=loss,
                         delta_loss=None if loss is None or base_loss is None else loss - base_loss,
                         sink1_prefix=att['sink1_prefix'], sink1=att['sink1'],
                         task_acc=hits / answers if answers else None)
    for name in ('zero', 'mean'):
        out[name].update({k: targets[k] for k in ('fallback', 'sublayer', 'streams', 'n_entries')})
    out['soften'].update(sublayer=targets['sublayer'], k=targets['soften_k'])
    return out

# ----------------------------------------------------------------------------------------------
# Data


def val_windows(ckpt, num_seqs, seq_len, seed, doc_aligned=False):
    """num_seqs windows (x, y) of seq_len tokens from the validation shards of the checkpoint's
    dataset, the same for every checkpoint trained on that dataset. The dataset's meta.json says
    which token starts a document and whether windows must start there (the trigger language);
    a dataset with a task (the trigger language) is recorded as data['task'], its meta.json."""
    from lab.data import Sampler, dataset_meta, shard_paths
    cfg = ckpt.get('config') or {}
    if not isinstance(cfg, dict) or not cfg.get('dataset'):
        raise ValueError("the checkpoint's config names no dataset; pass --text \"...\" prompts instead")
    paths = shard_paths(cfg['dataset'], 'val', cfg.get('data_root'))
    meta = dataset_meta(cfg['dataset'], cfg.get('data_root')) or {}
    doc_aligned = doc_aligned or bool(meta.get('doc_aligned'))
    bos = meta.get('bos', EOT)
    x, y = Sampler(paths, num_seqs, seq_len, seed, doc_aligned=doc_aligned, bos=bos).get(0)
    data = dict(source='val', dataset=cfg['dataset'], shards=paths, texts=[], truncated_from=[],
                num_seqs=num_seqs, seq_len=seq_len, seed=seed, doc_aligned=doc_aligned, bos=bos,
                task=meta if task_mask(x[:1], meta) is not None else None)
    return x, y, data


def text_windows(texts, seq_len):
    """The prompts tokenised with GPT-2 BPE (<|endoftext|> allowed), truncated to seq_len and to the
    shortest prompt so they stack; targets are the next tokens, -1 after the last one."""
    from lab.data import gpt2_encoding, prompt_windows
    enc = gpt2_encoding()
    toks = [enc.encode(t, allowed_special={'<|endoftext|>'}) for t in texts]
    x, y = prompt_windows(toks, seq_len)
    data = dict(source='text', dataset=None, shards=[], texts=list(texts), num_seqs=len(texts), seq_len=x.size(1),
                seed=None, doc_aligned=False, bos=EOT, task=None, truncated_from=[len(t) for t in toks])
    return x, y, data

# ----------------------------------------------------------------------------------------------
# Command line


def input_kind(path):
    """'run' (a training run: a folder holding log.jsonl, or a .jsonl file), 'hf' (hf:REPO_OR_FOLDER
    [@REVISION], read by hf.py), 'gpt2' (a name in prepare.GPT2_MODELS, or a folder holding
    config.json / model.safetensors) or 'checkpoint' (any other path; a missing file is reported by
    the checkpoint loader). One place for kinds of input."""
    from lab.download import GPT2_MODELS
    if path.startswith('hf:'):
        return 'hf'
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, 'log.jsonl')):
            return 'run'
        if any(os.path.isfile(os.path.join(path, f)) for f in ('config.json', 'model.safetensors')):
            return 'gpt2'  # model.load_gpt2 names the file that is missing
        raise ValueError(f"{path}: a folder with neither log.jsonl (a training run) nor config.json and "
                         f"model.safetensors (GPT-2 weights); give a run's out_dir, a checkpoint file "
                         f"(e.g. {os.path.join(path, 'ckpt.pt')}) or a GPT-2 folder")
    if path.endswith('.jsonl'):
        return 'run'
    if not os.path.exists(path):
        if path in GPT2_MODELS:
            return 'gpt2'
        if os.sep not in path and '.' not in path:  # reads as a model name, not a file name
            raise ValueError(f"{path}: no such file and no GPT-2 model of that name; known models: "
                             f"{', '.join(GPT2_MODELS)} (or give a checkpoint file, or a folder holding "
                             f"config.json and model.safetensors)")
    return 'checkpoint'


def unique_names(bases):
    """[A-Za-z0-9_.-] only, and _2, _3, ... appended to repeats."""
    names = []
    for base in bases:
        base = re.sub(r'[^A-Za-z0-9_.-]+', '_', base) or 'ckpt'
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def checkpoint_names(paths):
    """Short unique names: the folder for .../NAME/ckpt.pt, NAME_i000100 for the snapshot
    .../NAME/snapshots/ckpt_000100.pt, else the file stem."""
    from lab.hf import short_name
    bases = []
    for p in map(os.path.normpath, paths):   # a folder's trailing / would leave no base name
        if p.startswith('hf:'):
            bases.append(short_name(p))
            continue
        stem = os.path.basename(p) if os.path.isdir(p) else os.path.splitext(os.path.basename(p))[0]
        folder = os.path.dirname(os.path.abspath(p))
        parent = os.path.basename(folder)
        snap = re.fullmatch(r'ckpt_(\d+)', stem)
        if snap and parent == 'snapshots':
            run = os.path.basename(os.path.dirname(folder))
            bases.append(f"{run}_i{snap.group(1)}" if run else f"i{snap.group(1)}")
        else:
            bases.append(parent if stem in ('ckpt', 'model', 'checkpoint') and parent else stem)
    return unique_names(bases)


def run_names(paths):
    """The run's folder for DIR or DIR/log.jsonl, else the file stem."""
    bases = []
    for p in paths:
        p = os.path.abspath(p)
        if not os.path.isdir(p):
            stem = os.path.splitext(os.path.basename(p))[0]
            p = os.path.dirname(p) if stem == 'log' else stem
        bases.append(os.path.basename(p) or 'run')
    return unique_names(bases)


def load_checkpoint(path, args):
    """(model, checkpoint dict without the weights) of a train.py checkpoint."""
    from model import load_model
    try:
        model, ckpt = load_model(path, args.device, trust=args.trust_checkpoint)
    except (TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: not a train.py checkpoint ({type(e).__name__}: {e})") from None
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit model_args ({' '.join(str(e).split())[:300]})") from None
    return model, {k: v for k, v in ckpt.items() if k not in ('model', 'optimizer')}  # the model holds the weights


def load_gpt2_weights(path, args):
    """(model, checkpoint-like dict) of OpenAI GPT-2 weights: a model name, fetched once into
    <data root>/gpt2/<name>/ by prepare.fetch_gpt2 (then offline), or a local folder. GPT-2 has no
    validation split of ours, so its windows come from the built-in corpus unless --text is given."""
    from model import load_gpt2
    from lab.data import ensure_dataset
    from lab.download import fetch_gpt2
    folder = path if os.path.isdir(path) else fetch_gpt2(path, args.data_root, args.base_url)
    model, info = load_gpt2(folder, args.device)
    if not args.text:
        with contextlib.redirect_stdout(sys.stderr):  # builds it the first time (offline, seconds)
            ensure_dataset('builtin', args.data_root)
    weights = dict(kind='gpt2', folder=info['source'], dtype=info['dtype'], name=path if folder != path else None)
    ckpt = dict(model_args=info['model_args'], iter_num=None, tokens=None, weights=weights,
                config=dict(dataset='builtin', data_root=args.data_root))
    return model, ckpt


def load(path, args, check_only=False):
    """(model, ckpt, x, y, data) or a ValueError/OSError/RuntimeError with one line. check_only: an
    hf: input is checked without loading its weights (None); other inputs are loaded as usual."""
    if input_kind(path) == 'hf':
        from lab import hf
        return hf.load(path, args, check_only)
    model, ckpt = (load_gpt2_weights if input_kind(path) == 'gpt2' else load_checkpoint)(path, args)
    T = args.seq_len or model.config.block_size
    if T > model.config.block_size:
        raise ValueError(f"--seq_len {T} exceeds the model's block_size {model.config.block_size}")
    if args.text:
        x, y, data = text_windows(args.text, T)
    else:
        try:
            x, y, data = val_windows(ckpt, args.num_seqs, T, args.seed, args.doc_aligned)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
    if int(x.max()) >= model.config.vocab_size:
        raise ValueError(f"{path}: token id {int(x.max())} of the {'--text prompts' if args.text else 'val windows'} "
                         f"is outside the model's vocab_size {model.config.vocab_size}")
    data['bos_at_pos0'] = float((x[:, 0] == data['bos']).double().mean())
    data.update(bos_prepended=False, bos_note=None)
    return model, ckpt, x, y, data


def probe_checkpoint(path, name, args, loaded=None):
    """Every measurement of one checkpoint; returns (JSON-able result, sample of sequence 0)."""
    from tqdm import tqdm
    model, ckpt, x, y, data = loaded or load(path, args)
    if ckpt.get('notice'):       # hf.py: how long this will take on a CPU, said before it starts
        print(ckpt['notice'], file=sys.stderr, flush=True)
    N, T = x.shape
    bs = args.batch_size
    bar = tqdm(total=n_batches(N, T, bs) * (6 if args.interventions else 1), desc=name, unit='batch', leave=False,
               file=sys.stderr, disable=None)
    result, obs = measure(model, x, y, bs, args.dtype, bar, data['task'])
    r = dict(path=path, name=name, iter_num=ckpt.get('iter_num'), tokens=ckpt.get('tokens'), weights=ckpt.get('weights'),
             model_args=dict(ckpt['model_args']), kind=model_kind(ckpt['model_args']), residual=result['residual'],
             params=model.num_params(),
             device=f"{args.device}, {args.dtype}",
             data=data, sublayers=[dict(s=s, block=s // 2, layer=s // 2 + 1, kind='attn' if s % 2 == 0 else 'mlp')
                                   for s in range(2 * model.config.n_layer)],
             **{k: v for k, v in result.items() if k != 'residual'}, interventions=None)
    if args.interventions:
        r['interventions'] = run_interventions(model, x, y, result, obs, args.soften_k, bs, args.dtype, bar,
                                               data['task'])
    bar.close()
    return r, obs.sample


def parse_groups(specs):
    """--group NAME=a.pt,b.pt,... (repeatable) -> {name: [paths]} in command-line order. An item
    with * ? or [ that is not a file is a glob pattern (quote it so that the shell leaves it)."""
    import glob
    groups, owner = {}, {}
    for spec in specs:
        name, sep, rest = spec.partition('=')
        if not sep or not re.fullmatch(r'[A-Za-z0-9_.+-]+', name):
            raise ValueError(f"--group {spec}: expected NAME=CKPT,CKPT,... (NAME of letters, digits, _ . + -)")
        if name in groups:
            raise ValueError(f"--group {name} is given twice; list all its checkpoints in one --group {name}=a.pt,b.pt")
        paths = []
        for item in (s.strip() for s in rest.split(',')):
            if item and any(c in item for c in '*?[') and not os.path.exists(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise ValueError(f"--group {name}: {item} matches no file")
                paths += found
            elif item:
                paths.append(item)
        if not paths:
            raise ValueError(f"--group {name}: no checkpoints after '='")
        for p in paths:
            key = os.path.realpath(p)
            if key in owner:
                raise ValueError(f"{p} is listed twice (--group {owner[key]} and --group {name}); each run counts once")
            owner[key] = name
        groups[name] = paths
    return groups


def parse_args(argv=None):
    p = OneLineParser(prog='probe.py', description="Massive activations and attention sinks of train.py "
                                                   "checkpoints, their trajectories over training runs, and "
                                                   "groups of runs.")
    p.add_argument('inputs', nargs='*', metavar='INPUT',
                   help='checkpoint files written by train.py (ckpt.pt, snapshots/ckpt_*.pt); OpenAI GPT-2 '
                        '(gpt2, gpt2-medium, gpt2-large, gpt2-xl: downloaded once) or a folder holding a GPT-2 '
                        'config.json and model.safetensors; any Hugging Face causal LM as hf:REPO_OR_FOLDER[@REVISION] '
                        '(hf:REPO@a,b,c: several revisions, also drawn as a run; needs transformers); or training '
                        'runs: an out_dir holding log.jsonl, or a log.jsonl file (trajectories; no model is run)')
    p.add_argument('--group', action='append', default=None, metavar='NAME=CKPT,CKPT,...',
                   help='a group of runs (e.g. seeds) to compare with the other groups: mean, sample std, Welch '
                        'interval and p, permutation p, Holm-adjusted p and Hedges\' g of the headline numbers '
                        '(repeatable, instead of INPUTs)')
    p.add_argument('--out', default='probe_out', help='folder for probe.json (trajectory.json for runs) and the PNGs')
    p.add_argument('--num_seqs', type=int, default=16, help='validation windows to probe')
    p.add_argument('--seq_len', type=int, default=None,
                   help="window length (default: the model's block_size; hf: inputs: its context, at most 1024)")
    p.add_argument('--text', action='append', default=None,
                   help='probe this prompt instead of validation windows (repeatable; truncated to the shortest)')
    p.add_argument('--interventions', action='store_true', help='zero/mean/soften/quantise and re-measure')
    p.add_argument('--soften_k', type=int, default=None,
                   help='channels to zero in soften (default: massive channels at position 0, at least 1)')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda[:i]')
    p.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'),
                   help='auto: bfloat16 autocast on CUDA, float32 on the CPU (statistics are always float32+)')
    p.add_argument('--seed', type=int, default=1337, help='seed of the validation windows')
    p.add_argument('--doc_aligned', action='store_true', help='windows start at <|endoftext|>')
    p.add_argument('--batch_size', type=int, default=None, help='sequences per forward (default: 4096 tokens)')
    p.add_argument('--base_url', default=None,
                   help='mirror of huggingface.co for the GPT-2 weights (default: $LEDGER_BASE_URL, else the hub)')
    p.add_argument('--data_root', default=None,
                   help='where GPT-2 weights are cached (<data_root>/gpt2/<name>) and the built-in corpus GPT-2 is '
                        'probed on lives (default: $LEDGER_DATA, else data/ next to prepare.py)')
    p.add_argument('--trust_checkpoint', action='store_true',
                   help='load checkpoints that hold pickled Python objects (which can run code), e.g. old ones of '
                        'this repo; only for files you trust')
    args = p.parse_args(argv)
    if args.num_seqs < 1:
        p.error('--num_seqs must be >= 1')
    if args.seq_len is not None and args.seq_len < 1:
        p.error('--seq_len must be >= 1')
    if args.batch_size is not None and args.batch_size < 1:
        p.error('--batch_size must be >= 1')
    return args


def check_inputs(args):
    """Everything that can be wrong with the command line, before the long part: ('runs', [run]) or
    ('checkpoints', paths, names, first loaded checkpoint, groups or None). Raises ValueError/OSError."""
    args.device, args.dtype, _ = resolve_device(args.device, args.dtype)
    groups = parse_groups(args.group) if args.group else None
    if groups and args.inputs:
        raise ValueError(f"give checkpoints either as arguments ({args.inputs[0]}, ...) or in --group, not both")
    from lab.hf import expand
    paths = [q for members in groups.values() for q in members] if groups else expand(args.inputs)
    if not paths:
        raise ValueError("nothing to probe: give checkpoint files, training runs (an out_dir holding log.jsonl), "
                         "or --group NAME=a.pt,b.pt")
    kinds = [input_kind(q) for q in paths]
    if 'run' in kinds:
        if groups:
            raise ValueError(f"--group takes checkpoints; {paths[kinds.index('run')]} is a training run "
                             f"(give its ckpt.pt)")
        models = [q for q, k in zip(paths, kinds) if k != 'run']
        if models:
            raise ValueError(f"{paths[kinds.index('run')]} is a training run and {models[0]} a model; run them "
                             f"separately: `probe.py RUN_DIR ...` for trajectories, `probe.py CKPT.pt ...` for models")
        seen = {}
        for q in paths:
            key = os.path.realpath(os.path.join(q, 'log.jsonl') if os.path.isdir(q) else q)
            if key in seen:
                raise ValueError(f"{q} and {seen[key]} are the same log; give each run once")
            seen[key] = q
        return 'runs', [read_run(q, n) for q, n in zip(paths, run_names(paths))]
    names = checkpoint_names(paths)
    if groups:   # group members by checkpoint name
        it = iter(names)
        groups = {g: [next(it) for _ in members] for g, members in groups.items()}
    first = load(paths[0], args)
    for q in paths[1:]:
        load(q, args, check_only=True)
    return 'checkpoints', paths, names, first, groups


def main(argv=None):
    args = parse_args(argv)
    try:
        kind, *work = check_inputs(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"probe.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if kind == 'runs':
        return main_runs(work[0], args)
    return main_checkpoints(*work, args)


def main_runs(runs, args):
    """Trajectories of training runs: text summary, trajectory.json, PNGs."""
    print(trajectory_text(runs))
    print()
    files = plot_trajectories(runs, args.out, THRESHOLDS)
    path = write_trajectories(args.out, vars(args), runs)
    print(f"wrote {path} and {len(files)} PNGs in {args.out}")
    return 0


def main_checkpoints(paths, names, first, groups, args):
    """Probe every checkpoint; the comparison table for several; group statistics with --group.
    In --group mode the per-checkpoint PNGs and the overlay are skipped: groups.png shows the groups."""
    results, files = [], []
    for i, (path, name) in enumerate(zip(paths, names)):
        if groups and len(paths) > 1:
            print(f"[{i + 1}/{len(paths)}] {path}", file=sys.stderr, flush=True)
        r, sample = probe_checkpoint(path, name, args, first if i == 0 else None)
        first = None
        print(report(r), flush=True)
        print(flush=True)
        if not groups:
            files += plot_checkpoint(r, sample, args.out)
        results.append(r)
    comp = None
    if len(results) > 1:
        comp = comparison(results)
        print(comparison_text(comp))
        print()
        if not groups:
            files += plot_overlay(results, args.out)
            from lab.hf import revision_trajectories     # hf: revisions of one model, drawn as a training run
            files += revision_trajectories(results, args.out, vars(args))
    stats = None
    if groups:
        stats = group_statistics(results, groups)
        print(groups_text(stats))
        print()
        files += plot_groups(stats, args.out)
    path = os.path.join(args.out, 'probe.json')
    with open(path, 'w') as f:
        json.dump(jsonable(dict(args=vars(args), checkpoints=results, comparison=comp, groups=stats)), f, indent=1)
    print(f"wrote {path} and {len(files)} PNGs in {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
