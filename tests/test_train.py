"""train.py: config parsing, presets, checkpoints, exact resume after SIGKILL and Ctrl-C, atomic saves,
DDP equivalence, the sparsity penalty, non-finite losses, SIGTERM, one run per out_dir and logs that
heal. CPU only, offline.

Training runs go through subprocesses (process behaviour is what matters) on a tiny model and a
tiny synthetic dataset written with lab.data.write_shard, so nothing depends on the builtin build.
"""
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import train
from lab.stats import STATS_KEYS
from lab import runfolder, training
from lab.config import read_config_file
from lab.device import busy_cpu_hint, peak_flops
from lab.runfolder import load_model, read_checkpoint
from model import GPT, GPTConfig, options
from lab.data import write_shard

VOCAB = 512
CKPT_KEYS = {'model', 'optimizer', 'scaler', 'model_args', 'config', 'iter_num', 'best_val_loss', 'val_loss',
             'val_loss_iter', 'rng', 'world_size', 'tokens'}


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """A 'text' dataset of a sparse Markov chain (4 successors per token): learnable in a few steps."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    successors = rng.integers(0, VOCAB, size=(VOCAB, 4))
    def chain(n):
        out = np.empty(n, dtype=np.int64)
        out[0] = 0
        for i in range(1, n):
            out[i] = successors[out[i - 1], rng.integers(4)]
        return out
    os.makedirs(root / 'text')
    write_shard(str(root / 'text' / 'text_train_000000.bin'), chain(60_000))
    write_shard(str(root / 'text' / 'text_val_000000.bin'), chain(6_000))
    return str(root)


def tiny(data_root, out_dir, **overrides):
    """Command-line arguments for a 2 x 32 model, 2 micro-steps of 4 x 32 tokens per step."""
    args = dict(out_dir=str(out_dir), dataset='text', data_root=data_root, n_layer=2, n_head=2, n_embd=32,
                vocab_size=VOCAB, block_size=32, batch_size=4, total_batch_size=256, ledger_rank=8,
                eval_iters=2, eval_interval=4, log_interval=1, stats_seqs=2, max_iters=6, warmup_iters=2,
                learning_rate=3e-3, device='cpu', compile=False)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def read_log(out_dir, event=None):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        lines = [json.loads(line) for line in f]
    return [line for line in lines if event is None or line['event'] == event]


# -----------------------------------------------------------------------------
# configuration


def test_unknown_key_in_file(tmp_path, capsys, one_line_error):
    path = tmp_path / 'bad.py'
    path.write_text("n_layer = 2\nn_layers = 3\n")
    assert train.main([str(path), f'--out_dir={tmp_path / "out"}']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', "'n_layers'", str(path), 'n_layer')
    assert not (tmp_path / 'out').exists()


def test_unknown_key_on_command_line_lists_close_matches(tmp_path, capsys, one_line_error):
    assert train.main(['--learning_rat=1e-3', f'--out_dir={tmp_path / "out"}']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', "'learning_rat'", 'learning_rate')
    assert train.main(['--zzz=1']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', "'zzz'", '--help')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('arg, words', [
    ('--n_layer=2.5', ['n_layer', 'int', 'float']),
    ('--eval_only=1', ['eval_only', 'bool']),
    ('--learning_rate=fast', ['learning_rate', 'float', 'fast']),
    ('--compile=maybe', ['compile', 'maybe']),
    ('--dtype=fp8', ['dtype', 'fp8']),
    ('--residual=ledgr', ['residual', 'ledgr']),
    ('--n_layer', ['--key=value']),
    ('--ddp_timeout=0', ['ddp_timeout', '> 0']),
])
def test_bad_values_are_one_line_errors(arg, words, capsys, one_line_error):
    assert train.main([arg]) == 2
    one_line_error(capsys.readouterr().err, 'train.py', *words)


def test_values_parse_to_their_types(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("import math\nlearning_rate = 1\nbeta2 = 0.95\n_private = 'ignored'\n")
    cfg, _ = train.load_config([str(path), '--min_lr=0', '--wandb_run_name=2024', '--compile=True',
                                '--dataset=text', '--target_val_loss=None', '--eval_only=False', '--grad_clip=2'])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # int accepted for float
    assert cfg.min_lr == 0.0 and isinstance(cfg.min_lr, float)
    assert cfg.grad_clip == 2.0 and isinstance(cfg.grad_clip, float)
    assert cfg.beta2 == 0.95
    assert cfg.wandb_run_name == '2024'
    assert cfg.compile is True and cfg.dataset == 'text' and cfg.target_val_loss is None


def test_later_sources_win(tmp_path):
    a, b = tmp_path / 'a.py', tmp_path / 'b.py'
    a.write_text("n_layer = 3\nn_head = 2\n")
    b.write_text("n_layer = 5\n")
    cfg, _ = train.load_config([str(a), str(b), '--n_head=8'])
    assert (cfg.n_layer, cfg.n_head) == (5, 8)


def test_help_lists_every_key(capsys):
    assert train.main(['--help']) == 0
    out = capsys.readouterr().out
    for key, opt in train.config_keys().items():
        assert f"--{key}=" in out, key
        assert opt.help


def test_the_config_holds_every_model_option():
    assert set(options()) <= set(train.config_keys())


def test_demo_config_states_defaults_only(root):
    """config/demo.py names the keys a newcomer changes first, each at train.py's default, so it
    is the run `python train.py` makes."""
    cfg, _ = train.load_config([os.path.join(root, 'config', 'demo.py')])
    assert cfg == train.load_config([])[0]  # the defaults, with commit_sparsity None resolved as for any run
    given = read_config_file(os.path.join(root, 'config', 'demo.py'))
    keys = train.config_keys()
    assert given == {k: keys[k].default for k in given}  # as written, None too


def test_sparsity_on_vanilla_and_bad_batch_are_config_errors(capsys, one_line_error):
    assert train.main(['--residual=vanilla', '--commit_sparsity=0.1']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', 'commit_sparsity', 'vanilla')
    assert train.main(['--batch_size=3', '--total_batch_size=1000']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', 'total_batch_size=1000', 'batch_size')


PRESETS = {  # docs/reference.md §2; preset: (layers, width, heads, seqs per step, steps, residual, qk_norm, alpha, params in M)
    'vanilla_160m': (12, 768, 12, 24, 14000, 'vanilla', False, 0.0, 163.0),
    'suppress_160m': (12, 768, 12, 24, 14000, 'vanilla', True, 0.0, 163.0),
    'ledger_160m': (12, 768, 12, 24, 14000, 'ledger', False, 0.02, 174.9),
    'ledger_hs_160m': (12, 768, 12, 24, 14000, 'ledger', False, 0.3, 174.9),
    'vanilla_290m': (12, 1024, 16, 16, 8000, 'vanilla', False, 0.0, 255.1),
    'suppress_290m': (12, 1024, 16, 16, 8000, 'vanilla', True, 0.0, 255.1),
    'ledger_290m': (12, 1024, 16, 16, 8000, 'ledger', False, 0.02, 270.9),
    'ledger_hs_290m': (12, 1024, 16, 16, 8000, 'ledger', False, 0.3, 270.9),
}


TRIGGER_PRESETS = {  # the testbed's four models (docs/reference.md §3.5): residual, qk_norm, alpha
    'trigger_vanilla': ('vanilla', False, 0.0), 'trigger_suppress': ('vanilla', True, 0.0),
    'trigger_ledger': ('ledger', False, 0.02), 'trigger_ledger_hs': ('ledger', False, 0.3),
}


def test_every_preset_is_covered(root):
    names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, 'config', '*.py'))}
    assert names == set(PRESETS) | set(TRIGGER_PRESETS) | {'demo', 'trigger_vanilla_wide'}


def test_the_parameter_matched_vanilla_is_within_3_percent_of_the_ledger(root):
    """results/trigger/design.py's capacity control: trigger_vanilla_wide is trigger_vanilla at width
    140, and its parameter count is within 3 % of trigger_ledger's."""
    wide, _ = train.load_config([os.path.join(root, 'config', 'trigger_vanilla_wide.py')])
    plain, _ = train.load_config([os.path.join(root, 'config', 'trigger_vanilla.py')])
    ledger, _ = train.load_config([os.path.join(root, 'config', 'trigger_ledger.py')])
    differ = {k for k, v in vars(wide).items() if getattr(plain, k) != v}
    assert differ == {'n_embd', 'out_dir'} and wide.n_embd == 140
    n = {c.residual + str(c.n_embd): GPT(GPTConfig(**{**training.model_args(c), 'vocab_size': 34})).num_params()
         for c in (wide, ledger)}
    assert n == {'vanilla140': 963_340, 'ledger128': 974_984}


