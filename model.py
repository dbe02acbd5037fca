"""
GPT with a pluggable residual operator: the standard residual stream, or the Ledger Residual
(Vemula 2026, "Massive Activations Are Architecturally Robust", arXiv 2606.20743).

Everything except the residual operator is shared, so a vanilla and a ledger model differ only
in the two small classes `Vanilla` and `Ledger` below (docs/reference.md §1 has the equations).

The network is a flat sequence of 2L sublayers attn_0, mlp_0, attn_1, mlp_1, ...; a sublayer asks
its residual operator what to read, runs attention or the MLP on it, and hands the output back to
the operator, which updates the stream(s). The LM head reads whatever the operator decodes.

A new residual operator is one class (subclass `Residual`, fill in its attributes and methods) and
one entry in RESIDUALS: train.py, probe.py and bench.py read its name, streams and decoded stream
from the class and need no change.
"""

import inspect
import math
import os
import pickle
import warnings
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


def option(default, help):
    """A config field: its default, and the description that train.py --help prints."""
    return field(default=default, metadata={'help': help})


@dataclass
class GPTConfig:
    """The model's shape and variant (defaults: GPT-2 small's shape, vanilla). train.py takes every
    field as a config key, with the type and help given here."""
    n_layer: int = option(12, "transformer blocks (each is an attention and an MLP sublayer)")
    n_head: int = option(12, "attention heads")
    n_embd: int = option(768, "width d of the residual stream(s)")
    block_size: int = option(1024, "tokens per sequence (the model's context length)")
    vocab_size: int = option(50257, "GPT-2 BPE has 50257 tokens; 50304 (a multiple of 64) is faster on GPUs")
    dropout: float = option(0.0, "dropout after attention/MLP outputs and on the embeddings")
    residual: str = option('vanilla', "the residual operator, a key of model.RESIDUALS: 'vanilla' "
                                     "(h <- h + F(N(h))) or 'ledger' (D/C streams, docs/reference.md §1.3)")
    qk_norm: bool = option(False, "RMSNorm on q and k per head (the paper's 'suppress' baseline)")
    norm: str = option('rmsnorm', "'rmsnorm' or 'layernorm'")
    norm_position: str = option('pre', "'pre' or 'post' (post-norm ablation, vanilla only)")
    ledger_rank: int = option(64, "rank r of the ledger's gate and projection maps (<=0 or >=d: full rank)")
    commit_bias_first: float = option(-4.0, "commit-gate bias of the first sublayer ...")
    commit_bias_last: float = option(4.0, "... linearly to this at the last one (gates open late)")
    commit_read: str = option('learned', "'learned': blocks read D + lam*C; 'off': strict ledger, lam = 0")
    decode_mix: float = option(0.0, "gamma: the ledger's head decodes C + gamma*D")
    tie_embeddings: bool = option(False, "share the token embedding with the LM head")
    scaled_init: bool = option(False, "nanoGPT's N(0, 0.02/sqrt(2L)) init for output projections")
    bias: bool = option(False, "biases on the attention Linears and LayerNorms, as GPT-2 (the MLP always has them)")
    gelu: str = option('exact', "'exact' GELU or 'tanh' (GPT-2's approximation, 'gelu_new')")
    norm_eps: float = option(1e-6, "epsilon of every RMSNorm/LayerNorm (GPT-2 uses 1e-5)")
    # ways to let an attention head do nothing (docs/reference.md §1.6); all off by default
    attn_bias: bool = option(False, "explicit attention bias (Sun et al. 2024): a learned key/value slot per head "
                                    "and layer that every query can attend to")
    attn_softmax: str = option('softmax', "the attention weights: 'softmax'; 'plus_one' (1 added to the "
                                          "denominator: a zero slot, Miller 2023); 'clipped' (Bondarenko et al. "
                                          "2023: clip((zeta - gamma) softmax + gamma, 0, 1)); 'sigmoid' "
                                          "(sigmoid(s - log n), no normalisation); 'relu' (relu(s) / n: Ran-Milo "
                                          "2026), n the keys a query sees")
    clip_gamma: float = option(-0.025, "clipped softmax: gamma <= 0 (Bondarenko et al.'s BERT setting)")
    clip_zeta: float = option(1.0, "clipped softmax: zeta >= 1")
    attn_gate: str = option('none', "'none', 'headwise' or 'elementwise': a sigmoid gate computed from the "
                                    "sublayer's input multiplies each head's output before the output projection "
                                    "(Qiu et al. 2025, position G1)")
    n_registers: int = option(0, "learned register / sink tokens prepended to every sequence (Darcet et al. 2024; "
                                 "Xiao et al. 2024): seen by every position, stripped before the head")

    def __post_init__(self):
        choices = dict(residual=tuple(RESIDUALS), norm=('rmsnorm', 'layernorm'), norm_position=('pre', 'post'),
                       commit_read=('learned', 'off'), gelu=('exact', 'tanh'), attn_softmax=ATTN_SOFTMAX,
                       attn_gate=('none', 'headwise', 'elementwise'))
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {allowed}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        for key in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.n_registers < 0:
            raise ValueError(f"n_registers must be >= 0, got {self.n_registers}")
        if self.clip_gamma > 0 or self.clip_zeta < 1:
            raise ValueError(f"clipped softmax needs clip_gamma <= 0 and clip_zeta >= 1, got {self.clip_gamma} "
                             f"and {self.clip_zeta}")
        if self.attn_bias and self.attn_softmax == 'plus_one':
            raise ValueError("attn_bias and attn_softmax='plus_one' both add a slot (plus_one is attn_bias with "
                             "k' = v' = 0); choose one")
        RESIDUALS[self.residual].check(self)


