"""
Train a GPT with the vanilla or the Ledger residual stream (docs/reference.md §2).

    python train.py                                       # laptop demo: small ledger model, builtin corpus, CPU
    python train.py config/ledger_160m.py                 # a paper preset on one GPU
    python train.py config/ledger_160m.py --max_iters=500 --batch_size=6
    torchrun --standalone --nproc_per_node=8 train.py config/ledger_160m.py --batch_size=3
    python train.py config/ledger_160m.py --init_from=resume   # continue out/ledger_160m/ckpt.pt
    python train.py --help                                # every key, its default and what it does

Configuration as in nanoGPT: the defaults below (DEFAULTS, then the model's options from model.py and
each residual operator's penalty weights), then config files (plain Python assignments, config/), then
--key=value overrides (--key value works too). An unknown key or a value of the wrong type stops the
run in one line. On resume, the checkpoint's config takes the place of the defaults, so the same
command line continues the same run.

Everything random is a pure function of the step: the batches (lab.data.Sampler) and the dropout
masks (the generator is re-seeded at every micro-step). A run killed at any point and resumed from
its last checkpoint therefore ends with the same weights as one that never stopped (bitwise, on
CPU in fp32), and the data of a step does not depend on the number of GPUs.

Ctrl-C (SIGINT) and SIGTERM (preemption) both finish the current step, save ckpt.pt, log a stop
record and exit 0; under torchrun every rank stops at the same step. A second Ctrl-C stops at once,
without saving (exit code 130). What lands in out_dir, and the rule of one run per out_dir:
lab/runfolder.py. Exit codes: 0 done (also after Ctrl-C or SIGTERM), 2 bad config or missing data,
3 non-finite loss, 130 stopped at once by a second Ctrl-C (nothing saved since the last checkpoint).
"""

import itertools
import math
import os
import sys
import textwrap
import time
import types

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, RESIDUALS, GPTConfig, options
from lab import runfolder
from lab.cli import check_output_folder
from lab.config import ConfigError, option, parse_args, print_help
from lab.data import (EOT, Sampler, dataset_meta, ensure_dataset, follow_dataset, makedirs, remove_empty, shard_paths,
                      task_mask)
from lab.device import busy_cpu_hint, peak_flops, setup
from lab.report import residual_info
from lab.stats import activation_stats, gradient_stats
from lab.training import (EVAL_SEED, NonFiniteLoss, StopSignals, backward, check_config, configure_optimizer,
                          eval_batch_size, format_time, get_lr, grad_accum_steps, load_optimizer_state, model_args,
                          penalty_weights, rng_states, set_rng_states, update)

# -----------------------------------------------------------------------------
# configuration: these keys, the model's options (model.options(): shape and variants) and the
# penalty weights of the residual operators (model.Residual.penalties)