@pytest.mark.parametrize('name', sorted(TRIGGER_PRESETS))
def test_trigger_presets_differ_only_in_the_model(name, root):
    """The four testbed presets share everything but residual, qk_norm and commit_sparsity."""
    cfg, _ = train.load_config([os.path.join(root, 'config', f'{name}.py')])
    assert (cfg.residual, cfg.qk_norm, cfg.commit_sparsity) == TRIGGER_PRESETS[name]
    assert cfg.dataset == 'trigger' and cfg.out_dir == f'out/{name}'
    assert cfg.vocab_size is None and cfg.doc_aligned is None          # both from the dataset's meta.json
    base, _ = train.load_config([os.path.join(root, 'config', 'trigger_vanilla.py')])
    differ = {k for k, v in vars(cfg).items() if getattr(base, k) != v}
    assert differ <= {'residual', 'qk_norm', 'commit_sparsity', 'out_dir'}


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_matches_the_reference(name, root):
    L, d, H, seqs, steps, residual, qk_norm, alpha, params = PRESETS[name]
    cfg, _ = train.load_config([os.path.join(root, 'config', f'{name}.py')])
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size) == (L, d, H, 1024)
    assert cfg.total_batch_size == seqs * 1024 and cfg.max_iters == steps
    assert (cfg.residual, cfg.qk_norm, cfg.commit_sparsity) == (residual, qk_norm, alpha)
    assert cfg.dataset == 'finewebedu10B' and cfg.out_dir == f'out/{name}' and cfg.vocab_size == 50257
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters) == (3e-4, 3e-5, 300, steps)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.decay_all, cfg.grad_clip) == (0.9, 0.999, 0.1, True, 1.0)
    assert not cfg.tie_embeddings and not cfg.scaled_init and cfg.norm == 'rmsnorm' and cfg.dropout == 0.0
    if residual == 'ledger':
        assert (cfg.ledger_rank, cfg.commit_bias_first, cfg.commit_bias_last, cfg.decode_mix) == (64, -4.0, 4.0, 0.0)
    assert training.get_lr(steps, cfg) == pytest.approx(3e-5)
    for world_size in (1, 2, 4, 8):  # the preset's batch_size fits any of these GPU counts
        assert training.grad_accum_steps(cfg, world_size) * cfg.batch_size * world_size == seqs
    with torch.device('meta'):
        model = GPT(GPTConfig(**training.model_args(cfg)))
    assert len(model.sublayers) == 2 * L
    assert model.wte.weight.shape == (50257, d) and model.lm_head.weight.shape == (50257, d)
    assert model.sublayers[0].fn.qkv.weight.shape == (3 * d, d)
    assert model.sublayers[1].fn.fc.weight.shape == (4 * d, d)
    assert model.num_params() / 1e6 == pytest.approx(params, abs=0.1)


