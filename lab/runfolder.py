"""
The run folder (out_dir): one module owns its layout, so train.py, probe.py, the analysis and the
results scripts agree on where a run's files are and how they are written and read.

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
                    grads (lab.stats.gradient_stats on the same batch: per sublayer the parameter gradient norm,
                    per stream the gradient norm at position 0 and at the others; docs/reference.md §4.11)
             stop:  iter, reason (max_iters, target_val_loss, sigint, sigterm, eval_only, non-finite loss)
  log.jsonl.bad  cut-off last lines set aside by resumed runs (see above), if any
Checkpoints hold only tensors and plain Python values, and are read with torch.load(weights_only=True),
so a checkpoint from a stranger cannot run code; a file that needs more is refused (trust_checkpoint).
"""
import contextlib
import json
import os
import pickle
import re
import secrets
import warnings
import zipfile

import torch

from model import GPT, GPTConfig, options

CKPT, LOG, BAD, SNAPSHOTS = 'ckpt.pt', 'log.jsonl', 'log.jsonl.bad', 'snapshots'


def snapshot_name(iter_num):
    """snapshots/ckpt_<iter>.pt, iter zero-padded to 6 digits so that a glob lists them in order."""
    return f'ckpt_{iter_num:06d}.pt'


def run_files(out_dir):
    """The files of a run in out_dir: ckpt.pt, log.jsonl, log.jsonl.bad and snapshots/ckpt_*.pt."""
    files = [os.path.join(out_dir, f) for f in (CKPT, LOG, BAD) if os.path.lexists(os.path.join(out_dir, f))]
    snapshots = os.path.join(out_dir, SNAPSHOTS)
    if os.path.isdir(snapshots):
        files += [os.path.join(snapshots, f) for f in sorted(os.listdir(snapshots)) if re.fullmatch(r'ckpt_\d+\.pt', f)]
    return files


def describe_run_files(files):
    """'ckpt.pt, log.jsonl, 7 snapshots' for the paths of run_files."""
    names = [os.path.basename(f) for f in files if os.path.basename(os.path.dirname(f)) != SNAPSHOTS]
    n = len(files) - len(names)
    return ', '.join(names + ([f"{n} snapshot{'s' if n > 1 else ''} (snapshots/ckpt_*.pt)"] if n else []))


