"""
Massive activations and attention sinks, measured (definitions: docs/reference.md §4).

    python probe.py out/ckpt.pt [more.pt ...] [--out DIR] [--num_seqs N] [--seq_len T]
                    [--text "..." ...] [--interventions] [--soften_k K] [--seed S] [--doc_aligned]
                    [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16] [--batch_size B]
                    [--trust_checkpoint] [--base_url URL] [--data_root DIR]
    python probe.py gpt2 out/ledger_160m/ckpt.pt            # OpenAI GPT-2 (fetched once) next to a checkpoint
    python probe.py out/ckpt.pt hf:EleutherAI/pythia-160m    # any Hugging Face causal LM (lab/hf.py) next to it
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
So can any decoder-only causal LM that transformers loads (lab/hf.py; transformers is imported only
then): hf:REPO_OR_FOLDER[@REVISION], hf:REPO@a,b,c for several revisions. It is probed with its own
tokenizer and BOS convention, on --text or on the built-in corpus' validation documents tokenised by
it; revisions that name a step (step1000, checkpoint-500) of one model are also drawn as a training
run against that step (trajectory.json, trajectory_*.png). docs/reference.md §4.9 says what its
sublayers are.

For each checkpoint: N windows of T tokens from the validation shards of the checkpoint's dataset
(prepare.Sampler, fixed seed, so every checkpoint of one dataset sees the same windows), or the
--text prompts. Several prompts are truncated to the shortest one so that they stack into one
batch; nothing is prepended (write <|endoftext|> into a prompt to start it with that token).

What is measured, also under --interventions: lab/measure.py (definitions: docs/reference.md §4).
What is computed for training runs: lab/trajectories.py; for --group: lab/groups.py.

Outputs: a text report on stdout, DIR/probe.json, and PNGs in DIR named <checkpoint>_*.png
(layerwise, tokens_channels, pos0_depth, alpha1) plus overlay_top1_median.png for several
checkpoints (groups.png instead in --group mode); for runs DIR/trajectory.json and PNGs
trajectory_<stream>.png, trajectory_loss.png, trajectory_heatmap_<run>.png (lab/plots.py draws them all).
The key trees of probe.json and trajectory.json: docs/reference.md §4.10.
"""

import contextlib
import glob
import json
import os
import re
import sys

from lab import hf, runfolder
from lab.cli import OneLineParser, check_output_folder
from lab.data import EOT, Sampler, dataset_meta, ensure_dataset, gpt2_encoding, prompt_windows, shard_paths, task_mask
from lab.device import resolve_device
from lab.download import GPT2_MODELS, fetch_gpt2
from lab.gpt2 import load_gpt2
from lab.groups import group_statistics, groups_text
from lab.measure import measure, n_batches, run_interventions
from lab.plots import plot_checkpoint, plot_groups, plot_overlay, plot_trajectories   # matplotlib loads on first use
from lab.report import comparison, comparison_text, model_kind, report
from lab.trajectories import THRESHOLDS, jsonable, read_run, trajectory_text, write_trajectories

# ----------------------------------------------------------------------------------------------
# Data


