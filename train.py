"""
Train a GPT with the vanilla or the Ledger residual stream (docs/reference.md §2).

    python train.py                                       # laptop demo: small ledger model, builtin corpus, CPU
    python train.py config/ledger_160m.py                 # a paper preset on one GPU
    python train.py config/ledger_160m.py --max_iters=500 --batch_size=6
    torchrun --standalone --nproc_per_node=8 train.py config/ledger_160m.py --batch_size=3
    python train.py config/ledger_160m.py --init_from=resume   # continue out/ledger_160m/ckpt.pt
    python train.py --help                                # every key, its default and what it does

Config files are Python files of plain assignments (see config/). They are applied in order,
then the --key=value overrides. On resume, the checkpoint's config takes the place of the
defaults, so the same command line continues the same run.

Everything random is a pure function of the step: the batches (prepare.Sampler) and the dropout
masks (the generator is re-seeded at every micro-step). A run killed at any point and resumed from
its last checkpoint therefore ends with the same weights as one that never stopped (bitwise, on
CPU in fp32), and the data of a step does not depend on the number of GPUs.

An out_dir holds one run. A from-scratch run into an out_dir that already holds one (ckpt.pt,
log.jsonl or snapshots) stops before touching anything, naming what is there and the ways on:
--init_from=resume continues it, --overwrite=True removes that run's files first (ckpt.pt,
log.jsonl, log.jsonl.bad, snapshots/ckpt_*.pt and temp files; nothing else in the folder).

Ctrl-C (SIGINT) and SIGTERM (preemption) both finish the current step, save ckpt.pt, log a stop
record and exit 0; under torchrun every rank stops at the same step. A second Ctrl-C stops at once,
without saving (exit code 130). A resumed run first sets aside a cut last line of log.jsonl (a run
killed while writing it) into log.jsonl.bad, so that its own records start on a line of their own.

What lands in out_dir (rank 0 writes; files follow the umask):
  ckpt.pt    at every evaluation, at the end and on Ctrl-C/SIGTERM; written atomically, so a crash leaves
             the previous one. A dict: model (state_dict of the uncompiled model), optimizer, scaler,
             model_args (GPTConfig fields), config (this TrainConfig), iter_num (steps done = the next
             step to run), best_val_loss, val_loss and val_loss_iter (the last evaluation), rng,
             world_size, tokens. model.load_model(path) gives the model back.
  snapshots/ckpt_<iter>.pt  with snapshot_interval > 0: weights only (model, model_args, config,
             iter_num, tokens, val_loss), iter zero-padded to 6 digits so a glob lists them in order.
  log.jsonl  one JSON object per line, appended to (a resumed run continues it):
             start: iter, params, world_size, grad_accum, device, dtype, compile, residual (the
                    operator's name, streams, views, aux terms and decoded stream:
                    model.residual_info), config
             train: iter (index of the step just taken), loss (= ce + the penalties: commit_sparsity
                    x aux commit_rate), ce, aux (the operator's aux terms, e.g. {commit_rate: mean
                    commit gate}; {} for vanilla), lr, ms_per_iter, tokens_per_s, mfu (null when
                    unknown), tokens, elapsed_s
             eval:  iter (steps done), train_loss, val_loss (cross-entropy), train_aux, val_aux,
                    train_task_acc and val_task_acc (datasets with a task, e.g. the trigger language:
                    argmax accuracy on the answers; prepare.task_mask), best_val_loss, eval_s, stats (stats.activation_stats of a fixed val batch:
                    {stream: {key: [one value per sublayer]}} for the keys in stats.STATS_KEYS,
                    dominant_dim and peak_layer one integer each; python probe.py out_dir plots them)
             stop:  iter, reason (max_iters, target_val_loss, sigint, sigterm, eval_only, non-finite loss)
  log.jsonl.bad  cut-off last lines set aside by resumed runs (see above), if any
Checkpoints hold only tensors and plain Python values, and are read with torch.load(weights_only=True),
so a checkpoint from a stranger cannot run code; a file that needs more is refused (trust_checkpoint).
Exit codes: 0 done (also after Ctrl-C or SIGTERM), 2 bad config or missing data, 3 non-finite loss,
130 stopped at once by a second Ctrl-C (nothing saved since the last checkpoint).
"""

import ast
import contextlib
import dataclasses
import datetime
import difflib
import json
import math
import os
import random
import re
import secrets
import signal
import sys
import textwrap
import time
import traceback
import types
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, RESIDUALS, GPTConfig, option, read_checkpoint, residual_info, resolve_device
from lab.data import EOT, GPT2_META, Sampler, dataset_meta, ensure_dataset, shard_paths, task_mask
from lab.stats import activation_stats

# -----------------------------------------------------------------------------
# configuration


