"""
GPT with a pluggable residual operator: the standard residual stream, or the Ledger Residual
(Vemula 2026, "Massive Activations Are Architecturally Robust", arXiv 2606.20743); the equations
are in docs/reference.md §1.

The network is a flat sequence of 2L sublayers attn_0, mlp_0, attn_1, mlp_1, ...; a sublayer asks
its residual operator what to read, runs attention or the MLP on it, and hands the output back to
the operator, which updates the stream(s). The LM head reads whatever the operator decodes. So a
vanilla and a ledger model differ only in the classes `Vanilla` and `Ledger` below.

Two variant points, each one entry in one registry, with its own settings (which GPTConfig takes as
options): a residual operator (RESIDUALS, below, also with its loss penalties) and an attention
weighting (WEIGHTINGS, in lab/weightings.py: softmax and the published ways to let a head do
nothing). train.py, probe.py and bench.py need no change for a new one.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.config import option
from lab.weightings import WEIGHTINGS  # the attention weightings: softmax and the published ways for a head to do nothing

# ----------------------------------------------------------------------------------------------
# config: the shared options, then each variant's own (Residual.settings, Softmax.settings)

OPTIONS = dict(
    n_layer=option(12, "transformer blocks (each is an attention and an MLP sublayer)"),
    n_head=option(12, "attention heads"),
    n_embd=option(768, "width d of the residual stream(s)"),
    block_size=option(1024, "tokens per sequence (the model's context length)"),
    vocab_size=option(50257, "GPT-2 BPE has 50257 tokens; 50304 (a multiple of 64) is faster on GPUs"),
    dropout=option(0.0, "dropout after attention/MLP outputs and on the embeddings"),
    residual=option('vanilla', "the residual operator, a key of model.RESIDUALS: 'vanilla' (h <- h + F(N(h))) or "
                               "'ledger' (D/C streams, docs/reference.md §1.3)"),
    norm=option('rmsnorm', "'rmsnorm' or 'layernorm'", choices=('rmsnorm', 'layernorm')),
    norm_position=option('pre', "'pre' or 'post' (post-norm ablation, vanilla only)", choices=('pre', 'post')),
    norm_eps=option(1e-6, "epsilon of every RMSNorm/LayerNorm (GPT-2 uses 1e-5)"),
    qk_norm=option(False, "RMSNorm on q and k per head (the paper's 'suppress' baseline)"),
    tie_embeddings=option(False, "share the token embedding with the LM head"),
    scaled_init=option(False, "nanoGPT's N(0, 0.02/sqrt(2L)) init for output projections"),
    bias=option(False, "biases on the attention Linears and LayerNorms, as GPT-2 (the MLP always has them)"),
    gelu=option('exact', "'exact' GELU or 'tanh' (GPT-2's approximation, 'gelu_new')", choices=('exact', 'tanh')),
    # ways to let an attention head do nothing (docs/reference.md §1.6); all off by default
    attn_softmax=option('softmax', "the attention weighting, a key of lab.weightings.WEIGHTINGS: 'softmax', 'plus_one', "
                                   "'clipped', 'sigmoid', 'relu', 'sink_logit', 'softpick' (docs/reference.md §1.6)"),
    attn_bias=option(False, "explicit attention bias (Sun et al. 2024): a learned key/value slot per head and layer "
                            "that every query can attend to"),
    attn_gate=option('none', "'none', 'headwise' or 'elementwise': a sigmoid gate computed from the sublayer's input "
                             "multiplies each head's output before the output projection (Qiu et al. 2025, G1)",
                     choices=('none', 'headwise', 'elementwise')),
    n_registers=option(0, "learned register / sink tokens prepended to every sequence (Darcet et al. 2024; "
                          "Xiao et al. 2024): seen by every position, stripped before the head"),
)


def options():
    """Every GPTConfig option: the shared ones, then the settings of each registered residual
    operator and attention weighting (a variant's settings are options of every model)."""
    out = dict(OPTIONS)
    for variant in list(RESIDUALS.values()) + list(WEIGHTINGS.values()):
        out.update(variant.settings)
    return out


class GPTConfig:
    """The model's shape and variant: GPTConfig(n_layer=4, residual='ledger', ledger_rank=16, ...),
    every option of options() a keyword (defaults: GPT-2 small's shape, vanilla). vars(config) is the
    dict a checkpoint keeps as model_args. ValueError, in one line, for anything the model cannot run."""

    def __init__(self, **kwargs):
        known = options()
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            raise ValueError(f"unknown model option {unknown[0]!r}")
        for key, opt in known.items():
            setattr(self, key, kwargs.get(key, opt.default))
        for key, opt in known.items():
            if opt.choices and getattr(self, key) not in opt.choices:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {opt.choices}")
        for key, registry in (('residual', RESIDUALS), ('attn_softmax', WEIGHTINGS)):
            if getattr(self, key) not in registry:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {tuple(registry)}")
        for key in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_registers < 0:
            raise ValueError(f"n_registers must be >= 0, got {self.n_registers}")
        RESIDUALS[self.residual].check(self)
        WEIGHTINGS[self.attn_softmax].check(self)

    def __eq__(self, other):
        return isinstance(other, GPTConfig) and vars(self) == vars(other)


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
    aux        name -> one line, for each scalar that write() returns (averaged over the sublayers)
    settings   name -> option(...): the operator's own GPTConfig options (e.g. ledger_rank)
    penalties  train.py key -> (aux term, option(default weight, help)): the loss adds weight x term
               (the key's None means that default on a model that has the term, 0 on one that has not)
    """
    streams, views, aux, settings, penalties = {}, {}, {}, {}, {}
    decoded = None

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

    def view(self, state):
        """{name: tensor} for every entry of `views`, from the state before this sublayer."""
        return {}

    # and, in each operator:  start(x) -> the state before the first sublayer, from the embeddings;
    # read(state) -> u, the (normalised) input of the attention or MLP; write(state, u, y) -> (new
    # state, {aux name: scalar tensor}); decode(state, config) -> what the final norm and the head read


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
        return args['residual'] + (' post-norm' if args.get('norm_position') == 'post' else '')

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
    settings = dict(
        ledger_rank=option(64, "rank r of the ledger's gate and projection maps (<=0 or >=d: full rank)"),
        commit_bias_first=option(-4.0, "commit-gate bias of the first sublayer ..."),
        commit_bias_last=option(4.0, "... linearly to this at the last one (gates open late)"),
        commit_read=option('learned', "'learned': blocks read D + lam*C; 'off': strict ledger, lam = 0",
                           choices=('learned', 'off')),
        decode_mix=option(0.0, "gamma: the ledger's head decodes C + gamma*D"),
    )
    penalties = {'commit_sparsity': ('commit_rate', option(0.02, "alpha: loss = CE + alpha * mean commit gate (the "
                                                                 "paper: 0.02; 'heavy sparsity' 0.3)"))}

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
        return args['residual'] + (' strict' if args.get('commit_read') == 'off' else '')

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
        GPU, thin matmuls cost a launch each, so this count is the one pinned (tests/test_kernels.py).
        A CPU at small widths would rather have separate matmuls, but no arrangement brings it near
        the FLOP ratio there (docs/usage.md, Benchmark; results/bench/). The weights keep their names."""
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


def attention_mask(T, slots, device):
    """(T, slots + T) bool: True where query t may look: every slot, and the keys up to t."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(T, slots, dtype=torch.bool, device=device), causal], 1) if slots else causal


class Observer:
    """Hooks into the forward pass for the probe and the training statistics (zero cost when unused):
    model(idx, observer=...). A hook may return a replacement tensor/state (interventions) or None.
    `attention = True` asks every attention layer to compute its weights explicitly and hand them to
    on_attention. With registers, every hook sees the data positions only; on_registers the slots."""
    attention = False

    def on_input(self, s, u):
        """u: the normalised input of sublayer s (B, T, d)."""

    def on_attention(self, layer, q, k, v, att, extra=None):
        """q, k, v: (B, H, T, hd) after QK-norm; att: (B, H, T, T) the weights of the data keys (for
        weightings that are not normalised, their share of the row's total weight). extra:
        {name: (B, H, T)} per query, what a variant offers a head to do nothing with: 'slot' (the
        weight on the bias or +1 slot), 'registers' (on the register slots), 'total' (unnormalised
        weightings: the row's total weight, 0 = nothing done), 'gate' (the mean gate of the head's output)."""

    def on_sublayer(self, s, streams):
        """streams: dict name -> (B, T, d) after sublayer s: the operator's streams, then its views
        (computed from the state before s; the ledger's 'read' is what s read)."""

    def on_registers(self, s, streams):
        """With registers: the same streams at the register slots only, (B, n_registers, d)."""


class Attention(nn.Module):
    """Causal self-attention, and the published ways to let a head do nothing (docs/reference.md §1.6):
    a slot every query sees, learned (attn_bias: k', v' per head) or zero (plus_one); a weighting
    other than softmax (WEIGHTINGS); a sigmoid gate on each head's output (attn_gate). SDPA computes
    the fused weightings (the slot as one more key); the others, and what the probe measures, explicit."""

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
        self.weighting = WEIGHTINGS[config.attn_softmax](config)
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
        elif self.weighting.slot:
            slot = (q.new_zeros(B, self.n_head, 1, q.size(-1)),) * 2
        gate = None if self.gate is None else torch.sigmoid(self.gate(x)).view(B, T, self.n_head, -1).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if (observer is not None and observer.attention) or not self.weighting.fused:
            y = self.explicit(q, k, v, slot, gate, observer)
        elif slot is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, torch.cat([slot[0], k], 2), torch.cat([slot[1], v], 2),
                                               attn_mask=attention_mask(T, 1, x.device), dropout_p=dropout)
        if gate is not None:
            y = y * gate.to(y.dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)

    def explicit(self, q, k, v, slot, gate, observer):
        """Attention from explicit weights, in fp32 under autocast (bf16 rounds a score near 50 by up to
        0.125: its probability by up to 13 %), returned in v's dtype; hands the weights of the data
        positions, and what each variant offers a head to do nothing with, to the observer."""
        T, S, R = q.size(2), 0 if slot is None else 1, self.n_registers
        given = q, k, v                                # the observer gets them as the model computed them
        with torch.autocast(q.device.type, enabled=False):
            dtype = torch.promote_types(v.dtype, torch.float32)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            if slot is not None:
                k, v = torch.cat([slot[0].to(dtype), k], 2), torch.cat([slot[1].to(dtype), v], 2)
            scores = (q @ k.transpose(-2, -1)).div_(math.sqrt(k.size(-1)))   # in place: T x T maps are big
            att = self.weighting(scores, attention_mask(T, S, q.device))
            if observer is not None and observer.attention:
                total = None if self.weighting.normalised else att.sum(-1)
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
            return (att @ v).to(given[2].dtype)


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
        """(logits, loss, aux): loss is the cross-entropy only (None without targets); aux holds the
        operator's aux terms averaged over the sublayers (the ledger's commit_rate, differentiable,
        which the penalty multiplies). return_logits=False frees the B x T x V logits at once. Token
        ids are not checked here (the host would wait for the device): the data path checks them."""
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

    def num_params(self, non_embedding=False):
        """Parameter count. non_embedding=True leaves out the lookup tables (position embedding,
        and the token embedding unless it is tied to the head): the parameters that cost FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() + (0 if self.config.tie_embeddings else self.wte.weight.numel())
        return n

    def estimate_flops_per_token(self, T=None):
        """6N + 12*L*H*Q*T (PaLM appendix B), N counting the ledger's extra maps, not the embeddings."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

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