DEFAULTS = dict(
    # I/O
    out_dir=option('out', "folder of the run: ckpt.pt, log.jsonl, snapshots/ (rank 0 writes; lab/runfolder.py)"),
    eval_interval=option(10, "evaluate and checkpoint every this many steps (and at the last step)"),
    log_interval=option(10, "print and log the training loss every this many steps"),
    eval_iters=option(4, "evaluation micro-batches per split, each of eval_batch_size(block_size) fixed windows"),
    eval_only=option(False, "evaluate once (e.g. a resumed checkpoint) and exit, writing no checkpoint"),
    always_save_checkpoint=option(True, "checkpoint at every evaluation; False: only when val loss improves"),
    snapshot_interval=option(0, "also keep weights-only snapshots/ckpt_<iter>.pt every this many steps (0: off)"),
    init_from=option('scratch', "'scratch' or 'resume' (out_dir/ckpt.pt)", choices=('scratch', 'resume')),
    overwrite=option(False, "a scratch run into an out_dir that holds a run: remove that run's files first "
                            "(else: stop with one line). Never taken from a checkpoint"),
    trust_checkpoint=option(False, "resume from a checkpoint holding pickled objects (which can run code): "
                                   "only for files you trust, e.g. your own from an older version"),
    wandb_log=option(False, "also log to Weights & Biases (imported only when True)"),
    wandb_project=option('ledger-residuals', "wandb project"),
    wandb_run_name=option(None, "wandb run name (None: wandb picks one)", (str, type(None))),
    # data
    dataset=option('builtin', "'builtin', 'trigger' (offline, built on first use), 'finewebedu10B', 'fineweb10B', "
                              "'text' (prepare.py)"),
    data_root=option(None, "where the datasets live (None: $LEDGER_DATA or data/)", (str, type(None))),
    doc_aligned=option(None, "windows start at a document (its bos); None: as the dataset's meta.json says",
                       (bool, type(None))),
    total_batch_size=option(16 * 128, "tokens per optimizer step, summed over ranks and micro-steps"),
    batch_size=option(16, "micro-batch: sequences per forward pass on each rank"),
    # optimizer: AdamW, and its learning-rate schedule
    learning_rate=option(2e-3, "peak learning rate"),
    max_iters=option(60, "optimizer steps in the whole run"),
    weight_decay=option(0.1, "AdamW weight decay"),
    decay_all=option(True, "decay every parameter (the paper); False: only 2-D weights (nanoGPT)"),
    beta1=option(0.9, "AdamW beta1"),
    beta2=option(0.999, "AdamW beta2"),
    grad_clip=option(1.0, "clip the global gradient norm to this; 0 disables"),
    decay_lr=option(True, "warmup then cosine decay; False: constant learning_rate"),
    warmup_iters=option(10, "linear warmup steps"),
    lr_decay_iters=option(None, "step at which the cosine reaches min_lr (None: max_iters)", (int, type(None))),
    min_lr=option(None, "final learning rate (None: 0.1 * learning_rate)", (float, type(None))),
    target_val_loss=option(None, "stop (after saving) once val loss <= this (None: off)", (float, type(None))),
    stats_seqs=option(4, "val sequences of the activation statistics logged at each eval (0: off)"),
    # system
    device=option('auto', "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    dtype=option('auto', "'auto' (bf16 autocast on CUDA if supported, else float32), 'float32', 'bfloat16', "
                         "'float16'", choices=('auto', 'float32', 'bfloat16', 'float16')),
    compile=option('auto', "torch.compile the model: 'auto' (CUDA only), True or False", (str, bool),
                   choices=('auto', True, False)),
    seed=option(1337, "seed of the model init, the batches and the dropout masks"),
    ddp_timeout=option(30.0, "minutes a rank waits for the others at a collective before giving up"),
    debug_nan_at_iter=option(None, "test hook: make the loss NaN at this step", (int, type(None))),
)
# The laptop demo (`python train.py`): the model's defaults except these. vocab_size None: the dataset's.
DEMO_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, residual='ledger', vocab_size=None)
RESUME_MAY_CHANGE = {'dropout'}  # model options that do not change the weights' shapes or meaning


def config_keys():
    """Every key -> option: DEFAULTS, the model's options (the demo's defaults where it differs),
    then each operator's penalty weights (default None: the operator's weight where the model has the
    penalised term, 0 where it has not)."""
    keys = dict(DEFAULTS)
    for name, opt in options().items():
        default = DEMO_MODEL.get(name, opt.default)
        keys[name] = opt._replace(default=default, types=opt.types + (type(None),) * (default is None),
                                  help=opt.help + ("; None: the dataset's (its meta.json)" if default is None else ''))
    for op in RESIDUALS.values():
        for key, (term, opt) in op.penalties.items():
            keys[key] = opt._replace(default=None, types=(float, type(None)),
                                     help=f"{opt.help}. None: {opt.default} for a model with {term}, 0 for one without")
    return keys