@dataclass
class TrainKeys:
    """The keys of a training run that are not the model's (those follow in TrainConfig)."""
    # I/O
    out_dir: str = option('out', "folder for ckpt.pt and log.jsonl (written by rank 0 only)")
    eval_interval: int = option(10, "evaluate and checkpoint every this many steps (and at the last step)")
    log_interval: int = option(10, "print and log the training loss every this many steps")
    eval_iters: int = option(4, "micro-batches per split in an evaluation, each of max(1, 2048 // block_size) fixed "
                                "windows whatever batch_size (see eval_batch_size), shared out over the ranks")
    eval_only: bool = option(False, "evaluate once (e.g. a resumed checkpoint) and exit, writing no checkpoint")
    always_save_checkpoint: bool = option(True, "checkpoint at every evaluation; False: only when val loss "
                                                "improves (nanoGPT). A SIGTERM always saves")
    snapshot_interval: int = option(0, "also keep weights-only snapshots out_dir/snapshots/ckpt_<iter, 6 digits>.pt "
                                       "every this many steps, from step 0 to the last (0: off); probe.py reads them")
    init_from: str = option('scratch', "'scratch' or 'resume' (continue from out_dir/ckpt.pt). A scratch run stops "
                                       "if out_dir already holds a run (see overwrite)")
    overwrite: bool = option(False, "init_from='scratch' into an out_dir that holds a run: remove that run's files "
                                    "first (ckpt.pt, log.jsonl, log.jsonl.bad, snapshots/ckpt_*.pt, temp files; "
                                    "nothing else). False: stop with one line instead. Never taken from a checkpoint")
    trust_checkpoint: bool = option(False, "resume from a checkpoint that holds pickled Python objects (which "
                                           "can run code), e.g. one written by an older version of this repo. "
                                           "Only for files you trust; off: such files are refused")
    # wandb
    wandb_log: bool = option(False, "also log to Weights & Biases (imported only when True)")
    wandb_project: str = option('ledger-residuals', "wandb project")
    wandb_run_name: str | None = option(None, "wandb run name (None: wandb picks one)")
    # data
    dataset: str = option('builtin', "'builtin' (offline, built on first use), 'finewebedu10B', "
                                     "'fineweb10B' or 'text' (see prepare.py)")
    data_root: str | None = option(None, "where the datasets live (None: $LEDGER_DATA or data/ next to prepare.py)")
    doc_aligned: bool | None = option(None, "start every training window at a document start (its bos token); "
                                            "None: as the dataset's meta.json says (the trigger language: yes; "
                                            "text: no)")
    total_batch_size: int = option(16 * 128, "tokens per optimizer step, summed over ranks and micro-steps")
    batch_size: int = option(16, "micro-batch: sequences per forward pass on each rank")
    # loss
    commit_sparsity: float | None = option(None, "alpha: loss = CE + alpha * mean commit gate, for models with "
                                                 "commit gates such as the ledger. None: 0.02 for those, 0 for "
                                                 "models without (vanilla), where a value > 0 is an error")
    # optimizer: AdamW
    learning_rate: float = option(2e-3, "peak learning rate")
    max_iters: int = option(60, "optimizer steps in the whole run")
    weight_decay: float = option(0.1, "AdamW weight decay")
    decay_all: bool = option(True, "decay every parameter (the paper); False: only 2-D weights (nanoGPT)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 disables")
    # learning-rate schedule
    decay_lr: bool = option(True, "warmup then cosine decay; False: constant learning_rate")
    warmup_iters: int = option(10, "linear warmup steps")
    lr_decay_iters: int | None = option(None, "step at which the cosine reaches min_lr (None: max_iters)")
    min_lr: float | None = option(None, "final learning rate (None: 0.1 * learning_rate)")
    target_val_loss: float | None = option(None, "stop (after saving) once val loss <= this (None: off)")
    # activation statistics (stats.activation_stats), logged at every evaluation
    stats_seqs: int = option(4, "val sequences for the massive-activation statistics at each eval (0: off)")
    # system
    device: str = option('auto', "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    dtype: str = option('auto', "'auto' (bfloat16 autocast on CUDA if supported, else float32), "
                                "'float32', 'bfloat16' or 'float16' (with a gradient scaler)")
    compile: str | bool = option('auto', "torch.compile the model: 'auto' (on for CUDA only), True or False")
    seed: int = option(1337, "seed of the model init, the batches and the dropout masks")
    ddp_timeout: float = option(30.0, "minutes a rank waits for the others at a collective (the dataset build, "
                                      "checkpoint barriers) before torch.distributed gives up")
    debug_nan_at_iter: int | None = option(None, "test hook: make the loss NaN at this step")


# The laptop demo's model (`python train.py`): GPTConfig's defaults except these (config/demo.py).
# vocab_size None: the dataset's vocabulary, read from its meta.json when the data is there.
DEMO_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, residual='ledger', vocab_size=None)
DATASET_VOCAB = "; None: the dataset's (its meta.json; GPT-2's 50257 for FineWeb)"


def model_key(f):
    """(name, type, field) of a TrainConfig key made from a GPTConfig field: its type and help, the
    demo's default; a default of None (set from the data) makes the type optional too."""
    default = DEMO_MODEL.get(f.name, f.default)
    return (f.name, f.type if default is not None else f.type | None,
            option(default, f.metadata['help'] + (DATASET_VOCAB if default is None else '')))


# A run's config: the keys above, then every field of model.GPTConfig (n_layer, residual, ...) with
# the type and help defined there, so that a model key is defined in one place.
TrainConfig = dataclasses.make_dataclass('TrainConfig', [model_key(f) for f in fields(GPTConfig)],
                                         bases=(TrainKeys,))
MODEL_KEYS = [f.name for f in fields(GPTConfig)]
PENALTIES = {'commit_rate': 'commit_sparsity'}  # aux term of the forward -> the key that weights it in the loss
PENALTY_DEFAULTS = {'commit_sparsity': 0.02}     # the weight None stands for, on a model that has the aux term
RESUME_MAY_CHANGE = {'dropout'}  # model fields that do not change the weights' shapes or meaning
CHOICES = dict(init_from=('scratch', 'resume'), dtype=('auto', 'float32', 'bfloat16', 'float16'),
               compile=('auto', True, False))
EVAL_SEED = 20240520  # eval batches are the same for every run, whatever its seed
EVAL_TOKENS = 2048    # tokens per evaluation micro-batch (the demo's micro-batch; 2 sequences at block_size 1024)


class ConfigError(Exception):
    """A bad command line or config: reported in one line, exit code 2, nothing written."""


class NonFiniteLoss(Exception):
    """The loss became NaN or inf: exit code 3, the last good checkpoint is left alone."""