def test_lr_schedule():
    cfg, _ = train.load_config(['--learning_rate=1.0', '--min_lr=0.1', '--warmup_iters=10', '--max_iters=110'])
    assert training.get_lr(0, cfg) == pytest.approx(1 / 11)
    assert training.get_lr(9, cfg) == pytest.approx(10 / 11)
    assert training.get_lr(10, cfg) == pytest.approx(1.0)
    assert training.get_lr(60, cfg) == pytest.approx(0.55)
    assert training.get_lr(110, cfg) == pytest.approx(0.1)
    assert training.get_lr(10**6, cfg) == pytest.approx(0.1)
    lrs = [training.get_lr(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))

# -----------------------------------------------------------------------------
# training runs


@pytest.fixture(scope='session')
def finished_run(data_root, tmp_path_factory, cli):
    """One short run (alpha 0.5) that several tests read: (out_dir, completed process)."""
    out = tmp_path_factory.mktemp('run') / 'out'
    r = cli('train.py', *tiny(data_root, out, max_iters=6, commit_sparsity=0.5, snapshot_interval=4))
    assert r.returncode == 0, r.stderr
    return out, r


def test_end_to_end_writes_a_loadable_checkpoint_and_log(finished_run):
    out, r = finished_run
    assert 'parameters:' in r.stdout and 'config:' in r.stdout
    ckpt = read_checkpoint(str(out / 'ckpt.pt'))
    assert set(ckpt) == CKPT_KEYS
    assert not any('_orig_mod' in k for k in ckpt['model'])
    assert ckpt['iter_num'] == 6 and ckpt['val_loss_iter'] == 6 and ckpt['tokens'] == 6 * 256
    assert ckpt['config']['n_embd'] == 32 and ckpt['model_args']['n_embd'] == 32
    assert set(ckpt['rng']) == {'torch', 'numpy', 'python', 'cuda'}
    model, _ = load_model(str(out / 'ckpt.pt'))  # strict load_state_dict: no key fixes needed
    assert model.num_params() == read_log(out, 'start')[0]['params']
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl', 'snapshots']

    log = read_log(out)
    assert log[0]['event'] == 'start' and log[0]['config']['max_iters'] == 6
    trains = read_log(out, 'train')
    assert [t['iter'] for t in trains] == list(range(6))
    for t in trains:
        assert {'loss', 'ce', 'aux', 'lr', 'ms_per_iter', 'tokens_per_s', 'mfu', 'tokens'} <= set(t)
        assert set(t['aux']) == {'commit_rate'}
        assert t['mfu'] is None  # n/a on CPU
    evals = read_log(out, 'eval')
    assert [e['iter'] for e in evals] == [0, 4, 6]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] < math.log(VOCAB) + 0.5
    assert ckpt['best_val_loss'] == min(e['val_loss'] for e in evals)
    stats = evals[0]['stats']
    assert set(stats) == {'D', 'C', 'read'}
    for s in stats.values():
        assert set(s) == set(STATS_KEYS)
        for k in STATS_KEYS:
            if k in ('dominant_dim', 'peak_layer'):
                assert isinstance(s[k], int) and s[k] >= 0
            else:
                assert len(s[k]) == 4  # one value per sublayer
        assert all(0 < m <= 1 for m in s['start_mass'])  # a fraction of the mass over 32 positions
    assert log[-1] == {'event': 'stop', 'iter': 6, 'reason': 'max_iters'}


