"""
The training step that train.py runs and bench.py and tests/test_cuda.py time, and what makes a run
exact to resume: the dropout seed of every micro-step is a pure function of (seed, step, micro-step),
and the generators' states go into the checkpoint. Ctrl-C and SIGTERM ask the loop to stop after a step.
Also what train.py's config means beyond single keys (check_config): the learning-rate schedule, the
micro-steps per step, the evaluation windows and the penalty weights.
"""
import contextlib
import inspect
import math
import os
import random
import re
import signal
import sys

import numpy as np
import torch

from model import RESIDUALS, GPTConfig, options
from lab.config import ConfigError, check_choices


def configure_optimizer(model, weight_decay, learning_rate, betas, decay_all=True, device_type='cpu'):
    """AdamW. decay_all=True decays every parameter (the paper's presets); False decays only 2-D
    weights (nanoGPT's rule: no decay on biases, norms, gates' biases, lam). Fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        groups = [{'params': params, 'weight_decay': weight_decay}]
    else:
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))


def load_optimizer_state(optimizer, state):
    """A checkpoint's optimizer state into optimizer: the checkpoint's moments, this run's
    hyperparameters (its learning rate, betas, weight decay)."""
    hyper = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except ValueError as e:
        raise ConfigError(f"cannot restore the optimizer ({e}); was decay_all changed?") from None
    for group, h in zip(optimizer.param_groups, hyper):
        group.update(h)


def total_loss(ce, aux, weights):
    """The training loss: cross-entropy plus each penalised aux term times its weight ({aux term:
    weight}, from the operators' penalties: model.Residual.penalties)."""
    loss = ce
    for name, weight in weights.items():
        if name in aux:
            loss = loss + weight * aux[name]
    return loss


def backward(model, batch, next_batch, micro_steps, weights, aux_names, autocast=contextlib.nullcontext(),
             scaler=None, seed=None, step=0, first=0, no_sync=None, debug_nan=False):
    """The micro-steps of one optimizer step: forward (without keeping the B x T x V logits), the
    loss (total_loss), backward of loss / micro_steps, the next batch fetched while the device works
    on this one. seed: re-seed the dropout generator per micro-step (first + m is the micro-step's
    index in the global batch). no_sync: DDP's context that skips the gradient all-reduce, for all
    but the last micro-step. Returns (the sums over the micro-steps of [loss, ce, *aux terms], the
    next batch)."""
    sums = torch.zeros(2 + len(aux_names), device=batch[0].device)
    for m in range(micro_steps):
        if seed is not None:
            torch.manual_seed(micro_step_seed(seed, step, first + m))
        x, y = batch
        with no_sync() if no_sync is not None and m < micro_steps - 1 else contextlib.nullcontext():
            with autocast:
                _, ce, aux = model(x, y, return_logits=False)
            loss = total_loss(ce, aux, weights)
            if debug_nan:
                loss = loss * float('nan')
            batch = next_batch()
            (scaler.scale(loss / micro_steps) if scaler is not None else loss / micro_steps).backward()
        sums += torch.stack([loss.detach().float(), ce.detach().float()] + [aux[n].detach().float() for n in aux_names])
    return sums, batch


def update(model, optimizer, scaler=None, grad_clip=1.0, set_to_none=True):
    """Clip the global gradient norm (grad_clip > 0), take the optimizer step, zero the gradients."""
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)


def micro_step_seed(seed, step, micro_step):
    """Seed of the dropout masks of one micro-step: a pure function, so resuming needs no RNG state."""
    return int(np.random.SeedSequence([seed, step, micro_step, 1]).generate_state(1, np.uint64)[0] >> 1)