def make_norm(config, dim=None):
    dim = dim or config.n_embd
    if config.norm == 'rmsnorm':
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class LowRank(nn.Module):
    """A d -> r -> d map (Linear(d, r, no bias) then Linear(r, d)); one full Linear if r is 0 or >= d."""

    def __init__(self, d, r, bias):
        super().__init__()
        self.down = nn.Linear(d, r, bias=False) if 0 < r < d else nn.Identity()
        self.up = nn.Linear(r if 0 < r < d else d, d, bias=bias)

    def forward(self, x):
        return self.up(self.down(x))


# ----------------------------------------------------------------------------------------------
# The residual operators. A sublayer does:   u = op.read(state); y = F(u); state, aux = op.write(state, u, y)


class Residual(nn.Module):
    """What a residual operator provides. One instance per sublayer s, holding that sublayer's own
    parameters. `state` is a tuple of (B, T, d) tensors, one per entry of `streams`, in that order.

    streams    name -> one line on what it holds (the probe and the training log report them by name)
    views      name -> one line, for tensors derived from the state that the probe measures too
    decoded    the name of the stream the LM head reads
    aux        name -> one line, for each scalar that write() returns; GPT.forward averages them over
               the sublayers, train.py logs them, and 'commit_rate' (the mean commit gate: the
               operator has commit gates) is what train.py's commit_sparsity penalises
    """
    streams = {}
    views = {}
    decoded = None
    aux = {}

    def __init__(self, config, s):
        super().__init__()

    def init_weights(self):
        """The operator's own init, applied after the generic N(0, 0.02) init of every Linear."""

    @classmethod
    def check(cls, config):
        """Raise ValueError for a GPTConfig this operator cannot run."""
        if config.norm_position == 'post':
            raise ValueError(f"residual={config.residual!r} is pre-norm only; use norm_position='pre'")

    @classmethod
    def label(cls, args):
        """A short name for reports, from the model's config dict (e.g. 'ledger strict')."""
        return args['residual']

    @staticmethod
    def start(x):
        """The state before the first sublayer, from the embeddings x (B, T, d)."""
        raise NotImplementedError

    def read(self, state):
        """u, the (normalised) input of this sublayer's attention or MLP."""
        raise NotImplementedError

    def write(self, state, u, y):
        """(new state, aux): the state after adding the sublayer output y; aux maps names to scalar
        tensors that GPT.forward averages over the sublayers ({} when there are none)."""
        raise NotImplementedError

    def view(self, state):
        """{name: tensor} for every entry of `views`, from the state before this sublayer."""
        return {}

    @staticmethod
    def decode(state, config):
        """What the final norm and the LM head read."""
        raise NotImplementedError


class Vanilla(Residual):
    """The standard residual stream h. Pre-norm: h <- h + F(N(h)). Post-norm: h <- N(h + F(h))."""
    streams = {'h': 'residual stream h'}
    decoded = 'h'

    def __init__(self, config, s):
        super().__init__(config, s)
        self.norm = make_norm(config)
        self.post = config.norm_position == 'post'

    @classmethod
    def check(cls, config):
        pass  # pre- and post-norm

    @classmethod
    def label(cls, args):
        return 'vanilla' + (' post-norm' if args.get('norm_position') == 'post' else '')

    @staticmethod
    def start(x):
        return (x,)

    def read(self, state):
        return state[0] if self.post else self.norm(state[0])

    def write(self, state, u, y):
        h = state[0] + y
        return (self.norm(h) if self.post else h,), {}

    @staticmethod
    def decode(state, config):
        return state[0]