def final_state(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def assert_same_state(a, b):
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    assert a['iter_num'] == b['iter_num'] and a['best_val_loss'] == b['best_val_loss']


def signal_at(proc, line, sig):
    """Send sig to the running train.py once it prints a line starting with `line`."""
    for out in proc.stdout:
        if out.startswith(line):
            proc.send_signal(sig)
            return


EXACT = dict(max_iters=40, eval_interval=5, dropout=0.1, stats_seqs=0)  # dropout on: its masks must be reproduced too


@pytest.fixture(scope='module')
def uninterrupted(data_root, tmp_path_factory, root, env):
    """The EXACT run without a stop, started in the background (the interrupted runs of the tests
    run beside it); calling the fixture's value waits for it and gives its out_dir."""
    out = tmp_path_factory.mktemp('whole') / 'out'
    proc = subprocess.Popen([sys.executable, os.path.join(root, 'train.py')] + tiny(data_root, out, **EXACT), cwd=root,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finished():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        return out
    yield finished
    proc.kill()
    proc.wait()


def test_resume_after_sigkill_is_bitwise_exact(data_root, tmp_path, cli, root, env, uninterrupted):
    killed = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, os.path.join(root, 'train.py')] + tiny(data_root, killed, **EXACT), cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    signal_at(proc, 'iter 12:', signal.SIGKILL)  # checkpoints exist for iters 0, 5 and 10
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    k = final_state(killed)['iter_num']
    assert 10 <= k < 40

    r = cli('train.py', *[f'--out_dir={killed}', '--init_from=resume'])  # the checkpoint's config fills in the rest
    assert r.returncode == 0, r.stderr
    assert f'resuming at iter {k}' in r.stdout
    starts = read_log(killed, 'start')
    assert [s['iter'] for s in starts] == [0, k]
    assert_same_state(final_state(uninterrupted()), final_state(killed))


def test_ctrl_c_finishes_the_step_saves_and_resumes_bitwise_exact(data_root, tmp_path, cli, root, env, uninterrupted):
    """Ctrl-C is SIGINT: like SIGTERM, it finishes the step, saves ckpt.pt at the step it stopped
    at, logs the stop and exits 0 without a traceback; resuming ends as if nothing had happened."""
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, os.path.join(root, 'train.py')] + tiny(data_root, out, **EXACT), cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    signal_at(proc, 'iter 12:', signal.SIGINT)  # checkpoints exist for iters 0, 5 and 10
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == '', err      # no traceback, nothing on stderr
    k = read_log(out, 'train')[-1]['iter'] + 1          # the steps done
    assert 13 <= k < 40, "the run finished before Ctrl-C reached it"
    assert final_state(out)['iter_num'] == k
    assert read_log(out)[-1] == {'event': 'stop', 'iter': k, 'reason': 'sigint'}
    assert f"SIGINT: saved {out}/ckpt.pt at iter {k}; continue with --init_from=resume" in rest.splitlines()
    assert 'Ctrl-C again: stop at once' in rest

    r = cli('train.py', f'--out_dir={out}', '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert [s['iter'] for s in read_log(out, 'start')] == [0, k]
    assert_same_state(final_state(uninterrupted()), final_state(out))


CTRL_C_TWICE = """
import signal, sys, train
real = train.get_lr
def get_lr(it, cfg):  # Ctrl-C twice while step 3 runs: deterministic, where a second kill from outside would race
    if it == 3:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    return real(it, cfg)
train.get_lr = get_lr
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_stops_at_once_in_one_line(data_root, tmp_path, root, env):
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, '-c', CTRL_C_TWICE] + tiny(data_root, out, max_iters=10, eval_interval=2),
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines() == [f"train.py: interrupted: stopped at once, without saving ({out}/ckpt.pt, "
                                     f"if any, is the last checkpoint)"]
    assert 'SIGINT: stopping after this step' in r.stdout
    assert final_state(out)['iter_num'] == 2          # the checkpoint of the last evaluation, left as it was
    assert read_log(out)[-1]['event'] == 'train' and read_log(out, 'train')[-1]['iter'] == 2  # step 3 never finished
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']   # no temp file left


def test_resume_keeps_best_val_loss_and_rejects_shape_changes(finished_run, tmp_path, capsys, cli, one_line_error):
    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)
    ckpt = final_state(out)
    ckpt['best_val_loss'] = -1.0  # a best that the resumed run cannot beat: it must not be raised
    runfolder.save_checkpoint(ckpt, str(out))
    assert train.main([f'--out_dir={out}', '--init_from=resume', '--max_iters=8', '--n_layer=3']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', '--n_layer', 'n_layer=3', 'n_layer=2')
    assert train.main([f'--out_dir={tmp_path / "nothing"}', '--init_from=resume']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', 'no such checkpoint')
    cfg, _ = train.load_config([f'--out_dir={out}', '--init_from=resume'])
    assert cfg.commit_sparsity == 0.5 and cfg.n_embd == 32 and cfg.max_iters == 6  # from the checkpoint

    r = cli('train.py', *[f'--out_dir={out}', '--init_from=resume', '--max_iters=8', '--n_layer=2', '--dropout=0.1'])
    assert r.returncode == 0, r.stderr
    ckpt = final_state(out)
    assert ckpt['iter_num'] == 8 and ckpt['best_val_loss'] == -1.0 and ckpt['config']['dropout'] == 0.1
    assert [e['iter'] for e in read_log(out, 'eval')] == [0, 4, 6, 8]  # iter 6 was not evaluated twice


def tree(folder):
    """{relative path: bytes} of every file under folder, and '<dir>' for every folder."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), folder)] = '<dir>'
        for f in filenames:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = open(path, 'rb').read()
    return out


def test_a_scratch_run_cannot_clobber_a_run_and_overwrite_removes_all_of_it(finished_run, data_root, tmp_path, cli,
                                                                           one_line_error):
    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)          # ckpt.pt, log.jsonl, snapshots/ (3)
    (out / 'notes.txt').write_text('mine\n')       # not the run's: never removed
    (out / '.ckpt.pt.123.tmp').write_bytes(b'x')   # a temp file of a killed save
    before = tree(out)
    r = cli('train.py', *tiny(data_root, out, max_iters=2, seed=5))
    assert r.returncode == 2
    one_line_error(r.stderr, 'train.py', f'{out} already holds a run (ckpt.pt, log.jsonl, 3 snapshots',
                   '--init_from=resume', '--overwrite=True', '--out_dir')
    assert tree(out) == before                     # nothing touched, byte for byte

    r = cli('train.py', *tiny(data_root, out, max_iters=2, eval_interval=2, seed=5, overwrite=True))
    assert r.returncode == 0, r.stderr
    assert f"overwrite: removed the earlier run's ckpt.pt, log.jsonl, 3 snapshots (snapshots/ckpt_*.pt) from {out}" \
        in r.stdout
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl', 'notes.txt']   # no stale snapshot, temp file or log line
    assert (out / 'notes.txt').read_text() == 'mine\n'
    assert [(e['event'], e['iter']) for e in read_log(out) if e['event'] != 'train'] == \
        [('start', 0), ('eval', 0), ('eval', 2), ('stop', 2)]
    assert read_log(out, 'start')[0]['config']['seed'] == 5 and final_state(out)['iter_num'] == 2