def type_ok(value, annotation):
    """Does value fit the annotation (int, float, bool, str, or a union of them with None)?"""
    for t in getattr(annotation, '__args__', None) or (annotation,):
        if value is None and t is type(None):
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t in (int, float) and isinstance(value, int) and not isinstance(value, bool):
            return True  # an int is fine for a float
        if t in (float, str) and isinstance(value, t):
            return True
    return False


def type_name(annotation):
    return ' or '.join('None' if t is type(None) else t.__name__
                       for t in getattr(annotation, '__args__', None) or (annotation,))


def check_key(key, value, where):
    """The value to store for key, or ConfigError: unknown key (with close matches) or wrong type."""
    known = {f.name: f for f in fields(TrainConfig)}
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see python train.py --help"
        raise ConfigError(f"unknown key '{key}' {where}{hint}")
    annotation = known[key].type
    if not type_ok(value, annotation):
        raise ConfigError(f"{key} {where} must be {type_name(annotation)}, got {type(value).__name__} {value!r}")
    allowed = getattr(annotation, '__args__', None) or (annotation,)
    if float in allowed and int not in allowed and type(value) is int:
        value = float(value)  # store 1 as 1.0 for a float key
    return value


def parse_value(key, text):
    """A --key=value string as a Python value: a literal if it parses, else the string itself."""
    annotation = next((f.type for f in fields(TrainConfig) if f.name == key), None)
    if text in ('true', 'false') and annotation is not None and type_ok(True, annotation):
        return text == 'true'
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if annotation is not None and not type_ok(value, annotation) and type_ok(text, annotation):
        return text  # e.g. --wandb_run_name=2024 is the string '2024'
    return value