def rng_states(device):
    """The generators' states (this rank's; its own GPU only, so no context is opened on the others).
    Training re-seeds the dropout generator at every micro-step, so exact resume does not rely on
    them; they are saved so that code run between steps sees the same randomness after a resume.
    Only tensors and plain values, so the checkpoint loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), gauss=float(gauss)),
                python=random.getstate(),
                cuda=torch.cuda.get_rng_state(device) if device.startswith('cuda') else None)


def set_rng_states(states, device):
    torch.set_rng_state(states['torch'])
    n = states['numpy']
    if isinstance(n, dict):
        np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    else:
        np.random.set_state(n)  # a checkpoint from before weights-only saving (loaded with trust_checkpoint)
    random.setstate(states['python'])
    if states.get('cuda') is not None and device.startswith('cuda'):
        torch.cuda.set_rng_state(states['cuda'], device)


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class NonFiniteLoss(Exception):
    """The loss became NaN or inf: exit code 3, the last good checkpoint is left alone."""


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (preemption) ask the training loop to stop: it finishes the
    current step, saves and exits 0 (every rank agrees at the step's all-reduce). A Ctrl-C after
    that stops at once: KeyboardInterrupt, which main() reports in one line (exit code 130)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, master):
        self.master = master
        self.received = set()  # names of the signals received, e.g. {'SIGINT'}
        self.previous = {}

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.master and not self.received:  # os.write: safe inside a signal handler, unlike print
            os.write(sys.stdout.fileno(), (f"\n{name}: stopping after this step, saving first"
                                           + (" (Ctrl-C again: stop at once, without saving)"
                                              if signum == signal.SIGINT else "") + "\n").encode())
        self.received.add(name)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def default_weights(residual):
    """{aux term: weight} of an operator's penalties at their defaults (as train.py runs it when the
    config leaves them None): what bench.py and the CUDA test train with."""
    return {term: opt.default for term, opt in RESIDUALS[residual].penalties.values()}


def penalty_weights(cfg):
    """{aux term: weight} of the model's operator (its penalties, as cfg sets them)."""
    return {term: getattr(cfg, key) for key, (term, _) in RESIDUALS[cfg.residual].penalties.items()}


# -----------------------------------------------------------------------------
# what train.py's config means beyond single keys

EVAL_SEED = 20240520  # eval batches are the same for every run, whatever its seed
EVAL_TOKENS = 2048    # tokens per evaluation micro-batch (the demo's micro-batch; 2 sequences at block_size 1024)


def check_config(cfg, keys, world_size):
    """Checks of single keys' choices and of several keys together; resolves the penalty weights."""
    check_choices(cfg, keys)
    if not re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', cfg.device):
        raise ConfigError(f"device={cfg.device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    try:
        GPTConfig(**{**model_args(cfg), 'vocab_size': cfg.vocab_size or 1})  # None: set from the data later
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for op in RESIDUALS.values():
        for key, (term, opt) in op.penalties.items():
            has = term in RESIDUALS[cfg.residual].aux
            if getattr(cfg, key) is None:
                setattr(cfg, key, opt.default if has else 0.0)
            if getattr(cfg, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
            if getattr(cfg, key) > 0 and not has:
                raise ConfigError(f"{key}={getattr(cfg, key)} penalises {term}, but residual={cfg.residual!r} has no "
                                  f"{term}; set {key}=0")
    for key in ('eval_interval', 'log_interval', 'eval_iters', 'batch_size', 'total_batch_size'):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ('max_iters', 'warmup_iters', 'stats_seqs', 'snapshot_interval'):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.ddp_timeout <= 0:
        raise ConfigError(f"ddp_timeout must be > 0 (minutes), got {cfg.ddp_timeout}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.lr_decay_iters is not None and cfg.lr_decay_iters < cfg.warmup_iters:
        raise ConfigError(f"lr_decay_iters={cfg.lr_decay_iters} is before the end of warmup_iters={cfg.warmup_iters}")
    grad_accum_steps(cfg, world_size)


def model_args(cfg):
    """The model's options (model.options()) among cfg's keys: GPTConfig's arguments."""
    return {k: getattr(cfg, k) for k in options() if hasattr(cfg, k)}


def grad_accum_steps(cfg, world_size):
    """Micro-steps per rank: total_batch_size / (batch_size * block_size * world_size), an integer >= 1."""
    per_pass = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_pass:
        seqs = cfg.total_batch_size // cfg.block_size
        fits_ = [b for b in range(1, seqs + 1) if seqs % (b * world_size) == 0] \
            if cfg.total_batch_size % cfg.block_size == 0 else []
        hint = f"; batch_size values that fit: {', '.join(map(str, fits_))}" if fits_ else ""
        raise ConfigError(f"total_batch_size={cfg.total_batch_size} is not a multiple of batch_size * block_size * "
                          f"world_size = {cfg.batch_size} * {cfg.block_size} * {world_size} = {per_pass}{hint}")
    return cfg.total_batch_size // per_pass


def eval_batch_size(block_size):
    """Sequences per evaluation micro-batch. It depends on block_size alone, so that a run's
    evaluation windows (eval_iters micro-batches of these, drawn with EVAL_SEED) and hence its val
    loss are the same whatever batch_size and number of GPUs ran it."""
    return max(1, EVAL_TOKENS // block_size)


def get_lr(it, cfg):
    """Linear warmup over warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    min_lr = 0.1 * cfg.learning_rate if cfg.min_lr is None else cfg.min_lr
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - min_lr)