def test_out_dir_misuse_is_one_line_and_touches_nothing(finished_run, tmp_path, capsys, one_line_error):
    (tmp_path / 'a_file').write_text('x')
    assert train.main([f'--out_dir={tmp_path / "a_file"}']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', 'a_file', 'is a file, not a folder')
    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)
    before = tree(out)
    assert train.main([f'--out_dir={out}', '--init_from=resume', '--overwrite=True']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', 'overwrite=True', "init_from='resume'", 'give one')
    assert tree(out) == before and sorted(os.listdir(tmp_path)) == ['a_file', 'out']


def test_a_cut_last_log_line_is_set_aside_on_resume_and_the_run_probes(finished_run, tmp_path, cli):
    """A run killed while writing log.jsonl leaves its last line cut off. The probe reads the run
    without that line (and says so); a resume moves the line to log.jsonl.bad, in one line, before
    appending, so that the log reads as one run."""
    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)
    cut = b'{"event": "eval", "iter": 6, "train_loss": 5.1, "val_lo'
    with open(out / 'log.jsonl', 'ab') as f:
        f.write(cut)
    n = len((out / 'log.jsonl').read_bytes().split(b'\n'))   # the cut line's number
    p = cli('probe.py', out, '--out', tmp_path / 'traj')
    assert p.returncode == 0, p.stderr
    assert f"line {n} of the log is cut off" in p.stdout

    r = cli('train.py', f'--out_dir={out}', '--init_from=resume', '--max_iters=8')
    assert r.returncode == 0, r.stderr
    assert f"{out}/log.jsonl: line {n} was cut off ({len(cut)} bytes, a run killed while writing it); moved it to " \
           f"{out}/log.jsonl.bad" in r.stdout.splitlines()
    assert (out / 'log.jsonl.bad').read_bytes() == cut + b'\n'
    assert [e['iter'] for e in read_log(out, 'start')] == [0, 6]     # every line is JSON again
    p = cli('probe.py', out, '--out', tmp_path / 'traj')
    assert p.returncode == 0, p.stderr
    run = json.loads((tmp_path / 'traj' / 'trajectory.json').read_text())['runs'][0]
    assert run['iters'] == [0, 4, 6, 8] and run['starts'] == 2 and run['cut_line'] is None


def test_checkpoints_and_snapshots_follow_the_umask(tmp_path):
    """A group-shared out_dir (umask 002/027) must be readable by the group: mkstemp's 0600 was not."""
    old = os.umask(0o027)
    try:
        runfolder.save_checkpoint({'iter_num': 1}, str(tmp_path))
        os.umask(0o002)
        (tmp_path / 'snapshots').mkdir()
        runfolder.save_checkpoint({'iter_num': 1}, str(tmp_path / 'snapshots'), 'ckpt_000001.pt')
    finally:
        os.umask(old)
    assert os.stat(tmp_path / 'ckpt.pt').st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / 'snapshots' / 'ckpt_000001.pt').st_mode & 0o777 == 0o664


def test_vanilla_trains_with_the_default_sparsity(data_root, tmp_path, cli, capsys, one_line_error):
    """commit_sparsity None: 0.02 for models with commit gates, 0 for the others; a value > 0 given
    for a model without commit gates is still an error."""
    assert train.config_keys()['commit_sparsity'].default is None
    assert train.load_config([])[0].commit_sparsity == 0.02
    assert train.load_config(['--residual=vanilla'])[0].commit_sparsity == 0.0
    assert train.load_config(['--residual=vanilla', '--commit_sparsity=0'])[0].commit_sparsity == 0.0
    assert train.main(['--residual=vanilla', '--commit_sparsity=0.02']) == 2
    one_line_error(capsys.readouterr().err, 'train.py', 'commit_sparsity=0.02', 'vanilla', 'has no commit_rate')
    out = tmp_path / 'out'
    r = cli('train.py', *tiny(data_root, out, residual='vanilla', max_iters=1, eval_interval=100, stats_seqs=0))
    assert r.returncode == 0, r.stderr
    assert read_log(out, 'start')[0]['config']['commit_sparsity'] == 0.0
    assert [t['loss'] == t['ce'] for t in read_log(out, 'train')] == [True]


