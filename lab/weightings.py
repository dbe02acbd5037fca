"""
The attention weightings: how a head turns its scores into weights (model.Attention calls the one
its config names, attn_softmax). Softmax is the standard; the others are published ways to let a
head do nothing (docs/reference.md §1.6), each one entry of WEIGHTINGS holding its formula, whether
F.scaled_dot_product_attention computes it (fused), whether its rows sum to 1 (normalised), its
label, its own config settings and its learnt parameters. ATTENTION_VARIANTS names every published
fix, weighting or not, by the GPTConfig flags that make it.
"""
import torch
import torch.nn as nn

from lab.config import option


class Softmax(nn.Module):
    """softmax over the keys a query sees: the standard weighting, and the base of the others.

    fused       F.scaled_dot_product_attention computes it, so unobserved passes take that kernel
    normalised  every row sums to 1 (with the slot, if any); otherwise the row's total weight is a
                way to do nothing, which the probe reports ('total')
    slot        it adds a zero key and value that every query sees (softmax plus one)
    settings    its own GPTConfig options (name -> option(...)), read in __init__ from the config
    """
    fused, normalised, slot = True, True, False
    settings = {}

    def __init__(self, config):
        super().__init__()

    @classmethod
    def check(cls, config):
        """Raise ValueError for a GPTConfig this weighting cannot run."""

    @classmethod
    def label(cls, args):
        """How reports name it, from the model's config dict ('' for plain softmax)."""
        return '' if cls is Softmax else args['attn_softmax']

    def forward(self, scores, mask):
        return scores.masked_fill_(~mask, float('-inf')).softmax(dim=-1)


class PlusOne(Softmax):
    """Softmax plus one (Miller 2023): exp(s_j) / (1 + sum exp(s_j')), a zero key and value every query sees."""
    slot = True

    @classmethod
    def check(cls, config):
        if config.attn_bias:
            raise ValueError("attn_bias and attn_softmax='plus_one' both add a slot (plus_one is attn_bias with "
                             "k' = v' = 0); choose one")


class Clipped(Softmax):
    """Clipped softmax (Bondarenko et al. 2023): clip((zeta - gamma) softmax + gamma, 0, 1), whose exact
    zeros (and ones) let a head attend to nothing."""
    fused = False
    settings = dict(clip_gamma=option(-0.025, "clipped softmax: gamma <= 0 (Bondarenko et al.'s BERT setting)"),
                    clip_zeta=option(1.0, "clipped softmax: zeta >= 1"))

    def __init__(self, config):
        super().__init__(config)
        self.gamma, self.zeta = config.clip_gamma, config.clip_zeta

    @classmethod
    def check(cls, config):
        if config.clip_gamma > 0 or config.clip_zeta < 1:
            raise ValueError(f"clipped softmax needs clip_gamma <= 0 and clip_zeta >= 1, got {config.clip_gamma} "
                             f"and {config.clip_zeta}")

    @classmethod
    def label(cls, args):
        return f"clipped({args.get('clip_gamma', -0.025):g},{args.get('clip_zeta', 1.0):g})"

    def forward(self, scores, mask):
        p = super().forward(scores, mask)
        return ((self.zeta - self.gamma) * p + self.gamma).clamp(0, 1).masked_fill(~mask, 0)


class Sigmoid(Softmax):
    """Sigmoid attention (Ramapuram et al. 2024; Gu et al. 2025 find no sink without normalisation):
    sigmoid(s - log n), n the keys a query sees, so a row sums to ~1 at zero scores."""
    fused, normalised = False, False

    def forward(self, scores, mask):
        n = mask.sum(-1, keepdim=True)
        return torch.sigmoid(scores - torch.log(n.to(scores.dtype))).masked_fill(~mask, 0)


class ReLU(Softmax):
    """ReLU attention (Ran-Milo 2026): relu(s) / n, so the output does not grow with the keys n a query sees."""
    fused, normalised = False, False

    def forward(self, scores, mask):
        return (torch.relu(scores) / mask.sum(-1, keepdim=True)).masked_fill(~mask, 0)


class SinkLogit(Softmax):
    """A learnt sink logit per head (gpt-oss, 2025): exp(s_j) / (exp(z_h) + sum exp(s_j')), a key with
    score z_h and no value; z_h -> -inf is softmax, z_h = 0 (the init) softmax plus one."""
    fused, normalised = False, False

    def __init__(self, config):
        super().__init__(config)
        self.logit = nn.Parameter(torch.zeros(config.n_head, 1, 1))

    def forward(self, scores, mask):
        z = self.logit.to(scores.dtype).expand(*scores.shape[:-1], 1)
        return torch.cat([scores.masked_fill_(~mask, float('-inf')), z], -1).softmax(dim=-1)[..., :-1]


class Softpick(Softmax):
    """Softpick (Zuhri et al. 2025): relu(e^s - 1) / (sum |e^s' - 1| + eps), computed with the row max m
    as relu(e^(s-m) - e^-m) / (sum |e^(s'-m) - e^-m| + eps); a row can be all zeros."""
    fused, normalised = False, False
    eps = 1e-6

    def forward(self, scores, mask):
        m = scores.masked_fill(~mask, float('-inf')).amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
        e = (torch.exp(scores - m) - torch.exp(-m)).masked_fill(~mask, 0)
        return torch.relu(e) / (e.abs().sum(-1, keepdim=True) + self.eps)


WEIGHTINGS = {'softmax': Softmax, 'plus_one': PlusOne, 'clipped': Clipped, 'sigmoid': Sigmoid, 'relu': ReLU,
              'sink_logit': SinkLogit, 'softpick': Softpick}

# the published ways to let a head do nothing (docs/reference.md §1.6), by name: their GPTConfig flags
ATTENTION_VARIANTS = {
    'softmax': {},
    'attn_bias': dict(attn_bias=True),                # Sun et al. 2024
    'plus_one': dict(attn_softmax='plus_one'),        # Miller 2023
    'clipped': dict(attn_softmax='clipped'),          # Bondarenko et al. 2023
    'sigmoid': dict(attn_softmax='sigmoid'),          # Gu et al. 2025; Ramapuram et al. 2024
    'relu': dict(attn_softmax='relu'),                # Ran-Milo 2026
    'sink_logit': dict(attn_softmax='sink_logit'),    # gpt-oss, 2025
    'softpick': dict(attn_softmax='softpick'),        # Zuhri et al. 2025
    'gate_headwise': dict(attn_gate='headwise'),      # Qiu et al. 2025
    'gate_elementwise': dict(attn_gate='elementwise'),
    'registers': dict(n_registers=4),                 # Darcet et al. 2024; Xiao et al. 2024
}