def read_config_file(path):
    """The settings of a config file: its top-level names that do not start with '_'."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    namespace = {}
    try:
        exec(compile(source, path, 'exec'), namespace)
    except Exception as e:
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path]
        line = getattr(e, 'lineno', None) if isinstance(e, SyntaxError) else (lines[-1] if lines else '?')
        raise ConfigError(f"{path}, line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}


def parse_args(argv):
    """{key: (value, where)} from config files (in order) and then --key=value overrides."""
    files = [a for a in argv if not a.startswith('-')]
    overrides = [a for a in argv if a.startswith('-')]
    given = {}
    for path in files:
        for key, value in read_config_file(path).items():
            given[key] = (check_key(key, value, f"in {path}"), path)
    for arg in overrides:
        if not arg.startswith('--') or '=' not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r} (see python train.py --help)")
        key, text = arg[2:].split('=', 1)
        given[key] = (check_key(key, parse_value(key, text), f"(--{key}={text})"), f"--{key}")
    return given


def validate(cfg, world_size):
    """Checks that need several keys or the number of ranks; raises ConfigError."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(map(repr, allowed))}")
    if not re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', cfg.device):
        raise ConfigError(f"device={cfg.device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    try:
        GPTConfig(**{**model_args(cfg), 'vocab_size': cfg.vocab_size or 1})  # None: set from the data later
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, key in PENALTIES.items():
        weight = getattr(cfg, key)
        if weight is None:  # the default: the penalty where the model has the aux term, none where it has not
            weight = PENALTY_DEFAULTS[key] if name in RESIDUALS[cfg.residual].aux else 0.0
            setattr(cfg, key, weight)
        if weight < 0:
            raise ConfigError(f"{key} must be >= 0, got {weight}")
        if weight > 0 and name not in RESIDUALS[cfg.residual].aux:
            raise ConfigError(f"{key}={weight} penalises the {name}, but residual={cfg.residual!r} has no "
                              f"{'commit gates' if name == 'commit_rate' else name}; set {key}=0")
    for key in ('eval_interval', 'log_interval', 'eval_iters', 'batch_size', 'total_batch_size'):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.ddp_timeout <= 0:
        raise ConfigError(f"ddp_timeout must be > 0 (minutes), got {cfg.ddp_timeout}")
    for key in ('max_iters', 'warmup_iters', 'stats_seqs', 'snapshot_interval'):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.lr_decay_iters is not None and cfg.lr_decay_iters < cfg.warmup_iters:
        raise ConfigError(f"lr_decay_iters={cfg.lr_decay_iters} is before the end of warmup_iters={cfg.warmup_iters}")
    grad_accum_steps(cfg, world_size)


def follow_dataset(cfg, meta):
    """Fill in what the dataset decides (its meta.json; FineWeb shards have none): vocab_size when
    None, doc_aligned when None; refuse a vocabulary smaller than the data's, or windows longer than
    the documents of a dataset whose windows must start at a document (the trigger language)."""
    vocab = meta.get('vocab_size')
    if cfg.vocab_size is None:
        cfg.vocab_size = vocab or GPT2_META['vocab_size']
    elif vocab and cfg.vocab_size < vocab:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the {cfg.dataset} vocabulary ({vocab} "
                          f"tokens); drop vocab_size to take the dataset's")
    if cfg.doc_aligned is None:
        cfg.doc_aligned = bool(meta.get('doc_aligned', False))
    doc_len = meta.get('doc_len')
    if cfg.doc_aligned and doc_len and cfg.block_size + 1 > doc_len:
        raise ConfigError(f"block_size={cfg.block_size} needs windows of {cfg.block_size + 1} tokens, but the "
                          f"{cfg.dataset} documents are {doc_len} tokens long (rebuild them longer, e.g. "
                          f"python prepare.py --dataset={cfg.dataset} --trigger_len={cfg.block_size}, or use "
                          f"block_size <= {doc_len - 1})")


def grad_accum_steps(cfg, world_size):
    """Micro-steps per rank: total_batch_size / (batch_size * block_size * world_size), an integer >= 1."""
    per_pass = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_pass:
        seqs = cfg.total_batch_size // cfg.block_size
        fits = [b for b in range(1, seqs + 1) if seqs % (b * world_size) == 0] \
            if cfg.total_batch_size % cfg.block_size == 0 else []
        hint = f"; batch_size values that fit: {', '.join(map(str, fits))}" if fits else ""
        raise ConfigError(f"total_batch_size={cfg.total_batch_size} is not a multiple of batch_size * block_size * "
                          f"world_size = {cfg.batch_size} * {cfg.block_size} * {world_size} = {per_pass}{hint}")
    return cfg.total_batch_size // per_pass


def eval_batch_size(block_size):
    """Sequences per evaluation micro-batch. It depends on block_size alone, so that a run's
    evaluation windows (eval_iters micro-batches of these, drawn with EVAL_SEED) and hence its val
    loss are the same whatever batch_size and number of GPUs ran it."""
    return max(1, EVAL_TOKENS // block_size)


def model_args(cfg):
    return {k: getattr(cfg, k) for k in MODEL_KEYS if hasattr(cfg, k)}


def load_config(argv, world_size=1):
    """(TrainConfig, checkpoint or None). Defaults, then config files, then --key=value; when
    resuming, the checkpoint's config replaces the defaults and must keep the model's shape."""
    given = parse_args(argv)
    values = {f.name: f.default for f in fields(TrainConfig)}
    values.update({k: v for k, (v, _) in given.items()})
    ckpt = None
    if values['init_from'] == 'resume':
        path = os.path.join(values['out_dir'], 'ckpt.pt')
        try:
            ckpt = read_checkpoint(path, trust=values['trust_checkpoint'])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
        saved = ckpt['config']
        values = {f.name: saved.get(f.name, f.default) for f in fields(TrainConfig)}
        values.update({k: v for k, (v, _) in given.items()})
        values.update(out_dir=os.path.dirname(path), init_from='resume',  # where it was read, not where it was written
                      trust_checkpoint=given.get('trust_checkpoint', (False,))[0],  # never inherited
                      overwrite=given.get('overwrite', (False,))[0])
        for key in MODEL_KEYS:
            if key in given and key not in RESUME_MAY_CHANGE and given[key][0] != ckpt['model_args'].get(key):
                raise ConfigError(f"{given[key][1]} sets {key}={given[key][0]!r} but {path} holds a model with "
                                  f"{key}={ckpt['model_args'].get(key)!r}; drop it, or train into a new out_dir")
        values.update({k: v for k, v in ckpt['model_args'].items() if k in values and k not in given})
    cfg = TrainConfig(**values)
    validate(cfg, world_size)
    return cfg, ckpt


def run_files(out_dir):
    """The files of a run in out_dir: ckpt.pt, log.jsonl, log.jsonl.bad and snapshots/ckpt_*.pt."""
    files = [os.path.join(out_dir, f) for f in ('ckpt.pt', 'log.jsonl', 'log.jsonl.bad')
             if os.path.lexists(os.path.join(out_dir, f))]
    snapshots = os.path.join(out_dir, 'snapshots')
    if os.path.isdir(snapshots):
        files += [os.path.join(snapshots, f) for f in sorted(os.listdir(snapshots)) if re.fullmatch(r'ckpt_\d+\.pt', f)]
    return files


def describe_run_files(files):
    """'ckpt.pt, log.jsonl, 7 snapshots' for the paths of run_files."""
    names = [os.path.basename(f) for f in files if os.path.basename(os.path.dirname(f)) != 'snapshots']
    n = len(files) - len(names)
    return ', '.join(names + ([f"{n} snapshot{'s' if n > 1 else ''} (snapshots/ckpt_*.pt)"] if n else []))


def check_out_dir(cfg):
    """One out_dir, one run: a from-scratch run may not mix its checkpoint, log and snapshots with
    those of a run already there. Reads only; overwrite=True removes that run later (remove_run)."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ConfigError(f"out_dir={cfg.out_dir!r} is a file, not a folder")
    if cfg.init_from == 'resume' and cfg.overwrite:
        raise ConfigError("overwrite=True starts the run in out_dir over, init_from='resume' continues it: give one")
    found = run_files(cfg.out_dir)
    if cfg.init_from == 'scratch' and found and not cfg.overwrite:
        raise ConfigError(f"{cfg.out_dir} already holds a run ({describe_run_files(found)}); continue it with "
                          f"--init_from=resume, start over with --overwrite=True (removes those files first), "
                          f"or give another --out_dir")


def remove_run(out_dir):
    """overwrite=True: remove the run_files of an earlier run and its temp files, nothing else (an
    emptied snapshots/ folder too). Returns what was removed, described."""
    found = run_files(out_dir)
    for f in found:
        os.remove(f)
    snapshots = os.path.join(out_dir, 'snapshots')
    if os.path.isdir(snapshots):
        remove_stale_temp_files(snapshots)
        with contextlib.suppress(OSError):
            os.rmdir(snapshots)  # only when nothing else is in it
    remove_stale_temp_files(out_dir)
    return describe_run_files(found)


def print_help():
    print("usage: python train.py [config/file.py ...] [--key=value ...]")
    print("\nConfig files (plain Python assignments) are applied in order, then the --key=value overrides.")
    print("Values are Python literals (True, 3e-4, None, 'text'); a bare word is a string.\n")
    for f in fields(TrainConfig):
        if f.name == MODEL_KEYS[0]:
            print("\n  model (the fields of model.GPTConfig):")
        print(f"  --{f.name}={f.default!r}  [{type_name(f.type)}]")
        print(textwrap.fill(f.metadata['help'], width=100, initial_indent=' ' * 8, subsequent_indent=' ' * 8))


def format_config(cfg):
    return textwrap.fill(' '.join(f"{k}={v!r}" for k, v in asdict(cfg).items()), width=110,
                         initial_indent='config: ', subsequent_indent='    ')

# -----------------------------------------------------------------------------
# small helpers


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


def total_loss(ce, aux, cfg):
    """The training loss: cross-entropy plus each penalised aux term times its weight (PENALTIES; a
    weight of None is the default, PENALTY_DEFAULTS, as validate() resolves it)."""
    loss = ce
    for name, key in PENALTIES.items():
        if name in aux:
            weight = getattr(cfg, key)
            loss = loss + (PENALTY_DEFAULTS[key] if weight is None else weight) * aux[name]
    return loss


def micro_step_seed(seed, step, micro_step):
    """Seed of the dropout masks of one micro-step: a pure function, so resuming needs no RNG state."""
    return int(np.random.SeedSequence([seed, step, micro_step, 1]).generate_state(1, np.uint64)[0] >> 1)


# dense (no sparsity: half the datasheets' headline) bf16 tensor-core peak FLOP/s, by
# torch.cuda.get_device_name(); the first match wins. NVL and PCIe cards have lower clocks or fewer
# SMs than the SXM ones of the same name ('NVIDIA H100 80GB HBM3' is the SXM H100, 'NVIDIA H200' the
# SXM H200); both NVL cards are rated 1,671 TFLOP/s with sparsity.
PEAK_FLOPS = [
    (r'H100.*NVL', 836e12), (r'H100.*PCIe', 756e12), (r'H100', 989e12),
    (r'H200.*NVL', 836e12), (r'H200', 989e12),
    (r'A100', 312e12), (r'\bL4\b', 121e12), (r'\bA10\b', 125e12), (r'RTX 4090', 165e12),
]


def peak_flops(device, dtype):
    """The GPU's peak FLOP/s for MFU (train.py and bench.py): only for bf16 on a GPU of PEAK_FLOPS,
    the table's precision; None otherwise (CPU, fp32, fp16, an unknown GPU), reported as n/a."""
    if not device.startswith('cuda') or dtype != 'bfloat16':
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, name)), None)