def val_windows(ckpt, num_seqs, seq_len, seed, doc_aligned=False, data_root=None):
    """num_seqs windows (x, y) of seq_len tokens from the validation shards of the checkpoint's
    dataset, the same for every checkpoint trained on that dataset; its data_root is the one the
    checkpoint records, else data_root (--data_root), else the default. The dataset's meta.json says
    which token starts a document and whether windows must start there (the trigger language);
    a dataset with a task (the trigger language) is recorded as data['task'], its meta.json."""
    cfg = ckpt.get('config') or {}
    if not isinstance(cfg, dict) or not cfg.get('dataset'):
        raise ValueError("the checkpoint's config names no dataset; pass --text \"...\" prompts instead")
    root = cfg.get('data_root') or data_root
    paths = shard_paths(cfg['dataset'], 'val', root)
    meta = dataset_meta(cfg['dataset'], root) or {}
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
    if path.startswith('hf:'):
        return 'hf'
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, runfolder.LOG)):
            return 'run'
        if any(os.path.isfile(os.path.join(path, f)) for f in ('config.json', 'model.safetensors')):
            return 'gpt2'  # model.load_gpt2 names the file that is missing
        raise ValueError(f"{path}: a folder with neither log.jsonl (a training run) nor config.json and "
                         f"model.safetensors (GPT-2 weights); give a run's out_dir, a checkpoint file "
                         f"(e.g. {os.path.join(path, runfolder.CKPT)}) or a GPT-2 folder")
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
    bases = []
    for p in map(os.path.normpath, paths):   # a folder's trailing / would leave no base name
        if p.startswith('hf:'):
            bases.append(hf.short_name(p))
            continue
        stem = os.path.basename(p) if os.path.isdir(p) else os.path.splitext(os.path.basename(p))[0]
        folder = os.path.dirname(os.path.abspath(p))
        parent = os.path.basename(folder)
        snap = re.fullmatch(r'ckpt_(\d+)', stem)
        if snap and parent == runfolder.SNAPSHOTS:
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
    try:
        model, ckpt = runfolder.load_model(path, args.device, trust=args.trust_checkpoint)
    except (TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: not a train.py checkpoint ({type(e).__name__}: {e})") from None
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit model_args ({' '.join(str(e).split())[:300]})") from None
    return model, {k: v for k, v in ckpt.items() if k not in ('model', 'optimizer')}  # the model holds the weights


def load_gpt2_weights(path, args):
    """(model, checkpoint-like dict) of OpenAI GPT-2 weights: a model name, fetched once into
    <data root>/gpt2/<name>/ by prepare.fetch_gpt2 (then offline), or a local folder. GPT-2 has no
    validation split of ours, so its windows come from the built-in corpus unless --text is given."""
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
        return hf.load(path, args, check_only)
    model, ckpt = (load_gpt2_weights if input_kind(path) == 'gpt2' else load_checkpoint)(path, args)
    T = args.seq_len or model.config.block_size
    if T > model.config.block_size:
        raise ValueError(f"--seq_len {T} exceeds the model's block_size {model.config.block_size}")
    if args.text:
        x, y, data = text_windows(args.text, T)
    else:
        try:
            x, y, data = val_windows(ckpt, args.num_seqs, T, args.seed, args.doc_aligned, args.data_root)
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
    bar = tqdm(total=n_batches(N, T, bs) * (8 if args.interventions else 1), desc=name, unit='batch', leave=False,
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
    p.add_argument('--out', help='folder for probe.json (trajectory.json for runs) and the PNGs (default: '
                   'probe_out/<the first input\'s name>, or probe_out/groups with --group)')
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
                   help='where GPT-2 weights are cached (<data_root>/gpt2/<name>), the built-in corpus GPT-2 is '
                        'probed on lives, and the datasets of checkpoints that record no data_root (default: '
                        '$LEDGER_DATA, else data/ next to prepare.py)')
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


def output_folder(args, name):
    """--out, or probe_out/<name> (the first input's name, or 'groups'), so that the outputs of
    different inputs land in folders of their own; checked to be writable before any work."""
    if args.out is None:
        args.out = os.path.join('probe_out', name)
    check_output_folder(args.out, '--out')


def check_inputs(args):
    """Everything that can be wrong with the command line, before the long part: ('runs', [run]) or
    ('checkpoints', paths, names, first loaded checkpoint, groups or None). Raises ValueError/OSError."""
    args.device, args.dtype, _ = resolve_device(args.device, args.dtype)
    groups = parse_groups(args.group) if args.group else None
    if groups and args.inputs:
        raise ValueError(f"give checkpoints either as arguments ({args.inputs[0]}, ...) or in --group, not both")
    paths = [q for members in groups.values() for q in members] if groups else hf.expand(args.inputs)
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
            key = os.path.realpath(os.path.join(q, runfolder.LOG) if os.path.isdir(q) else q)
            if key in seen:
                raise ValueError(f"{q} and {seen[key]} are the same log; give each run once")
            seen[key] = q
        output_folder(args, run_names(paths)[0])
        return 'runs', [read_run(q, n) for q, n in zip(paths, run_names(paths))]
    names = checkpoint_names(paths)
    output_folder(args, 'groups' if groups else names[0])
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
            files += hf.revision_trajectories(results, args.out, vars(args))
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