class Ledger(Residual):
    """Deliberation D (mutable scratch) and Commitment C (append-only, the only thing decoded).

    u = N(D + lam*C);  D <- D - be*(k.D)k + bw*(y + G y);  C <- C + c*(D + P D)
    with per-channel erase/write gates be, bw, unit erase direction k, and one scalar commit gate c:
    be = sigmoid(Ew u), bw = sigmoid(Ww u), k = normalize(Kw u), c = sigmoid(w.u + b); Ew, Ww, Kw, G, P
    low-rank d -> r -> d maps (docs/reference.md §1.3). gates() computes the first four maps and c
    in two batched products, so a sublayer costs four matmuls more than vanilla's, not eleven.
    """
    streams = {'D': 'scratch stream D (Deliberation: erased and written by every sublayer)',
               'C': 'commitment stream C (append-only: c*(D + P D) is added after every sublayer)'}
    views = {'read': 'D + lam*C as read by each sublayer (before its norm), i.e. the state before it'}
    decoded = 'C'
    aux = {'commit_rate': 'mean commit gate c over sublayers, sequences and positions'}

    def __init__(self, config, s):
        super().__init__(config, s)
        d, r = config.n_embd, config.ledger_rank
        self.norm = make_norm(config)
        self.erase = LowRank(d, r, bias=True)       # be = sigmoid(Ew u)
        self.write_gate = LowRank(d, r, bias=True)  # bw = sigmoid(Ww u)
        self.key = LowRank(d, r, bias=False)        # k = normalize(Kw u)
        self.g = LowRank(d, r, bias=False)          # G: transforms what is written to D
        self.p = LowRank(d, r, bias=False)          # P: transforms what is committed to C
        self.commit = nn.Linear(d, 1)               # c = sigmoid(w.u + b)
        # 'off' (strict ledger): no block reads C, so lam does not exist at all
        self.lam = nn.Parameter(torch.zeros(d)) if config.commit_read == 'learned' else None
        f = s / max(2 * config.n_layer - 1, 1)     # fractional depth of this sublayer
        self.commit_bias = config.commit_bias_first + f * (config.commit_bias_last - config.commit_bias_first)

    def init_weights(self):
        """The paper's stable init: erase ~0.047, write ~0.953, G = P = 0, commit gates by depth."""
        with torch.no_grad():
            for m in (self.erase, self.write_gate, self.g, self.p):
                m.up.weight.zero_()
            self.erase.up.bias.fill_(-3.0)          # erase ~0.047
            self.write_gate.up.bias.fill_(3.0)      # write ~0.953
            self.commit.weight.zero_()
            self.commit.bias.fill_(self.commit_bias)
            if self.lam is not None:
                self.lam.zero_()

    @classmethod
    def label(cls, args):
        return 'ledger' + (' strict' if args.get('commit_read') == 'off' else '')

    @staticmethod
    def start(x):
        return (x, torch.zeros_like(x))

    def read(self, state):
        return self.norm(self.view(state)['read'])

    def write(self, state, u, y):
        D, C = state
        be, bw, k, gy, c = self.gates(u, y)
        D = D - be * (k * D).sum(-1, keepdim=True) * k + bw * (y + gy)
        C = C + c * (D + self.p(D))                 # P reads the new D, so it runs on its own
        return (D, C), {'commit_rate': c.float().mean()}   # fp32 even under bf16 autocast

    def gates(self, u, y):
        """be, bw, k, G(y) and c, from one batched product for the down-projections of Ew, Ww, Kw (of
        u) and G (of y), with w.u as one more column, and one for their four up-projections: on a
        GPU, thin matmuls cost a launch each. The weights keep their names (erase.down.weight, ...)."""
        B, T, d = u.shape
        maps = (self.erase, self.write_gate, self.key, self.g)
        z = torch.stack((u, u, u, y)).view(4, B * T, d)
        if isinstance(self.erase.down, nn.Identity):   # full rank: no down-projections
            logit = u @ self.commit.weight.t()
        else:
            down = torch.stack([m.down.weight.t() for m in maps])                       # (4, d, r)
            w = torch.cat([self.commit.weight.t().unsqueeze(0), down.new_zeros(3, d, 1)])  # w in slot 0 only
            z = torch.bmm(z, torch.cat([down, w], dim=2))                               # (4, BT, r + 1)
            z, logit = z[..., :-1], z[0, :, -1:].view(B, T, 1)
        zero = self.erase.up.bias.new_zeros(d)
        bias = torch.stack([self.erase.up.bias, self.write_gate.up.bias, zero, zero]).unsqueeze(1)
        up = torch.stack([m.up.weight.t() for m in maps])                                # (4, r, d)
        be, bw, k, gy = torch.baddbmm(bias, z, up).view(4, B, T, d)
        return torch.sigmoid(be), torch.sigmoid(bw), F.normalize(k, dim=-1), gy, torch.sigmoid(logit + self.commit.bias)

    def view(self, state):
        D, C = state
        return {'read': D if self.lam is None else D + self.lam * C}

    @staticmethod
    def decode(state, config):
        D, C = state
        return C if config.decode_mix == 0 else C + config.decode_mix * D