def load_config(argv, world_size=1):
    """(cfg, checkpoint or None). Defaults, then config files, then --key=value; when resuming, the
    checkpoint's config replaces the defaults and must keep the model's shape."""
    keys = config_keys()
    given = parse_args(argv, keys)
    values = {k: opt.default for k, opt in keys.items()}
    values.update({k: v for k, (v, _) in given.items()})
    ckpt = None
    if values['init_from'] == 'resume':
        path = os.path.join(values['out_dir'], runfolder.CKPT)
        try:
            ckpt = runfolder.read_checkpoint(path, trust=values['trust_checkpoint'])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
        values = {k: ckpt['config'].get(k, opt.default) for k, opt in keys.items()}
        values.update({k: v for k, (v, _) in given.items()})
        values.update(out_dir=os.path.dirname(path), init_from='resume',  # where it was read, not where it was written
                      trust_checkpoint=given.get('trust_checkpoint', (False,))[0],  # never inherited
                      overwrite=given.get('overwrite', (False,))[0])
        saved = ckpt['model_args']
        for key in options():
            if key in given and key not in RESUME_MAY_CHANGE and given[key][0] != saved.get(key):
                raise ConfigError(f"{given[key][1]} sets {key}={given[key][0]!r} but {path} holds a model with "
                                  f"{key}={saved.get(key)!r}; drop it, or train into a new out_dir")
        values.update({k: v for k, v in saved.items() if k in values and k not in given})
    cfg = types.SimpleNamespace(**values)
    check_config(cfg, keys, world_size)
    return cfg, ckpt


# -----------------------------------------------------------------------------
# setup: where this rank runs, its data, the model and optimizer, out_dir and the log