def test_busy_cores_get_a_hint(monkeypatch):
    """The load average cannot be set by a test, so it is given: a core's worth of other work on 2
    cores, with torch's 2 threads, is the demo's slow case; idle cores, one thread or an
    OMP_NUM_THREADS of the user's are not."""
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hints = {}
        for load in (0.3, 1.2):
            monkeypatch.setattr(os, 'getloadavg', lambda: (load, 0.0, 0.0))
            hints[load] = busy_cpu_hint()
        monkeypatch.setenv('OMP_NUM_THREADS', '2')
        hints['set'] = busy_cpu_hint()
    finally:
        torch.set_num_threads(threads)
    assert hints[0.3] is None and hints['set'] is None
    assert hints[1.2].startswith('note: other processes keep about 1.2 of the 2 CPU cores busy')
    assert 'OMP_NUM_THREADS=1' in hints[1.2]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old = {'model': {'w': torch.zeros(3)}, 'model_args': {}, 'config': {}, 'iter_num': 1}
    runfolder.save_checkpoint(old, str(tmp_path))

    real_save = torch.save
    def crash_midway(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)  # half a file on disk, then the crash
        raise OSError('disk on fire')
    monkeypatch.setattr(torch, 'save', crash_midway)
    new = dict(old, iter_num=2, model={'w': torch.ones(1000)})
    with pytest.raises(OSError, match='disk on fire'):
        runfolder.save_checkpoint(new, str(tmp_path))
    monkeypatch.undo()
    assert read_checkpoint(str(tmp_path / 'ckpt.pt'))['iter_num'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']  # the temp file was removed


def test_sigkill_during_save_leaves_a_complete_checkpoint(tmp_path, root, env):
    script = textwrap.dedent(f"""
        import sys, torch
        from lab import runfolder
        base = {{'model_args': {{}}, 'config': {{}}}}
        runfolder.save_checkpoint(dict(base, model={{'w': torch.zeros(3)}}, iter_num=1), {str(tmp_path)!r})
        print('saving', flush=True)
        runfolder.save_checkpoint(dict(base, model={{'w': torch.ones(60_000_000)}}, iter_num=2), {str(tmp_path)!r})
        print('saved', flush=True)
    """)
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=root, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == 'saving'
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    ckpt = read_checkpoint(str(tmp_path / 'ckpt.pt'))  # the old one or the whole new one, never half
    assert ckpt['iter_num'] in (1, 2)
    assert ckpt['model']['w'].numel() == (3 if ckpt['iter_num'] == 1 else 60_000_000)
    litter = [f for f in os.listdir(tmp_path) if f != 'ckpt.pt']
    assert all(f.startswith('.ckpt.pt.') and f.endswith('.tmp') for f in litter), litter
    runfolder.remove_stale_temp_files(str(tmp_path))
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_ddp_matches_single_process(data_root, tmp_path, root, env):
    """2 ranks x 1 micro-step see the same sequences as 1 rank x 2 micro-steps."""
    single, ddp = tmp_path / 'single', tmp_path / 'ddp'
    args = dict(max_iters=3, eval_interval=100, stats_seqs=0)
    one = subprocess.Popen([sys.executable, os.path.join(root, 'train.py')] + tiny(data_root, single, **args), cwd=root, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    env = dict(env, GLOO_SOCKET_IFNAME=os.environ.get('GLOO_SOCKET_IFNAME', 'lo'))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', os.path.join(root, 'train.py')]
                       + tiny(data_root, ddp, **args), capture_output=True, text=True, timeout=180, cwd=root, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert one.wait(timeout=120) == 0, one.stderr.read()
    assert 'world size 2, 1 micro-steps' in r.stdout
    assert len(read_log(ddp, 'start')) == 1  # rank 0 alone writes
    a, b = read_log(single, 'train'), read_log(ddp, 'train')
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ('loss', 'ce'):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (x['iter'], key)
        assert y['aux']['commit_rate'] == pytest.approx(x['aux']['commit_rate'], rel=1e-5)
    ea, eb = read_log(single, 'eval'), read_log(ddp, 'eval')
    assert eb[0]['val_loss'] == ea[0]['val_loss']  # eval batches are shared out, not multiplied
    wa, wb = final_state(single)['model'], final_state(ddp)['model']
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.fixture
def in_process():
    """For tests that run train.main past the config checks in this process: train() makes torch's
    algorithms deterministic on the CPU, which is put back afterwards."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def test_eval_windows_do_not_depend_on_batch_size_or_world_size(data_root, tmp_path, root, env, in_process, capsys):
    """The evaluation at step 0 gives the same bits at batch_size 1, 2 and 4 (same total_batch_size)
    and on 2 ranks (gloo), for both splits and the aux terms; and it is the mean CE over eval_iters
    micro-batches of lab.training.eval_batch_size(block_size) windows drawn with EVAL_SEED, recomputed here."""
    from lab.data import Sampler
    args = dict(max_iters=0, eval_iters=3, stats_seqs=0)   # 3 micro-batches: 2 on rank 0, 1 on rank 1
    env = dict(env, GLOO_SOCKET_IFNAME=os.environ.get('GLOO_SOCKET_IFNAME', 'lo'))
    ddp = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                            os.path.join(root, 'train.py')] + tiny(data_root, tmp_path / 'ddp', batch_size=2, **args),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root, env=env)
    for b in (1, 2, 4):   # here, one thread as in the ranks (conftest, torchrun), while the ranks run
        assert train.main(tiny(data_root, tmp_path / f'b{b}', batch_size=b, **args)) == 0
    capsys.readouterr()
    out, _ = ddp.communicate(timeout=180)
    assert ddp.returncode == 0, out[-3000:]
    keys = ('train_loss', 'val_loss', 'train_aux', 'val_aux')
    evals = {name: read_log(tmp_path / name, 'eval')[0] for name in ('b1', 'b2', 'b4', 'ddp')}
    assert read_log(tmp_path / 'ddp', 'start')[0]['world_size'] == 2
    for name, e in evals.items():
        assert e['iter'] == 0 and {k: e[k] for k in keys} == {k: evals['b4'][k] for k in keys}, name

    cfg, _ = train.load_config(tiny(data_root, tmp_path / 'x', **args))
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**training.model_args(cfg))).eval()
    val = Sampler([os.path.join(data_root, 'text', 'text_val_000000.bin')], training.eval_batch_size(32), 32,
                  training.EVAL_SEED)
    assert training.eval_batch_size(32) == 64 and training.eval_batch_size(1024) == 2 and \
        training.eval_batch_size(4096) == 1
    with torch.no_grad():
        ce = [model(*val.get(j))[1].item() for j in range(3)]
    assert evals['b4']['val_loss'] == pytest.approx(sum(ce) / 3, rel=1e-12)


def test_a_token_id_outside_the_vocabulary_is_a_one_line_error(data_root, tmp_path, capsys, one_line_error, in_process):
    """The data path checks every batch (the model's forward does not, to spare a host sync per call):
    data with ids up to 511 and vocab_size=256 stop the run with one line naming the shard, from the
    statistics' windows or, without them, from the first training batch."""
    assert train.main(tiny(data_root, tmp_path / 'out', vocab_size=256, max_iters=2)) == 2
    one_line_error(capsys.readouterr().err, 'train.py', 'text_val_000000.bin: token id', 'vocab_size=256')
    assert train.main(tiny(data_root, tmp_path / 'out', vocab_size=256, max_iters=2, stats_seqs=0)) == 2
    one_line_error(capsys.readouterr().err, 'train.py', 'text_train_000000.bin: token id', 'vocab_size=256')
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


@pytest.mark.parametrize('name, flops', [('NVIDIA H200 NVL', 836e12), ('NVIDIA H200', 989e12),
                                         ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                                         ('NVIDIA H100 NVL', 836e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                                         ('NVIDIA GeForce GTX 1080', None)])
def test_peak_flops_knows_the_card_and_only_rates_bf16(name, flops, monkeypatch):
    """The one peak table of train.py and bench.py: NVL and PCIe cards are not rated as SXM ones; MFU
    only for bf16 (the table's precision), never on the CPU."""
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    assert peak_flops('cuda:0', 'bfloat16') == flops
    assert peak_flops('cuda:0', 'float32') is None and peak_flops('cuda:0', 'float16') is None
    assert peak_flops('cpu', 'bfloat16') is None


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step(data_root, tmp_path, root, env):
    """Ctrl-C in a terminal reaches torchrun, which passes SIGINT to every rank: the ranks agree on
    the step at the all-reduce, rank 0 saves there, and no rank dies with a traceback."""
    out = tmp_path / 'out'
    env = dict(env, GLOO_SOCKET_IFNAME=os.environ.get('GLOO_SOCKET_IFNAME', 'lo'))
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(root, 'train.py')] + tiny(data_root, out, max_iters=100_000, eval_interval=1000,
                                                                    stats_seqs=0),
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_at(proc, 'iter 3:', signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    k = read_log(out, 'train')[-1]['iter'] + 1
    assert final_state(out)['iter_num'] == k and final_state(out)['world_size'] == 2
    assert read_log(out)[-1] == {'event': 'stop', 'iter': k, 'reason': 'sigint'}
    assert f"SIGINT: saved {out}/ckpt.pt at iter {k}; continue with --init_from=resume" in rest.splitlines()
    assert f"done: sigint at iter {k}" in rest               # after the barriers: rank 1 got there too
    assert 'train.py' not in err and 'KeyboardInterrupt' not in err   # no rank's traceback (torchrun prints its own)


def test_penalty_adds_alpha_times_the_commit_rate(finished_run, data_root, tmp_path, cli):
    out = tmp_path / 'alpha0'
    r = cli('train.py', *tiny(data_root, out, max_iters=1, eval_interval=100, stats_seqs=0, commit_sparsity=0.0))
    assert r.returncode == 0, r.stderr
    runs = {0.0: read_log(out, 'train'), 0.5: read_log(finished_run[0], 'train')}
    for t in runs[0.5]:
        assert t['loss'] - t['ce'] == pytest.approx(0.5 * t['aux']['commit_rate'], abs=1e-5)
    for t in runs[0.0]:
        assert t['loss'] == t['ce']
    first0, first5 = runs[0.0][0], runs[0.5][0]  # same init, same batch: only the penalty differs
    assert first0['ce'] == first5['ce'] and first0['aux'] == first5['aux']
    assert first5['loss'] - first0['loss'] == pytest.approx(0.5 * first0['aux']['commit_rate'], abs=1e-5)
    assert 0.0 < first0['aux']['commit_rate'] < 1.0


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data_root, tmp_path, cli, one_line_error):
    out = tmp_path / 'out'
    r = cli('train.py', *tiny(data_root, out, max_iters=10, eval_interval=2, debug_nan_at_iter=5))
    assert r.returncode == 3
    one_line_error(r.stderr, 'train.py', 'nan', 'iter 5')
    ckpt = read_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 4
    assert all(torch.isfinite(t).all() for t in ckpt['model'].values())
    assert read_log(out)[-1]['reason'] == 'non-finite loss'
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']


def test_target_val_loss_stops_after_saving_and_eval_only_writes_no_checkpoint(finished_run, data_root, tmp_path, cli):
    out = tmp_path / 'target'
    r = cli('train.py', *tiny(data_root, out, max_iters=50, target_val_loss=100.0))  # reached at the first evaluation
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 0
    assert read_log(out)[-1] == {'event': 'stop', 'iter': 0, 'reason': 'target_val_loss'}

    out = tmp_path / 'eval_only'
    shutil.copytree(finished_run[0], out)
    before = os.stat(out / 'ckpt.pt').st_mtime_ns
    r = cli('train.py', *[f'--out_dir={out}', '--init_from=resume', '--eval_only=True'])
    assert r.returncode == 0, r.stderr
    evals = read_log(out, 'eval')
    assert evals[-1]['iter'] == 6 and evals[-1]['val_loss'] == pytest.approx(evals[-2]['val_loss'], rel=1e-6)
    assert os.stat(out / 'ckpt.pt').st_mtime_ns == before


def test_sigterm_saves_and_exits_zero(data_root, tmp_path, root, env):
    """(on a vanilla model, which has no commit rate to log)"""
    out = tmp_path / 'out'
    args = tiny(data_root, out, max_iters=100_000, eval_interval=1000, residual='vanilla')
    proc = subprocess.Popen([sys.executable, os.path.join(root, 'train.py')] + args,
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    signal_at(proc, 'iter 3:', signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert 'SIGTERM: saved' in rest
    ckpt = read_checkpoint(str(out / 'ckpt.pt'))
    last = read_log(out, 'train')[-1]['iter']
    assert ckpt['iter_num'] == last + 1 >= 4
    assert read_log(out)[-1] == {'event': 'stop', 'iter': last + 1, 'reason': 'sigterm'}
    assert all(t['aux'] == {} for t in read_log(out, 'train'))
    assert read_log(out, 'start')[0]['residual']['decoded'] == 'h'
    assert set(read_log(out, 'eval')[0]['stats']) == {'h'}


def test_snapshots_are_weights_only_and_atomic(finished_run):
    out = finished_run[0]
    names = sorted(os.listdir(out / 'snapshots'))
    assert names == ['ckpt_000000.pt', 'ckpt_000004.pt', 'ckpt_000006.pt']  # every 4 steps, and the last
    final = final_state(out)
    for name in names:
        snap = torch.load(out / 'snapshots' / name, weights_only=True)
        assert set(snap) == {'model', 'model_args', 'config', 'iter_num', 'tokens', 'val_loss'}
        assert snap['tokens'] == snap['iter_num'] * 256 and name == f"ckpt_{snap['iter_num']:06d}.pt"
        evals = {e['iter']: e['val_loss'] for e in read_log(out, 'eval')}
        assert snap['val_loss'] == evals.get(snap['iter_num'])
        model, _ = load_model(str(out / 'snapshots' / name))
    for k, w in final['model'].items():  # the last snapshot holds the final weights
        assert torch.equal(snap['model'][k], w), k
    assert os.path.getsize(out / 'snapshots' / names[-1]) < os.path.getsize(out / 'ckpt.pt') / 2  # no optimizer
    assert model.config.n_embd == 32

# -----------------------------------------------------------------------------
# checkpoints are data, not code: a stranger's ckpt.pt cannot run anything


class Payload:
    """Unpickling this object creates a file: what a hostile ckpt.pt can do (a shell command as easily)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def write_hostile(path, marker, how):
    obj = {'model': Payload(str(marker)), 'model_args': {}, 'config': {}, 'iter_num': 0}
    if how == 'torch.save':
        torch.save(obj, path)
    else:  # a bare pickle, which torch.load also reads (its legacy format)
        import pickle
        with open(path, 'wb') as f:
            pickle.dump(obj, f, protocol=2 if how == 'pickle-2' else pickle.DEFAULT_PROTOCOL)


def test_the_payload_is_real(tmp_path):
    """The control: an unsafe load of the hostile file does run its code."""
    write_hostile(tmp_path / 'ckpt.pt', tmp_path / 'marker', 'torch.save')
    torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    assert (tmp_path / 'marker').exists()


@pytest.mark.parametrize('how', ['torch.save', 'pickle-2', 'pickle'])
def test_hostile_checkpoint_is_refused_by_resume_and_probe(tmp_path, how, cli, one_line_error, root, env):
    out, marker = tmp_path / 'out', tmp_path / 'marker'
    out.mkdir()
    write_hostile(out / 'ckpt.pt', marker, how)
    message = f"{out / 'ckpt.pt'}: contains pickled Python objects, which could run code; refusing"
    r = cli('train.py', *[f'--out_dir={out}', '--init_from=resume'])
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, 'train.py', message, '--trust_checkpoint=True')
    p = subprocess.run([sys.executable, os.path.join(root, 'probe.py'), str(out / 'ckpt.pt'),
                        '--out', str(tmp_path / 'probe_out')], capture_output=True, text=True, timeout=120,
                       cwd=root, env=env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith('probe.py: error:')
    assert message in p.stderr and '--trust_checkpoint' in p.stderr
    assert not marker.exists()
    assert os.listdir(out) == ['ckpt.pt'] and not (tmp_path / 'probe_out').exists()  # nothing written


def test_an_old_pickled_checkpoint_resumes_only_when_trusted(finished_run, tmp_path, cli, one_line_error):
    """Checkpoints from before weights-only saving held numpy's RNG state as an array in a tuple."""
    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)
    ckpt = final_state(out)
    ckpt['rng']['numpy'] = np.random.get_state()
    torch.save(ckpt, out / 'ckpt.pt')
    r = cli('train.py', *[f'--out_dir={out}', '--init_from=resume', '--max_iters=7'])
    assert r.returncode == 2
    one_line_error(r.stderr, 'train.py', 'contains pickled Python objects', 'refusing')
    assert len(read_log(out, 'start')) == 1  # refused before anything was written
    r = cli('train.py', *[f'--out_dir={out}', '--init_from=resume', '--max_iters=7', '--trust_checkpoint=True'])
    assert r.returncode == 0, r.stderr
    ckpt = final_state(out)  # written again by this version: loads with weights_only=True
    assert ckpt['iter_num'] == 7
    cfg, _ = train.load_config([f'--out_dir={out}', '--init_from=resume'])
    assert cfg.trust_checkpoint is False  # trust is given per command, never inherited from a checkpoint


def test_every_torch_load_in_the_repo_is_weights_only(root):
    """Nothing unpickles a file unless the user said, by name, that they trust it."""
    import re
    loads = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith('.') and d not in ('data', '__pycache__')]
        for f in filenames:
            if f.endswith('.py'):
                text = open(os.path.join(dirpath, f)).read()
                assert 'pickle.' + 'load(' not in text and 'allow_pickle=' + 'True' not in text, f
                loads += [(f, m) for m in re.findall(r'torch\.load\((.*)', text)]
    assert loads
    for f, call in loads:
        if f == 'test_train.py' and 'weights_only=False' in call:
            continue  # test_the_payload_is_real, the control
        assert 'weights_only=True' in call or 'weights_only=not trust' in call, (f, call)


def test_a_run_written_before_the_operator_refactor_resumes_and_reads(tmp_path, cli, random_shards, root):
    """tests/data/ledger_run_v1: a 4-step ledger run (ckpt.pt and log.jsonl) written by the code
    before operators described themselves and aux terms came out of forward. It resumes with the
    same parameter names, and its old log (val_commit, no residual record) and the new records
    appended to it read as one trajectory."""
    out = tmp_path / 'run'
    shutil.copytree(os.path.join(root, 'tests', 'data', 'ledger_run_v1'), out)
    data = random_shards(tmp_path / 'data', 'text', 32, 5000, 1000)   # the run's data, regenerated
    old = read_checkpoint(str(out / 'ckpt.pt'))
    r = cli('train.py', f'--out_dir={out}', '--init_from=resume', f'--data_root={data}', '--max_iters=6')
    assert r.returncode == 0, r.stderr
    assert 'resuming at iter 4' in r.stdout
    new = read_checkpoint(str(out / 'ckpt.pt'))
    assert new['iter_num'] == 6 and new['model'].keys() == old['model'].keys()
    assert any(not torch.equal(new['model'][k], old['model'][k]) for k in old['model'])   # it trained
    evals = read_log(out, 'eval')
    assert 'val_commit' in evals[0] and 'val_aux' in evals[-1]
    p = cli('probe.py', out, '--out', tmp_path / 'traj')
    assert p.returncode == 0, p.stderr
    run = json.loads((tmp_path / 'traj' / 'trajectory.json').read_text())['runs'][0]
    assert run['decoded'] == 'C' and run['iters'] == [0, 2, 4, 6] and run['starts'] == 2
    assert all(v is not None for v in run['val_aux']['commit_rate'])   # old and new records alike