RESIDUALS = {'vanilla': Vanilla, 'ledger': Ledger}


def residual_info(name):
    """What log.jsonl and probe.json record about a residual operator, so that the analysis tools
    need no operator names: its streams, views and aux terms with their descriptions, the decoded
    stream, and whether it has commit gates."""
    op = RESIDUALS[name]
    return dict(name=name, decoded=op.decoded, streams=dict(op.streams), views=dict(op.views), aux=dict(op.aux),
                has_gates='commit_rate' in op.aux)

# ----------------------------------------------------------------------------------------------


class Observer:
    """Hooks into the forward pass for the probe and the training statistics (zero cost when unused).

    Pass an instance as model(idx, observer=...). Each hook may return a replacement tensor/state
    (interventions) or None to leave it alone. `attention = True` asks every attention layer to
    compute its probabilities explicitly and hand them to `on_attention`. With registers
    (n_registers), every hook sees the data positions only (position 0 is the first token of the
    input); on_registers sees the register slots.
    """
    attention = False

    def on_input(self, s, u):
        """u: the normalised input of sublayer s (B, T, d)."""

    def on_attention(self, layer, q, k, v, att, extra=None):
        """q, k, v: (B, H, T, hd) after QK-norm; att: (B, H, T, T) the weights of the data keys (for
        'sigmoid' and 'relu', which are not normalised, their share of the row's total weight). extra:
        {name: (B, H, T)} per query, what a variant offers a head to do nothing with: 'slot' (the
        weight on the bias or +1 slot), 'registers' (on the register slots), 'total' (sigmoid, relu:
        the row's total weight, 0 = nothing done), 'gate' (the mean gate of the head's output)."""

    def on_sublayer(self, s, streams):
        """streams: dict name -> (B, T, d) after sublayer s: the operator's streams, then its views
        (computed from the state before s; the ledger's 'read' is what s read)."""

    def on_registers(self, s, streams):
        """With registers: the same streams at the register slots only, (B, n_registers, d)."""


ATTN_SOFTMAX = ('softmax', 'plus_one', 'clipped', 'sigmoid', 'relu')
EXPLICIT_ONLY = ('clipped', 'sigmoid', 'relu')   # no fused kernel computes these weights