def save_checkpoint(ckpt, out_dir, name='ckpt.pt'):
    """torch.save, atomically: readers (and a crash at any moment) see the old file or the whole
    new one. Written to a temp file in out_dir, fsynced, renamed over the old one, dir fsynced.
    The file's mode follows the umask like any other file (tempfile.mkstemp's would be 0600, which
    a shared group folder cannot read)."""
    path = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask takes its bits off
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if os.name == 'posix':
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def remove_stale_temp_files(out_dir):
    """Temp files of a save_checkpoint that was killed midway (they never carry a checkpoint's name)."""
    for f in os.listdir(out_dir):
        if f.startswith('.') and '.pt.' in f and f.endswith('.tmp'):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, f))


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


def busy_cpu_hint():
    """A line for CPU runs on a machine where other processes keep cores busy (1-minute load
    average), None otherwise. torch's OpenMP threads spin-wait for each other, so a thread that
    shares its core with other work slows every step down: the demo's step on 2 cores, one kept
    busy by another process, took 20 s with torch's 2 threads and 10 s with 1 (README,
    Troubleshooting). The default stays torch's, a thread per core: a load average lags and is
    coarse, and a thread count chosen from it would differ from run to run; a hint costs nothing
    when it is wrong."""
    threads = torch.get_num_threads()
    if os.environ.get('OMP_NUM_THREADS') or threads < 2 or not hasattr(os, 'getloadavg'):
        return None
    busy = os.getloadavg()[0]  # mostly others' load: this run has only just started
    if busy < (os.cpu_count() or threads) - threads + 0.9:  # a core's worth of others' work or more
        return None
    return (f"note: other processes keep about {busy:.1f} of the {os.cpu_count()} CPU cores busy (load average) and "
            f"torch's {threads} threads spin-wait for each other, which can make every step several times slower; "
            f"OMP_NUM_THREADS=1 (or the number of idle cores) before the command is faster then")


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def heal_log(path):
    """A run killed while writing log.jsonl can leave its last line cut off (no newline at the end).
    Before a resumed run appends to it, that line is moved to log.jsonl.bad (appended there), so
    every record stays on a line of its own and the log reads as one run again. Returns a line
    saying so, or None when there was nothing to heal."""
    if not os.path.isfile(path):
        return None
    with open(path, 'rb') as f:
        data = f.read()
    if not data or data.endswith(b'\n'):
        return None
    start = data.rfind(b'\n') + 1
    last = data[start:]
    try:
        whole = isinstance(json.loads(last), dict)  # cut right before its newline: only that is missing
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        whole = False
    if whole:
        with open(path, 'ab') as f:
            f.write(b'\n')
        return None
    bad = path + '.bad'
    with open(bad, 'ab') as f:  # kept first, then dropped from the log: a crash in between loses nothing
        f.write(last + b'\n')
        f.flush()
        os.fsync(f.fileno())
    with open(path, 'r+b') as f:
        f.truncate(start)
    line = data.count(b'\n') + 1
    return f"{path}: line {line} was cut off ({len(last)} bytes, a run killed while writing it); moved it to {bad}"


class Log:
    """Appends one JSON object per line to out_dir/log.jsonl (and to wandb); rank 0 only. A resumed
    run (heal=True) first moves a cut last line aside (heal_log)."""

    def __init__(self, cfg, master, heal=False):
        self.path = os.path.join(cfg.out_dir, 'log.jsonl') if master else None
        if master and heal:
            healed = heal_log(self.path)
            if healed:
                print(healed)
        self.wandb = None
        if master and cfg.wandb_log:
            import wandb
            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))

    def __call__(self, event, **values):
        if self.path is None:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(dict(event=event, **values)) + '\n')
        if self.wandb is not None and event in ('train', 'eval'):
            scalars = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != 'iter'}
            for stream, stats in (values.get('stats') or {}).items():
                scalars[f"stats/{stream}_top1_median_max"] = max(stats['top1_median'])
                scalars[f"stats/{stream}_n_massive"] = sum(stats['n_massive'])
            self.wandb.log(scalars, step=values['iter'])


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

