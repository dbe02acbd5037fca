"""
The training step that train.py runs and bench.py and tests/test_cuda.py time, and what makes a run
exact to resume: the dropout seed of every micro-step is a pure function of (seed, step, micro-step),
and the generators' states go into the checkpoint. Ctrl-C and SIGTERM ask the loop to stop after a step.
"""
import contextlib
import inspect
import os
import random
import signal
import sys

import numpy as np
import torch

from model import RESIDUALS


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