def check_out_dir(out_dir, init_from, overwrite):
    """One out_dir, one run: a from-scratch run may not mix its checkpoint, log and snapshots with
    those of a run already there. Reads only (ValueError, one line); overwrite=True removes that run
    later (remove_run). Returns True when out_dir holds only the log of a run that stopped before
    its first checkpoint: nothing there to resume or protect, so a new run replaces it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir={out_dir!r} is a file, not a folder")
    if init_from == 'resume' and overwrite:
        raise ValueError("overwrite=True starts the run in out_dir over, init_from='resume' continues it: give one")
    found = run_files(out_dir)
    if init_from == 'scratch' and found and all(os.path.basename(f) in (LOG, BAD) for f in found):
        return True
    if init_from == 'scratch' and found and not overwrite:
        raise ValueError(f"{out_dir} already holds a run ({describe_run_files(found)}); continue it with "
                         f"--init_from=resume, start over with --overwrite=True (removes those files first), "
                         f"or give another --out_dir")


def remove_run(out_dir):
    """overwrite=True: remove the run_files of an earlier run and its temp files, nothing else (an
    emptied snapshots/ folder too). Returns what was removed, described."""
    found = run_files(out_dir)
    for f in found:
        os.remove(f)
    remove_temp_files(out_dir)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(out_dir, SNAPSHOTS))  # only when it is there and nothing else is in it
    return describe_run_files(found)


def save_checkpoint(ckpt, out_dir, name=CKPT):
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


def remove_temp_files(out_dir):
    """The temp files of saves killed midway, in out_dir and in its snapshots/ (before a run writes there)."""
    remove_stale_temp_files(out_dir)
    snapshots = os.path.join(out_dir, SNAPSHOTS)
    if os.path.isdir(snapshots):
        remove_stale_temp_files(snapshots)


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
    bad = os.path.join(os.path.dirname(path), BAD)
    with open(bad, 'ab') as f:  # kept first, then dropped from the log: a crash in between loses nothing
        f.write(last + b'\n')
        f.flush()
        os.fsync(f.fileno())
    with open(path, 'r+b') as f:
        f.truncate(start)
    line = data.count(b'\n') + 1
    return f"{path}: line {line} was cut off ({len(last)} bytes, a run killed while writing it); moved it to {bad}"


class Log:
    """Appends one JSON object per line to out_dir/log.jsonl (and to wandb: project and name given);
    rank 0 only (master). A resumed run (heal=True) first moves a cut last line aside (heal_log)."""

    def __init__(self, out_dir, master, heal=False, wandb_project=None, wandb_name=None, config=None):
        self.path = os.path.join(out_dir, LOG) if master else None
        if master and heal:
            healed = heal_log(self.path)
            if healed:
                print(healed)
        self.wandb = None
        if master and wandb_project:
            import wandb
            self.wandb = wandb
            wandb.init(project=wandb_project, name=wandb_name, config=config)

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
        folder = os.path.dirname(path) or '.'
        hint = (f"{folder} holds the log of a run that stopped before its first checkpoint; start it again with "
                f"`python train.py ... --out_dir={folder}` (its log is replaced)"
                if os.path.isfile(os.path.join(folder, LOG)) else f"train one with `python train.py --out_dir={folder}`")
        raise FileNotFoundError(f"{path}: no such checkpoint file ({hint})")
    if not is_torch_save(path):
        raise ValueError(f"{path}: not a checkpoint (torch.save writes a zip archive holding data.pkl, or a pickle; "
                         f"this file is neither)")
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


def is_torch_save(path):
    """Could this be a torch.save file? A zip archive with a data.pkl (torch >= 1.6), or a pickle
    stream (the legacy format starts with the pickle protocol byte 0x80). Anything else is not a
    checkpoint at all, so it is never answered with the trust_checkpoint hint."""
    with open(path, 'rb') as f:
        head = f.read(2)
    if head[:1] == b'\x80':
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith('data.pkl') for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_model(path, device='cpu', trust=False):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint (see read_checkpoint)."""
    ckpt = read_checkpoint(path, trust=trust)
    known = options()
    model = GPT(GPTConfig(**{k: v for k, v in ckpt['model_args'].items() if k in known}))
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), ckpt


def read_log(path):
    """([(line number, event dict)], cut) of a log.jsonl. cut: the number of the last line when it was
    cut off (no newline after it, and not JSON: a run killed while writing it, or one still writing),
    which is left out; else None. Any other line that is not a JSON event is an error."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such log file (train.py writes out_dir/log.jsonl)")
    with open(path, 'rb') as f:
        lines = f.read().split(b'\n')   # the last item is what follows the last newline ('' normally)
    events, cut = [], None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
            if i == len(lines):
                cut = i
                break
            what = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            if line.rfind(b'{"event": ') > 0:
                raise ValueError(f"{path}: line {i} is not JSON ({what}): a record cut off by a killed run, with "
                                 f"the next one appended to it (by a train.py from before resumed runs set cut "
                                 f"lines aside); delete that line's text before its last '{{\"event\"'") from None
            raise ValueError(f"{path}: line {i} is not JSON ({what}); only a cut-off last line is left out: fix "
                             f"or delete line {i}") from None
        if not isinstance(ev, dict) or 'event' not in ev:
            raise ValueError(f"{path}: line {i} is not a log event (a JSON object with an 'event' key)")
        events.append((i, ev))
    return events, cut


def state(out_dir):
    """'finished' (its log's last record is a stop at max_iters), 'resumable' (a checkpoint is there)
    or 'new': what a script that (re)starts a set of runs does with this folder."""
    log = os.path.join(out_dir, LOG)
    if os.path.isfile(log):
        events, _ = read_log(log)
        last = events[-1][1] if events else {}
        if last.get('event') == 'stop' and last.get('reason') == 'max_iters':
            return 'finished'
    return 'resumable' if os.path.isfile(os.path.join(out_dir, CKPT)) else 'new'


if __name__ == '__main__':   # for shell scripts (results/train_run.sh): python -m lab.runfolder DIR
    import sys
    print(state(sys.argv[1]))