# -----------------------------------------------------------------------------
# training


def train(cfg, ckpt=None):
    """Run the training loop. Returns the process exit code."""
    # distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = 'RANK' in os.environ
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    master = rank == 0

    # device and precision
    try:
        device, dtype, use_compile = resolve_device(cfg.device, cfg.dtype, cfg.compile)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if device.startswith('cuda'):
        if ddp:
            if device != 'cuda':
                raise ConfigError(f"device={cfg.device!r}: under torchrun use device='cuda' (each rank takes cuda:LOCAL_RANK)")
            device = f'cuda:{local_rank}'
        elif device == 'cuda':
            device = 'cuda:0'
        torch.cuda.set_device(device)
    elif device == 'mps' and ddp:
        raise ConfigError("device='mps' is not available under torchrun")
    device_type = device.split(':')[0]
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    autocast = contextlib.nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    if device_type == 'cuda':
        torch.set_float32_matmul_precision('high')  # TF32 for the fp32 matmuls
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)  # exact resume on CPU

    if ddp:  # ddp_timeout bounds every wait, e.g. for rank 0 building the dataset or writing a checkpoint
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo',
                                device_id=torch.device(device) if device_type == 'cuda' else None,
                                timeout=datetime.timedelta(minutes=cfg.ddp_timeout))
    grad_accum = grad_accum_steps(cfg, world_size)

    # data: the builtin corpus is built once per machine while the other ranks wait
    build_error = None
    if local_rank == 0:
        try:
            ensure_dataset(cfg.dataset, cfg.data_root)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            build_error = e
    if ddp:
        dist.barrier()
    try:
        if build_error is not None:
            raise build_error
        train_paths = shard_paths(cfg.dataset, 'train', cfg.data_root)
        val_paths = shard_paths(cfg.dataset, 'val', cfg.data_root)
        meta = dataset_meta(cfg.dataset, cfg.data_root) or {}
        follow_dataset(cfg, meta)
        # every batch is checked for token ids >= vocab_size on the host, before it goes to the device
        sampler = lambda paths, n, seed: Sampler(paths, n, cfg.block_size, seed, rank=0, doc_aligned=cfg.doc_aligned,
                                                 device=device, bos=meta.get('bos', EOT), vocab_size=cfg.vocab_size)
        # Training: every rank uses the same stream (seed, rank 0) and takes micro-step
        # rank*grad_accum + m, so a step sees the same sequences on 1 or N GPUs.
        train_data = sampler(train_paths, cfg.batch_size, cfg.seed)
        # Evaluation: eval_iters micro-batches of eval_batch_size(block_size) windows, the same in every
        # run and for any batch_size or world size; rank r takes micro-batches r, r+W, ...
        eval_data = {'train': sampler(train_paths, eval_batch_size(cfg.block_size), EVAL_SEED),
                     'val': sampler(val_paths, eval_batch_size(cfg.block_size), EVAL_SEED)}
        stats_x = sampler(val_paths, cfg.stats_seqs, EVAL_SEED + 1).get(0)[0] if cfg.stats_seqs and master else None
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None

    # model and optimizer; the same seed on every rank gives the same init
    torch.manual_seed(cfg.seed)
    gptconf = GPTConfig(**({k: v for k, v in ckpt['model_args'].items() if k in MODEL_KEYS} if ckpt else model_args(cfg)))
    gptconf.dropout = cfg.dropout
    raw_model = GPT(gptconf).to(device)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                              cfg.decay_all, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    iter_num, best_val_loss, val_loss, val_loss_iter = 0, math.inf, None, None
    resumed = ckpt is not None
    if resumed:
        raw_model.load_state_dict(ckpt['model'])
        hyper = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except ValueError as e:
            raise ConfigError(f"cannot restore the optimizer ({e}); was decay_all changed?") from None
        for group, h in zip(optimizer.param_groups, hyper):
            group.update(h)  # this run's hyperparameters, the checkpoint's moments
        if ckpt['scaler'] and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        set_rng_states(ckpt['rng'], device)
        iter_num = ckpt['iter_num']
        best_val_loss = ckpt['best_val_loss']
        val_loss, val_loss_iter = ckpt['val_loss'], ckpt['val_loss_iter']
        ckpt.clear()  # drop the CPU copy of the weights and moments
    resumed_after_eval = val_loss_iter == iter_num  # the checkpoint was written right after evaluating
    residual = residual_info(gptconf.residual)   # the operator's streams and aux terms, for the log
    aux_names = list(residual['aux'])
    has_task = task_mask(torch.zeros(1), meta) is not None   # the dataset scores a task (trigger: the answers)
    model = torch.compile(raw_model) if use_compile else raw_model  # checkpoints use raw_model: no _orig_mod.
    # DDP: all-reduce buckets of 100 MB instead of the default 25. The fp32 gradients of the presets
    # (0.7 GB at 160m, 1.1 GB at 290m) then fill 7-11 buckets, so the compiled model is cut into as
    # many graphs (DDPOptimizer cuts it at every bucket: ~43 pieces at 290m with 25 MB) and launches as
    # many all-reduces, while every bucket but the last still overlaps with the backward. The
    # gradients are views into those buckets (gradient_as_bucket_view) instead of a second copy of
    # them (1.1 GB at 290m); so they are zeroed in place between steps, not set to None, which would
    # make the next backward allocate fresh ones and copy them into the buckets.
    train_model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, bucket_cap_mb=100,
                      gradient_as_bucket_view=True) if ddp else model

    snapshot_dir = os.path.join(cfg.out_dir, 'snapshots')
    if master:
        if cfg.overwrite and os.path.isdir(cfg.out_dir):  # only now that everything before could be checked
            removed = remove_run(cfg.out_dir)
            if removed:
                print(f"overwrite: removed the earlier run's {removed} from {cfg.out_dir}")
        os.makedirs(cfg.out_dir, exist_ok=True)
        remove_stale_temp_files(cfg.out_dir)
        if os.path.isdir(snapshot_dir):
            remove_stale_temp_files(snapshot_dir)
        print(format_config(cfg))
        print(f"parameters: {raw_model.num_params() / 1e6:.2f}M ({raw_model.num_params():,}; "
              f"{raw_model.num_params(non_embedding=True):,} without the embeddings)")
        print(f"device {device}, {dtype}, compile {use_compile}, world size {world_size}, "
              f"{grad_accum} micro-steps of {cfg.batch_size} x {cfg.block_size} tokens per rank, "
              f"{cfg.total_batch_size:,} tokens per step" + (f", resuming at iter {iter_num}" if resumed else ""))
        hint = busy_cpu_hint() if device_type == 'cpu' else None
        if hint:
            print(hint)
    log = Log(cfg, master, heal=resumed)
    log('start', iter=iter_num, params=raw_model.num_params(), world_size=world_size, grad_accum=grad_accum,
        device=device, dtype=dtype, compile=use_compile, residual=residual, config=asdict(cfg))

    def fetch(data, *index):
        """A batch from a Sampler; a token id >= vocab_size in the data is a one-line error (exit 2)."""
        try:
            x, y = data.get(*index)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return x.to(device), y.to(device)  # no-op on CUDA, where the sampler already copied them

    @torch.no_grad()
    def evaluate():
        """Mean CE and aux terms over the fixed evaluation windows of each split (eval_iters
        micro-batches, shared out over the ranks); the task accuracy (argmax on the answers) for
        datasets that have a task.

        Each micro-batch's numbers go into its own row of a float64 table, zeros in the rows of the
        other ranks; the table is all-reduced (adding zeros is exact), then its rows are summed. The
        table, and so the result, is the same bits on 1 or N ranks and at any batch_size (on CPU;
        nothing is claimed for GPU kernels)."""
        model.eval()
        out = {}
        for split, data in eval_data.items():
            rows = torch.zeros(cfg.eval_iters, 3 + len(aux_names), dtype=torch.float64)  # ce, task hits, answers, aux
            for j in range(rank, cfg.eval_iters, world_size):
                x, y = fetch(data, j)
                answers = task_mask(x, meta)
                with autocast:
                    logits, ce, aux = model(x, y, return_logits=answers is not None)
                hits = ((logits.argmax(-1) == y) & answers).sum() if answers is not None else torch.zeros_like(ce)
                n_answers = answers.sum() if answers is not None else torch.zeros_like(ce)
                rows[j] = torch.stack([ce.float(), hits.float(), n_answers.float()] +
                                      [aux[name].float() for name in aux_names]).cpu().double()
            if ddp:
                rows = rows.to(device)  # NCCL reduces GPU tensors
                dist.all_reduce(rows)
            ce_sum, hits, n_answers, *aux_sums = rows.sum(0).tolist()
            out[f'{split}_loss'] = ce_sum / cfg.eval_iters
            out[f'{split}_aux'] = {name: v / cfg.eval_iters for name, v in zip(aux_names, aux_sums)}
            if has_task:
                out[f'{split}_task_acc'] = hits / n_answers if n_answers else None
        stats = None
        if stats_x is not None:
            with autocast:
                stats = activation_stats(raw_model, stats_x.to(device))
        model.train()
        return out, stats

    def checkpoint():
        return dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    model_args=asdict(gptconf), config=asdict(cfg), iter_num=iter_num,
                    best_val_loss=best_val_loss, val_loss=val_loss, val_loss_iter=val_loss_iter,
                    rng=rng_states(device),
                    world_size=world_size, tokens=iter_num * cfg.total_batch_size)

    def save():
        if master:
            save_checkpoint(checkpoint(), cfg.out_dir)
        if ddp:
            dist.barrier()

    def snapshot():
        """Weights only (no optimizer): small, and enough for probe.py to replay this point of the run."""
        name = f'ckpt_{iter_num:06d}.pt'
        if master and not os.path.exists(os.path.join(snapshot_dir, name)):
            os.makedirs(snapshot_dir, exist_ok=True)
            save_checkpoint(dict(model=raw_model.state_dict(), model_args=asdict(gptconf), config=asdict(cfg),
                                 iter_num=iter_num, tokens=iter_num * cfg.total_batch_size,
                                 val_loss=val_loss if val_loss_iter == iter_num else None), snapshot_dir, name)

    # Ctrl-C and SIGTERM (preemption): finish the current step, save, exit 0; all ranks agree via the all-reduce
    stop = StopSignals(master)

    flops_per_token = raw_model.estimate_flops_per_token()
    peak = peak_flops(device, dtype)  # None (mfu n/a) unless bf16 on a known GPU
    x, y = fetch(train_data, iter_num, rank * grad_accum)
    step_times, eval_seconds, t_start = [], 0.0, time.time()
    reason = None
    with stop:
        while True:
            # evaluate and checkpoint (not again right after resuming from a checkpoint written after
            # evaluating this very step)
            last = iter_num >= cfg.max_iters
            if cfg.eval_only or ((iter_num % cfg.eval_interval == 0 or last) and not resumed_after_eval):
                t0 = time.time()
                losses, stats = evaluate()
                eval_seconds = time.time() - t0
                val_loss, val_loss_iter = losses['val_loss'], iter_num
                improved = val_loss < best_val_loss
                best_val_loss = min(best_val_loss, val_loss)  # restored on resume, only ever lowered
                reached = cfg.target_val_loss is not None and val_loss <= cfg.target_val_loss
                if master:
                    aux = ''.join(f", val {name} {v:.4f}" for name, v in losses['val_aux'].items())
                    if losses.get('val_task_acc') is not None:
                        aux += f", val task acc {losses['val_task_acc']:.3f}"
                    print(f"step {iter_num}: train loss {losses['train_loss']:.4f}, val loss {val_loss:.4f}{aux} "
                          f"[{eval_seconds:.1f} s]")
                    if stats:
                        print('    top1/median per stream (max over sublayers): ' + ', '.join(
                            f"{name} {max(s['top1_median']):.1f}" for name, s in stats.items()) +
                            f"; massive entries: {sum(sum(s['n_massive']) for s in stats.values())}")
                log('eval', iter=iter_num, **losses, best_val_loss=best_val_loss, eval_s=eval_seconds, stats=stats)
                if not cfg.eval_only and (improved or cfg.always_save_checkpoint or reached):
                    save()
                if reached:
                    reason = 'target_val_loss'
                    if master:
                        print(f"val loss {val_loss:.4f} <= target_val_loss {cfg.target_val_loss}: stopping")
            if cfg.snapshot_interval and not cfg.eval_only and (iter_num % cfg.snapshot_interval == 0 or last):
                snapshot()
            if cfg.eval_only:
                reason = 'eval_only'
            elif last:
                reason = 'max_iters'
            if reason:
                break
            resumed_after_eval = False

            # one optimizer step: grad_accum micro-steps per rank, gradients synced on the last
            t0 = time.time()
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr
            sums = torch.zeros(2 + len(aux_names), device=device)  # loss, ce, aux terms over this rank's micro-steps
            for m in range(grad_accum):
                g = rank * grad_accum + m  # the micro-step's index in the global batch
                torch.manual_seed(micro_step_seed(cfg.seed, iter_num, g))
                sync = not ddp or m == grad_accum - 1
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with autocast:
                        _, ce, aux = train_model(x, y, return_logits=False)  # the B x T x V logits are not kept
                    loss = total_loss(ce, aux, cfg)
                    if iter_num == cfg.debug_nan_at_iter:
                        loss = loss * float('nan')
                    # fetch the next batch while the device works on this one
                    x, y = fetch(train_data, *((iter_num, g + 1) if m + 1 < grad_accum else (iter_num + 1, rank * grad_accum)))
                    scaler.scale(loss / grad_accum).backward()
                sums += torch.stack([loss.detach().float(), ce.detach().float()] +
                                    [aux[name].detach().float() for name in aux_names])
            # one small all-reduce: the global mean losses, and whether any rank got a Ctrl-C or a SIGTERM
            got = [float(name in stop.received) for name in ('SIGINT', 'SIGTERM')]
            flags = torch.cat([sums / (grad_accum * world_size), torch.tensor(got, device=device)])
            if ddp:
                dist.all_reduce(flags)
            loss_f, ce_f, *aux_f, sigint, sigterm = flags.tolist()
            aux_f = dict(zip(aux_names, aux_f))
            if not math.isfinite(loss_f):
                log('stop', iter=iter_num, reason='non-finite loss', loss=str(loss_f))
                raise NonFiniteLoss(f"loss is {loss_f} at iter {iter_num} (ce {ce_f}); stopped before the update. "
                                    + (f"{cfg.out_dir}/ckpt.pt is left as it was" if master else ""))
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=not ddp)  # DDP: keep the gradients as views into its buckets
            step_times.append(time.time() - t0)

            if iter_num % cfg.log_interval == 0:
                dt = sum(step_times) / len(step_times)
                step_times = []
                tokens_per_s = cfg.total_batch_size / dt
                mfu = flops_per_token * tokens_per_s / (peak * world_size) if peak else None
                evals_left = cfg.max_iters // cfg.eval_interval - (iter_num + 1) // cfg.eval_interval + \
                    (cfg.max_iters % cfg.eval_interval != 0)
                eta = (cfg.max_iters - iter_num - 1) * dt + evals_left * eval_seconds
                if master:
                    aux = ''.join(f", {name} {v:.4f}" for name, v in aux_f.items())
                    print(f"iter {iter_num}: loss {loss_f:.4f} (ce {ce_f:.4f}{aux}), lr {lr:.2e}, "
                          f"{dt * 1000:.0f} ms/iter, {tokens_per_s:,.0f} tok/s, "
                          f"mfu {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}, eta {format_time(eta)}")
                log('train', iter=iter_num, loss=loss_f, ce=ce_f, aux=aux_f, lr=lr,
                    ms_per_iter=1000 * dt, tokens_per_s=tokens_per_s, mfu=mfu,
                    tokens=(iter_num + 1) * cfg.total_batch_size, elapsed_s=time.time() - t_start)
            iter_num += 1

            if sigint or sigterm:
                reason = 'sigint' if sigint else 'sigterm'
                save()
                if master:
                    print(f"{reason.upper()}: saved {cfg.out_dir}/ckpt.pt at iter {iter_num}; continue with "
                          f"--init_from=resume")
                break
        log('stop', iter=iter_num, reason=reason)
        if master:
            print(f"done: {reason} at iter {iter_num}, best val loss {best_val_loss:.4f}, "
                  f"{format_time(time.time() - t_start)}")
        if ddp:
            dist.barrier()
        return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print_help()
        return 0
    where = f"train.py[rank {os.environ['RANK']}]" if int(os.environ.get('WORLD_SIZE', 1)) > 1 else "train.py"
    cfg = None
    try:
        cfg, ckpt = load_config(argv, int(os.environ.get('WORLD_SIZE', 1)))
        check_out_dir(cfg)
        return train(cfg, ckpt)
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