class Attention(nn.Module):
    """Causal self-attention, and the published ways to let a head do nothing (docs/reference.md §1.6):
    a slot every query can attend to, learned (attn_bias: k', v' per head) or zero (plus_one); weights
    that need not sum to one (clipped, sigmoid, relu); a sigmoid gate on each head's output
    (attn_gate). Registers are extra positions in front of the sequence (GPT), not a change here.
    SDPA computes softmax attention, with the slot as one more key under an explicit mask; the other
    weights, and whatever the probe measures, are computed explicitly (attention_weights)."""

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual_out = True
        hd = config.n_embd // config.n_head
        self.q_norm = nn.RMSNorm(hd, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(hd, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.softmax, self.clip = config.attn_softmax, (config.clip_gamma, config.clip_zeta)
        self.n_registers = config.n_registers
        # attn_bias: k' and v' of each head (N(0, 0.02), set by GPT after the generic init)
        self.slot = nn.Parameter(torch.zeros(2, config.n_head, 1, hd)) if config.attn_bias else None
        self.gate = None if config.attn_gate == 'none' else \
            nn.Linear(config.n_embd, config.n_head if config.attn_gate == 'headwise' else config.n_embd, bias=False)

    def forward(self, x, observer=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            # in q's and k's own dtype (bf16 under autocast): with the fp32 weight as it is, torch warns
            # about the mismatch and takes its slow unfused path
            q, k = (F.rms_norm(t, (t.size(-1),), norm.weight.to(t.dtype), norm.eps)
                    for t, norm in ((q, self.q_norm), (k, self.k_norm)))
        slot = None                                    # (k', v'), each (B, H, 1, hd): one more key and value
        if self.slot is not None:
            slot = tuple(t.to(q.dtype).expand(B, -1, -1, -1) for t in self.slot)
        elif self.softmax == 'plus_one':
            slot = (q.new_zeros(B, self.n_head, 1, q.size(-1)),) * 2
        gate = None if self.gate is None else torch.sigmoid(self.gate(x)).view(B, T, self.n_head, -1).transpose(1, 2)
        if (observer is not None and observer.attention) or self.softmax in EXPLICIT_ONLY:
            y = self.explicit(q, k, v, slot, gate, observer)
        elif slot is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            y = F.scaled_dot_product_attention(q, torch.cat([slot[0], k], 2), torch.cat([slot[1], v], 2),
                                               attn_mask=attention_mask(T, 1, x.device),
                                               dropout_p=self.dropout if self.training else 0.0)
        if gate is not None:
            y = y * gate.to(y.dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)

    def explicit(self, q, k, v, slot, gate, observer):
        """Attention from explicitly computed weights, in fp32 whatever the autocast dtype (the probe's
        statistics come from them; bf16 rounds a score near 50 by up to 0.125: its probability by up
        to 13 %). Hands the weights of the data positions, and what each variant offers a head to do
        nothing with, to the observer."""
        T, S, R = q.size(2), 0 if slot is None else 1, self.n_registers
        given = q, k, v                                # the observer gets them as the model computed them
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            if slot is not None:
                k, v = torch.cat([slot[0].float(), k], 2), torch.cat([slot[1].float(), v], 2)
            scores = (q @ k.transpose(-2, -1)).div_(math.sqrt(k.size(-1)))   # in place: T x T maps are big
            att = attention_weights(scores, attention_mask(T, S, q.device), self.softmax, *self.clip)
            if observer is not None and observer.attention:
                total = att.sum(-1) if self.softmax in ('sigmoid', 'relu') else None
                share = att if total is None else att / total.clamp_min(1e-30).unsqueeze(-1)
                extra = {}
                if S:
                    extra['slot'] = share[:, :, R:, 0]
                if R:
                    extra['registers'] = share[:, :, R:, S:S + R].sum(-1)
                if total is not None:
                    extra['total'] = total[:, :, R:]
                if gate is not None:
                    extra['gate'] = gate[:, :, R:].float().mean(-1)
                q_, k_, v_ = (t[:, :, R:] for t in given)
                observer.on_attention(self.layer, q_, k_, v_, share[:, :, R:, S + R:], extra or None)
            if self.training and self.dropout:
                att = F.dropout(att, self.dropout)
            return att @ v


# the published ways to let a head do nothing (docs/reference.md §1.6), by name: their GPTConfig flags
ATTENTION_VARIANTS = {
    'softmax': {},
    'attn_bias': dict(attn_bias=True),                # Sun et al. 2024
    'plus_one': dict(attn_softmax='plus_one'),        # Miller 2023
    'clipped': dict(attn_softmax='clipped'),          # Bondarenko et al. 2023
    'sigmoid': dict(attn_softmax='sigmoid'),          # Gu et al. 2025; Ramapuram et al. 2024
    'relu': dict(attn_softmax='relu'),                # Ran-Milo 2026
    'gate_headwise': dict(attn_gate='headwise'),      # Qiu et al. 2025
    'gate_elementwise': dict(attn_gate='elementwise'),
    'registers': dict(n_registers=4),                 # Darcet et al. 2024; Xiao et al. 2024
}


def attention_label(args):
    """The attention variant of a model config (dict) in a few words for reports; '' for plain
    softmax attention."""
    parts = ['attn_bias'] if args.get('attn_bias') else []
    kind = args.get('attn_softmax', 'softmax')
    if kind == 'clipped':
        parts.append(f"clipped({args.get('clip_gamma', -0.025):g},{args.get('clip_zeta', 1.0):g})")
    elif kind != 'softmax':
        parts.append(kind)
    if args.get('attn_gate', 'none') != 'none':
        parts.append(f"gate:{args['attn_gate']}")
    if args.get('n_registers'):
        parts.append(f"{args['n_registers']} registers")
    return '+'.join(parts)


def attention_mask(T, slots, device):
    """(T, slots + T) bool: True where query t may look: every slot, and the keys up to t."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(T, slots, dtype=torch.bool, device=device), causal], 1) if slots else causal


def attention_weights(scores, mask, kind='softmax', gamma=0.0, zeta=1.0):
    """The attention weights of (..., T, K) scores where mask allows (0 elsewhere), for each
    attn_softmax; n is the number of keys a query sees."""
    if kind in ('softmax', 'plus_one'):                # plus_one: the zero slot is among the scores
        return scores.masked_fill_(~mask, float('-inf')).softmax(dim=-1)
    if kind == 'clipped':                              # exact zeros (and ones) are reachable
        p = scores.masked_fill_(~mask, float('-inf')).softmax(dim=-1)
        return ((zeta - gamma) * p + gamma).clamp(0, 1).masked_fill(~mask, 0)
    n = mask.sum(-1, keepdim=True)
    if kind == 'sigmoid':                              # bias -log n: the row sums to ~1 at zero scores
        return torch.sigmoid(scores - torch.log(n.to(scores.dtype))).masked_fill(~mask, 0)
    return (torch.relu(scores) / n).masked_fill(~mask, 0)   # relu: 1/n so the output does not grow with n


class MLP(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.proj.residual_out = True
        self.dropout = config.dropout
        self.approximate = 'tanh' if config.gelu == 'tanh' else 'none'

    def forward(self, x, observer=None):
        return F.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)), self.dropout, self.training)


class Sublayer(nn.Module):
    """One attention or MLP sublayer together with its own residual operator."""

    def __init__(self, config, s):
        super().__init__()
        self.s = s
        self.fn = (Attention if s % 2 == 0 else MLP)(config, s // 2)
        self.res = RESIDUALS[config.residual](config, s)
        self.n_registers = config.n_registers

    def forward(self, state, observer=None):
        u = self.res.read(state)
        R = self.n_registers                            # observers see the data positions, from R on
        if observer is not None:
            u = _replace(u, observer.on_input(self.s, u[:, R:]), R)
        y = self.fn(u, observer)
        new_state, aux = self.res.write(state, u, y)
        if observer is not None:
            streams = {**dict(zip(self.res.streams, new_state)), **self.res.view(state)}
            if R:
                observer.on_registers(self.s, {name: t[:, :R] for name, t in streams.items()})
            out = observer.on_sublayer(self.s, {name: t[:, R:] for name, t in streams.items()})
            if out is not None:
                new_state = tuple(_replace(t, out.get(name), R) for name, t in zip(self.res.streams, new_state))
        return new_state, aux


def _replace(x, new, registers=0):
    """x with its data positions (from `registers` on) replaced by new, or x itself if new is None."""
    if new is None:
        return x
    return torch.cat([x[:, :registers], new], 1) if registers else new


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.residual = RESIDUALS[config.residual]
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.sublayers = nn.ModuleList(Sublayer(config, s) for s in range(2 * config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # registers: learned vectors in front of every sequence, without a position (docs/reference.md §1.6)
        self.registers = nn.Parameter(torch.zeros(config.n_registers, config.n_embd)) if config.n_registers else None
        self.apply(self._init_weights)
        for sublayer in self.sublayers:
            sublayer.res.init_weights()
        with torch.no_grad():                          # after the rest, so the shared weights init as without them
            for p in [self.registers] + [sub.fn.slot for sub in self.sublayers[::2]]:
                if p is not None:
                    p.normal_(0.0, 0.02)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if self.config.scaled_init and getattr(module, 'residual_out', False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, 'bias', None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)

    def forward(self, idx, targets=None, observer=None, return_logits=True):
        """Returns (logits, loss, aux). loss is the cross-entropy only (None without targets); aux
        holds the operator's auxiliary terms, each averaged over the sublayers: for the ledger
        aux['commit_rate'], the mean commit gate (differentiable, fp32) that train.py's
        commit_sparsity penalty multiplies; {} for vanilla.

        return_logits=False gives None for the logits, so that the B x T x V tensor is freed as soon as
        the loss is computed (training needs only the loss). Token ids are not checked here: that
        would make the host wait for the device at every call; the data path checks every batch
        (lab.data.Sampler with vocab_size, probe.py's inputs) and generate() its prompt."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        R = self.config.n_registers
        if R:
            x = torch.cat([self.registers.to(x.dtype).expand(B, -1, -1), x], 1)
        state = self.residual.start(x)
        terms = {}
        for sublayer in self.sublayers:
            state, aux = sublayer(state, observer)
            for name, value in aux.items():
                terms.setdefault(name, []).append(value)
        aux = {name: torch.stack(values).mean() for name, values in terms.items()}
        logits = self.lm_head(self.norm_f(self.residual.decode(state, self.config)[:, R:]))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return (logits if return_logits else None), loss, aux

    # ------------------------------------------------------------------------------------------

    def num_params(self, non_embedding=False):
        """Parameter count. non_embedding=True leaves out the lookup tables (position embedding,
        and the token embedding unless it is tied to the head): the parameters that cost FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() + (0 if self.config.tie_embeddings else self.wte.weight.numel())
        return n

    def configure_optimizer(self, weight_decay, learning_rate, betas, decay_all=True, device_type='cpu'):
        """AdamW. decay_all=True decays every parameter (the paper's presets); False decays only
        2-D weights (nanoGPT's rule: no decay on biases, norms, gates' biases, lam)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if decay_all:
            groups = [{'params': params, 'weight_decay': weight_decay}]
        else:
            groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                      {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))

    def estimate_flops_per_token(self, T=None):
        """6N + 12*L*H*Q*T (PaLM appendix B), N counting the ledger's extra maps, not the embeddings."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def estimate_mfu(self, tokens_per_second, peak_flops):
        return self.estimate_flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample continuations of idx (B, T); temperature 0 means greedy."""
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):  # once, on the prompt
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[0]
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('inf')
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def resolve_device(device='auto', dtype='auto', compile='auto'):
    """(device, dtype, compile) with 'auto' resolved the one way train.py, probe.py and bench.py
    share: the device cuda, then mps, then cpu; bfloat16 autocast on CUDA when the GPU supports it,
    else float32; torch.compile on CUDA only. ValueError (one line) for a device that is not there."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind = device.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch.cuda.is_available() is False (no CUDA GPU or a CPU-only "
                         f"torch); use device='cpu'")
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}, but MPS is not available; use device='cpu'")
    if dtype == 'auto':
        dtype = 'bfloat16' if kind == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    if compile == 'auto':
        compile = kind == 'cuda'
    return device, dtype, compile


CHECKPOINT_KEYS = ('model', 'model_args', 'config', 'iter_num')
TRUST_HINT = ("only if you trust this file (e.g. an old checkpoint of this repo you wrote yourself): "
              "probe.py --trust_checkpoint, train.py --trust_checkpoint=True")


def read_checkpoint(path, map_location='cpu', trust=False):
    """Load a checkpoint dict written by train.py; one clear error for a missing, truncated or
    foreign file instead of a pickle traceback.

    A checkpoint is a pickle, and unpickling can run arbitrary code, so it is read with
    torch.load(weights_only=True): tensors and plain containers/numbers/strings only, which is all
    train.py writes. A file that needs more is refused unless trust=True (the user said so by name).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (train one with `python train.py`)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way to refusing: one line is enough
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as e:
        if not trust and isinstance(e, pickle.UnpicklingError) and 'weights only load failed' in str(e).lower():
            raise ValueError(f"{path}: contains pickled Python objects, which could run code; refusing. "
                             f"Load it {TRUST_HINT}") from None
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); "
                         f"it may be truncated or not written by train.py") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise ValueError(f"{path}: not a train.py checkpoint (expected keys {', '.join(CHECKPOINT_KEYS)})")
    return ckpt


def load_model(path, device='cpu', trust=False):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint (see read_checkpoint)."""
    ckpt = read_checkpoint(path, trust=trust)
    known = {f.name for f in fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in ckpt['model_args'].items() if k in known}))
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------
# OpenAI GPT-2 weights (docs/reference.md §6), so the probe can be calibrated on the literature's model.
# GPT-2 is this GPT with residual='vanilla', norm='layernorm', bias=True, gelu='tanh', eps 1e-5 and
# a tied head; its block i is our sublayers 2i (attention, norm ln_1) and 2i+1 (MLP, norm ln_2).

GPT2_BLOCK = {  # GPT-2 module inside h.<i> -> (sublayer 2i + offset, our module)
    'ln_1': (0, 'res.norm'), 'attn.c_attn': (0, 'fn.qkv'), 'attn.c_proj': (0, 'fn.proj'),
    'ln_2': (1, 'res.norm'), 'mlp.c_fc': (1, 'fn.fc'), 'mlp.c_proj': (1, 'fn.proj'),
}
GPT2_TOP = {'wte': 'wte', 'wpe': 'wpe', 'ln_f': 'norm_f', 'lm_head': 'lm_head'}
GPT2_BUFFERS = ('attn.bias', 'attn.masked_bias')  # causal-mask buffers of older files, not weights


def gpt2_config(hf):
    """GPTConfig for a Hugging Face GPT-2 config.json dict (missing keys take GPT2Config's defaults).

    Anything that would compute something other than GPT-2 is refused with a ValueError, because
    its tensors could still have the right shapes and load silently into the wrong model."""
    def refuse(why):
        raise ValueError(f"config.json: {why}; only OpenAI GPT-2 models (gpt2, gpt2-medium, gpt2-large, "
                         "gpt2-xl or a GPT-2-format folder) load into this GPT")
    if hf.get('model_type') != 'gpt2':
        refuse(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    act = hf.get('activation_function', 'gelu_new')
    if act not in ('gelu_new', 'gelu_pytorch_tanh'):
        refuse(f"activation_function {act!r} is not GPT-2's tanh GELU (gelu_new)")
    n_embd = hf.get('n_embd', 768)
    if hf.get('n_inner') not in (None, 4 * n_embd):
        refuse(f"n_inner {hf['n_inner']} is not 4 * n_embd = {4 * n_embd}")
    for key, gpt2 in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                      ('reorder_and_upcast_attn', False), ('tie_word_embeddings', True), ('add_cross_attention', False)):
        if hf.get(key, gpt2) != gpt2:
            refuse(f"{key} is {hf[key]}, GPT-2 has {gpt2}")
    return GPTConfig(n_layer=hf.get('n_layer', 12), n_head=hf.get('n_head', 12), n_embd=n_embd,
                     block_size=hf.get('n_positions', 1024), vocab_size=hf.get('vocab_size', 50257), dropout=0.0,
                     residual='vanilla', norm='layernorm', bias=True, gelu='tanh',
                     norm_eps=hf.get('layer_norm_epsilon', 1e-5), tie_embeddings=True)


def gpt2_state_dict(tensors, expected):
    """Rename GPT-2 tensors (with or without the 'transformer.' prefix) to our state_dict names and
    check them against `expected`, GPT(config).state_dict(); ValueError for a missing, unexpected
    or wrongly shaped tensor (shapes as stored in the file).

    The c_* weights are Conv1D, stored (in, out): transposed for nn.Linear. c_attn packs q|k|v on
    its output, the order our qkv splits in, so it maps whole. The mask buffers are dropped. The
    head is tied to wte: an lm_head.weight in the file must equal wte.weight (else it is not GPT-2
    and is refused rather than silently replaced by wte).
    """
    sd, source = {}, {}
    for name, t in tensors.items():
        short = name.removeprefix('transformer.')
        module, _, param = short.rpartition('.')      # 'h.3.attn.c_attn', 'weight'
        h, _, rest = module.partition('.')
        i, _, inner = rest.partition('.')             # '3', 'attn.c_attn'
        in_block = h == 'h' and i.isdigit()
        if in_block and f"{inner}.{param}" in GPT2_BUFFERS:
            continue
        if in_block and inner in GPT2_BLOCK:
            offset, ours = GPT2_BLOCK[inner]
            ours = f"sublayers.{2 * int(i) + offset}.{ours}.{param}"
        elif module in GPT2_TOP:
            ours = f"{GPT2_TOP[module]}.{param}"
        else:
            ours = name  # not a GPT-2 tensor: reported as unexpected below
        conv1d = '.c_' in short and param == 'weight' and t.dim() == 2
        sd[ours], source[ours] = (t.t() if conv1d else t), (name, conv1d)
    head = sd.pop('lm_head.weight', None)
    if head is not None and 'wte.weight' in sd and not torch.equal(head, sd['wte.weight']):
        raise ValueError("lm_head.weight differs from wte.weight, but GPT-2's head is tied to the token embedding")
    expected = {k: v for k, v in expected.items() if k != 'lm_head.weight'}  # tied: it is wte.weight
    missing = [k for k in expected if k not in sd]
    unexpected = [source[k][0] for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"the tensors do not fit config.json: missing {missing[:4] or 'none'} (this GPT's names), "
                         f"unexpected {unexpected[:4] or 'none'} (the file's names)")
    for k, t in sd.items():
        (name, conv1d), want = source[k], tuple(expected[k].shape)
        if tuple(t.shape) != want:
            file_shape = tuple(t.t().shape) if conv1d else tuple(t.shape)
            raise ValueError(f"{name}: expected shape {want[::-1] if conv1d else want} from config.json, got {file_shape}")
    sd['lm_head.weight'] = sd['wte.weight']
    return sd


def load_gpt2(folder, device='cpu'):
    """(model in eval mode, info) from a folder holding a Hugging Face GPT-2 config.json and
    model.safetensors (lab.download.fetch_gpt2 downloads OpenAI's). safetensors only holds tensors, so
    unlike a pickle it cannot run code. info: source (the folder), name (its base name), model_args
    (GPTConfig fields), dtype (of the stored tensors), hf_config (the config.json dict).
    Bad input raises a one-line ValueError."""
    import json
    from dataclasses import asdict
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    paths = {f: os.path.join(folder, f) for f in ('config.json', 'model.safetensors')}
    missing = [f for f, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{folder}: no {' and no '.join(missing)}; give a GPT-2 model name (gpt2, gpt2-medium, "
                         "gpt2-large, gpt2-xl) or a folder holding config.json and model.safetensors")
    try:
        with open(paths['config.json'], 'rb') as f:
            hf = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{paths['config.json']}: not JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{paths['config.json']}: not a JSON object")
    try:
        config = gpt2_config(hf)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{paths['config.json']}: {str(e).removeprefix('config.json: ')}") from None
    try:
        tensors = load_file(paths['model.safetensors'])
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{paths['model.safetensors']}: not a readable safetensors file ({e})") from None
    model = GPT(config)
    try:
        sd = gpt2_state_dict(tensors, model.state_dict())
    except ValueError as e:
        raise ValueError(f"{paths['model.safetensors']}: {e}") from None
    model.load_state_dict(sd)
    info = dict(source=os.path.abspath(folder), name=os.path.basename(os.path.abspath(folder)),
                model_args=asdict(config), dtype=str(next(iter(tensors.values())).dtype).removeprefix('torch.'),
                hf_config=hf)
    return model.to(device).eval(), info