def setup_device(cfg):
    """Where this rank runs (lab.device.setup: torchrun's rank and world, device, dtype, autocast,
    the process group), and its micro-steps per optimizer step."""
    try:
        r = setup(cfg.device, cfg.dtype, cfg.compile, cfg.ddp_timeout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    r.grad_accum = grad_accum_steps(cfg, r.world_size)
    return r


def setup_data(cfg, r):
    """The samplers: train (every rank the same stream, taking micro-step rank*grad_accum + m, so a step
    sees the same sequences on 1 or N GPUs), the fixed evaluation windows of each split (the same in
    every run, for any batch_size or world size; rank r takes micro-batches r, r+W, ...), and the val
    batch of the activation statistics. The builtin corpus is built once per machine meanwhile the
    other ranks wait; every batch is checked for token ids >= vocab_size on the host."""
    build_error = None
    if r.local_rank == 0:
        try:
            ensure_dataset(cfg.dataset, cfg.data_root)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            build_error = e
    if r.ddp:
        dist.barrier()
    try:
        if build_error is not None:
            raise build_error
        paths = {split: shard_paths(cfg.dataset, split, cfg.data_root) for split in ('train', 'val')}
        r.meta = dataset_meta(cfg.dataset, cfg.data_root) or {}
        follow_dataset(cfg, r.meta)
        sampler = lambda split, n, seed: Sampler(paths[split], n, cfg.block_size, seed, rank=0, device=r.device,
                                                 doc_aligned=cfg.doc_aligned, bos=r.meta.get('bos', EOT),
                                                 vocab_size=cfg.vocab_size)
        r.train_data = sampler('train', cfg.batch_size, cfg.seed)
        r.eval_data = {split: sampler(split, eval_batch_size(cfg.block_size), EVAL_SEED) for split in ('train', 'val')}
        r.stats_batch = sampler('val', cfg.stats_seqs, EVAL_SEED + 1).get(0) if cfg.stats_seqs and r.master else None
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def setup_model(cfg, ckpt, r):
    """The model (the same seed on every rank gives the same init), AdamW, the fp16 scaler, and the
    run's position (iter_num, best_val_loss, the last evaluation), restored from the checkpoint."""
    torch.manual_seed(cfg.seed)
    gptconf = GPTConfig(**({k: v for k, v in ckpt['model_args'].items() if k in options()} if ckpt else model_args(cfg)))
    gptconf.dropout = cfg.dropout
    r.gptconf, r.raw_model = gptconf, GPT(gptconf).to(r.device)
    r.optimizer = configure_optimizer(r.raw_model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                      cfg.decay_all, r.device_type)
    r.scaler = torch.amp.GradScaler(r.device_type, enabled=r.dtype == 'float16')
    r.iter_num, r.best_val_loss, r.val_loss, r.val_loss_iter = 0, math.inf, None, None
    if ckpt is not None:
        r.raw_model.load_state_dict(ckpt['model'])
        load_optimizer_state(r.optimizer, ckpt['optimizer'])
        if ckpt['scaler'] and r.scaler.is_enabled():
            r.scaler.load_state_dict(ckpt['scaler'])
        set_rng_states(ckpt['rng'], r.device)
        r.iter_num, r.best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        r.val_loss, r.val_loss_iter = ckpt['val_loss'], ckpt['val_loss_iter']
        ckpt.clear()  # drop the CPU copy of the weights and moments
    r.model = torch.compile(r.raw_model) if r.compile else r.raw_model  # checkpoints use raw_model: no _orig_mod.
    # DDP: all-reduce buckets of 100 MB instead of 25: the fp32 gradients of the presets (0.7 GB at 160m, 1.1 GB
    # at 290m) then fill 7-11 buckets, so the compiled model is cut into as many graphs (DDPOptimizer cuts it at
    # every bucket) while every bucket but the last still overlaps with the backward. The gradients are views
    # into those buckets, so they are zeroed in place between steps, not set to None.
    r.train_model = DDP(r.model, device_ids=[r.local_rank] if r.device_type == 'cuda' else None, bucket_cap_mb=100,
                        gradient_as_bucket_view=True) if r.ddp else r.model


def start_run(cfg, r, resumed, replace_log=False):
    """Rank 0 makes out_dir ready (overwrite, or the log of a run that never checkpointed: the earlier
    run's files go first), says what will run, and opens the log with a start record."""
    if r.master:
        if (cfg.overwrite or replace_log) and os.path.isdir(cfg.out_dir):  # only now that all could be checked
            removed = runfolder.remove_run(cfg.out_dir)
            if removed:
                print(f"{'overwrite' if cfg.overwrite else 'a run that stopped before its first checkpoint'}: "
                      f"removed the earlier run's {removed} from {cfg.out_dir}")
        r.created = makedirs(cfg.out_dir)
        runfolder.remove_temp_files(cfg.out_dir)
        print(textwrap.fill(' '.join(f"{k}={v!r}" for k, v in vars(cfg).items()), width=110,
                            initial_indent='config: ', subsequent_indent='    '))
        n = r.raw_model.num_params()
        print(f"parameters: {n / 1e6:.2f}M ({n:,}; {r.raw_model.num_params(non_embedding=True):,} without the embeddings)")
        print(f"device {r.device}, {r.dtype}, compile {r.compile}, world size {r.world_size}, {r.grad_accum} "
              f"micro-steps of {cfg.batch_size} x {cfg.block_size} tokens per rank, {cfg.total_batch_size:,} tokens "
              f"per step" + (f", resuming at iter {r.iter_num}" if resumed else ""))
        hint = busy_cpu_hint() if r.device_type == 'cpu' else None
        if hint:
            print(hint)
    r.log = runfolder.Log(cfg.out_dir, r.master, heal=resumed, wandb_project=cfg.wandb_project if cfg.wandb_log
                          else None, wandb_name=cfg.wandb_run_name, config=vars(cfg))
    r.residual = residual_info(r.gptconf.residual)   # the operator's streams and aux terms, for the log
    r.log('start', iter=r.iter_num, params=r.raw_model.num_params(), world_size=r.world_size, grad_accum=r.grad_accum,
          device=r.device, dtype=r.dtype, compile=r.compile, residual=r.residual, config=vars(cfg))


def setup_run(cfg, ckpt, replace_log):
    """This rank, its data, the model and optimizer, out_dir and the log's start record; and the
    training batches: this rank's micro-steps of every step from the run's position on, the first
    one in hand (backward fetches each next one while the device works on the current one)."""
    r = setup_device(cfg)
    setup_data(cfg, r)
    setup_model(cfg, ckpt, r)
    r.created = []
    try:
        start_run(cfg, r, ckpt is not None, replace_log)
    except BaseException:                           # e.g. Ctrl-C while starting: no empty out_dir behind
        remove_empty(r.created)
        raise
    r.first = r.rank * r.grad_accum                 # this rank's first micro-step in the global batch
    r.batches = (fetch(r.train_data, it, r.first + m)
                 for it in itertools.count(r.iter_num) for m in range(r.grad_accum))
    r.batch, r.weights = next(r.batches), penalty_weights(cfg)
    return r


# -----------------------------------------------------------------------------
# one optimizer step


def fetch(data, *index):
    """A batch from a Sampler; a token id >= vocab_size in the data is a one-line error (exit 2)."""
    try:
        return data.get(*index)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def step(cfg, r, stop):
    """One optimizer step: grad_accum micro-steps per rank, gradients synced on the last; then one
    small all-reduce: the global mean losses, and whether any rank got a Ctrl-C or a SIGTERM.
    Returns 'sigint' or 'sigterm' when one did (the step is taken first), else None."""
    t0, lr = time.time(), get_lr(r.iter_num, cfg)
    for group in r.optimizer.param_groups:
        group['lr'] = lr
    sums, r.batch = backward(r.train_model, r.batch, lambda: next(r.batches), r.grad_accum, r.weights,
                             list(r.residual['aux']), r.autocast, r.scaler, cfg.seed, r.iter_num, r.first,
                             r.train_model.no_sync if r.ddp else None, r.iter_num == cfg.debug_nan_at_iter)
    got = torch.tensor([float(name in stop.received) for name in ('SIGINT', 'SIGTERM')], device=r.device)
    flags = torch.cat([sums / (r.grad_accum * r.world_size), got])
    if r.ddp:
        dist.all_reduce(flags)
    *losses, sigint, sigterm = flags.tolist()
    if not math.isfinite(losses[0]):
        r.log('stop', iter=r.iter_num, reason='non-finite loss', loss=str(losses[0]))
        raise NonFiniteLoss(f"loss is {losses[0]} at iter {r.iter_num} (ce {losses[1]}); stopped before the "
                            f"update. " + (f"{cfg.out_dir}/ckpt.pt is left as it was" if r.master else ""))
    update(r.raw_model, r.optimizer, r.scaler, cfg.grad_clip, set_to_none=not r.ddp)
    r.step_times.append(time.time() - t0)
    if r.iter_num % cfg.log_interval == 0:
        log_step(cfg, r, losses, lr, r.step_times)
        r.step_times = []
    r.iter_num += 1
    return 'sigint' if sigint else 'sigterm' if sigterm else None


def log_step(cfg, r, losses, lr, step_times):
    """Print and log the mean loss terms, the speed, MFU (bf16 on a known GPU) and the time left."""
    loss, ce, *aux = losses
    dt = sum(step_times) / len(step_times)
    tokens_per_s = cfg.total_batch_size / dt
    peak = peak_flops(r.device, r.dtype)
    mfu = r.raw_model.estimate_flops_per_token() * tokens_per_s / (peak * r.world_size) if peak else None
    evals_left = cfg.max_iters // cfg.eval_interval - (r.iter_num + 1) // cfg.eval_interval + \
        (cfg.max_iters % cfg.eval_interval != 0)
    eta = (cfg.max_iters - r.iter_num - 1) * dt + evals_left * r.eval_seconds
    aux = dict(zip(r.residual['aux'], aux))
    if r.master:
        print(f"iter {r.iter_num}: loss {loss:.4f} (ce {ce:.4f}{''.join(f', {k} {v:.4f}' for k, v in aux.items())}), "
              f"lr {lr:.2e}, {dt * 1000:.0f} ms/iter, {tokens_per_s:,.0f} tok/s, "
              f"mfu {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}, eta {format_time(eta)}")
    r.log('train', iter=r.iter_num, loss=loss, ce=ce, aux=aux, lr=lr, ms_per_iter=1000 * dt, tokens_per_s=tokens_per_s,
          mfu=mfu, tokens=(r.iter_num + 1) * cfg.total_batch_size, elapsed_s=time.time() - r.t_start)


# -----------------------------------------------------------------------------
# evaluate and save


@torch.no_grad()
def evaluate(cfg, r):
    """Mean CE and aux terms over the fixed evaluation windows of each split (eval_iters micro-batches,
    shared out over the ranks); the task accuracy (argmax on the answers) for datasets with a task;
    the activation and gradient statistics of the stats batch. Each micro-batch's numbers go into its own row of a
    float64 table, zeros in the rows of the other ranks; the table is all-reduced (adding zeros is
    exact), then its rows are summed: the same bits on 1 or N ranks and at any batch_size (on CPU)."""
    r.model.eval()
    out, aux_names = {}, list(r.residual['aux'])
    for split, data in r.eval_data.items():
        rows = torch.zeros(cfg.eval_iters, 3 + len(aux_names), dtype=torch.float64)  # ce, task hits, answers, aux
        for j in range(r.rank, cfg.eval_iters, r.world_size):
            x, y = fetch(data, j)
            answers = task_mask(x, r.meta)
            with r.autocast:
                logits, ce, aux = r.model(x, y, return_logits=answers is not None)
            hits = ((logits.argmax(-1) == y) & answers).sum() if answers is not None else torch.zeros_like(ce)
            n_answers = answers.sum() if answers is not None else torch.zeros_like(ce)
            rows[j] = torch.stack([ce.float(), hits.float(), n_answers.float()] +
                                  [aux[name].float() for name in aux_names]).cpu().double()
        if r.ddp:
            rows = rows.to(r.device)  # NCCL reduces GPU tensors
            dist.all_reduce(rows)
        ce_sum, hits, n_answers, *aux_sums = rows.sum(0).tolist()
        out[f'{split}_loss'] = ce_sum / cfg.eval_iters
        out[f'{split}_aux'] = {name: v / cfg.eval_iters for name, v in zip(aux_names, aux_sums)}
        if task_mask(torch.zeros(1), r.meta) is not None:
            out[f'{split}_task_acc'] = hits / n_answers if n_answers else None
    stats = grads = None
    if r.stats_batch is not None:
        x, y = (t.to(r.device) for t in r.stats_batch)
        with r.autocast:
            stats = activation_stats(r.raw_model, x)
            grads = gradient_stats(r.raw_model, x, y)
    r.model.train()
    return out, stats, grads


def eval_and_save(cfg, r):
    """Evaluate, log, checkpoint; True when val loss reached target_val_loss."""
    t0 = time.time()
    losses, stats, grads = evaluate(cfg, r)
    r.eval_seconds = time.time() - t0
    r.val_loss, r.val_loss_iter = losses['val_loss'], r.iter_num
    improved = r.val_loss < r.best_val_loss
    r.best_val_loss = min(r.best_val_loss, r.val_loss)  # restored on resume, only ever lowered
    reached = cfg.target_val_loss is not None and r.val_loss <= cfg.target_val_loss
    if r.master:
        aux = ''.join(f", val {name} {v:.4f}" for name, v in losses['val_aux'].items())
        if losses.get('val_task_acc') is not None:
            aux += f", val task acc {losses['val_task_acc']:.3f}"
        print(f"step {r.iter_num}: train loss {losses['train_loss']:.4f}, val loss {r.val_loss:.4f}{aux} "
              f"[{r.eval_seconds:.1f} s]")
        if stats:
            print('    top1/median per stream (max over sublayers): ' + ', '.join(
                f"{name} {max(s['top1_median']):.1f}" for name, s in stats.items()) +
                f"; massive entries: {sum(sum(s['n_massive']) for s in stats.values())}")
        if reached:
            print(f"val loss {r.val_loss:.4f} <= target_val_loss {cfg.target_val_loss}: stopping")
    r.log('eval', iter=r.iter_num, **losses, best_val_loss=r.best_val_loss, eval_s=r.eval_seconds, stats=stats,
          grads=grads)
    if not cfg.eval_only and (improved or cfg.always_save_checkpoint or reached):
        save(cfg, r)
    return reached


def save(cfg, r):
    """ckpt.pt, atomically (rank 0; every rank waits for it): all that resuming exactly needs."""
    if r.master:
        runfolder.save_checkpoint(dict(
            model=r.raw_model.state_dict(), optimizer=r.optimizer.state_dict(), scaler=r.scaler.state_dict(),
            model_args=vars(r.gptconf), config=vars(cfg), iter_num=r.iter_num, best_val_loss=r.best_val_loss,
            val_loss=r.val_loss, val_loss_iter=r.val_loss_iter, rng=rng_states(r.device), world_size=r.world_size,
            tokens=r.iter_num * cfg.total_batch_size), cfg.out_dir)
    if r.ddp:
        dist.barrier()


def snapshot(cfg, r):
    """Weights only (no optimizer): small, and enough for probe.py to replay this point of the run."""
    folder, name = os.path.join(cfg.out_dir, runfolder.SNAPSHOTS), runfolder.snapshot_name(r.iter_num)
    if r.master and not os.path.exists(os.path.join(folder, name)):
        os.makedirs(folder, exist_ok=True)
        runfolder.save_checkpoint(dict(model=r.raw_model.state_dict(), model_args=vars(r.gptconf), config=vars(cfg),
                                       iter_num=r.iter_num, tokens=r.iter_num * cfg.total_batch_size,
                                       val_loss=r.val_loss if r.val_loss_iter == r.iter_num else None), folder, name)


# -----------------------------------------------------------------------------
# training


def train(cfg, ckpt=None, replace_log=False):
    """Run the training loop. Returns the process exit code."""
    r = setup_run(cfg, ckpt, replace_log)
    resumed_after_eval = r.val_loss_iter == r.iter_num  # the checkpoint was written right after evaluating
    r.step_times, r.eval_seconds, r.t_start, reason = [], 0.0, time.time(), None
    with StopSignals(r.master) as stop:
        while True:
            last = r.iter_num >= cfg.max_iters
            # evaluate and checkpoint (not again right after resuming from a checkpoint written right after it)
            if cfg.eval_only or ((r.iter_num % cfg.eval_interval == 0 or last) and not resumed_after_eval):
                reason = 'target_val_loss' if eval_and_save(cfg, r) else None
            if cfg.snapshot_interval and not cfg.eval_only and (r.iter_num % cfg.snapshot_interval == 0 or last):
                snapshot(cfg, r)
            reason = 'eval_only' if cfg.eval_only else 'max_iters' if last else reason
            if reason:
                break
            resumed_after_eval = False
            reason = step(cfg, r, stop)
            if reason:  # a Ctrl-C or a SIGTERM on some rank: save, and stop
                save(cfg, r)
                if r.master:
                    print(f"{reason.upper()}: saved {cfg.out_dir}/ckpt.pt at iter {r.iter_num}; continue with "
                          f"--init_from=resume")
                break
        r.log('stop', iter=r.iter_num, reason=reason)
        if r.master:
            print(f"done: {reason} at iter {r.iter_num}, best val loss {r.best_val_loss:.4f}, "
                  f"{format_time(time.time() - r.t_start)}")
        if r.ddp:
            dist.barrier()
        return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print_help(config_keys(), {next(iter(options())): "model (model.options(): shared, then each variant's own)"})
        return 0
    where = f"train.py[rank {os.environ['RANK']}]" if int(os.environ.get('WORLD_SIZE', 1)) > 1 else "train.py"
    cfg = None
    try:
        cfg, ckpt = load_config(argv, int(os.environ.get('WORLD_SIZE', 1)))
        try:
            replace_log = runfolder.check_out_dir(cfg.out_dir, cfg.init_from, cfg.overwrite)
            check_output_folder(cfg.out_dir, 'out_dir')
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return train(cfg, ckpt, replace_log)
    except KeyboardInterrupt:  # Ctrl-C before the training loop, or a second one in it
        kept = f"{cfg.out_dir}/ckpt.pt, if any, is the last checkpoint" if cfg else "nothing was written"
        print(f"{where}: interrupted: stopped at once, without saving ({kept})", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
