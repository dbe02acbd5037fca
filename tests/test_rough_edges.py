"""What a new user hits at the edges (issue: no traceback, no lost work, no misleading hint): outputs
that cannot be written are one line and exit 2 before any work, a file that is not a checkpoint is
called that, a run killed before its first checkpoint is not a dead end, Ctrl-C while starting leaves
no empty folder, and each probe's outputs land in a folder of their own."""
import json
import os
import shutil
import sys

import pytest

import probe
import train

UNWRITABLE = '/sys/ledger-residuals-test'      # even root cannot create anything under /sys (Linux)


def sys_is_unwritable():
    try:
        open(UNWRITABLE, 'w').close()
    except OSError:
        return True
    os.remove(UNWRITABLE)
    return False


needs_sys = pytest.mark.skipif(not sys_is_unwritable(), reason='needs Linux /sys: a folder nobody can write into')


def tiny(data_root, out, **kw):
    args = dict(dataset='text', data_root=data_root, n_layer=1, n_head=2, n_embd=16, vocab_size=64, block_size=16,
                batch_size=4, total_batch_size=64, eval_iters=1, eval_interval=2, max_iters=2, warmup_iters=1,
                stats_seqs=2, device='cpu', compile=False, out_dir=out, **kw)
    return [f'--{k}={v}' for k, v in args.items()]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    from conftest import write_random_shards
    return write_random_shards(tmp_path_factory.mktemp('data'), 'text', 64, 4000, 1000)


@needs_sys
def test_unwritable_outputs_are_one_line_before_any_work(data_root, tmp_path, cli, one_line_error):
    r = cli('train.py', *tiny(data_root, f'{UNWRITABLE}/run'))
    assert r.returncode == 2 and r.stdout == ''
    one_line_error(r.stderr, 'train.py', 'out_dir=', 'cannot write into /sys')
    (tmp_path / 'a_file').write_text('x')
    r = cli('train.py', *tiny(data_root, tmp_path / 'a_file' / 'run'))
    assert r.returncode == 2
    one_line_error(r.stderr, 'train.py', 'is not a folder', 'a_file is a file')
    r = cli('train.py', *tiny(data_root, tmp_path / 'ok'))
    assert r.returncode == 0, r.stderr
    for out in (f'{UNWRITABLE}/probe', tmp_path / 'a_file'):
        r = cli('probe.py', tmp_path / 'ok' / 'ckpt.pt', '--out', out)
        assert r.returncode == 2 and 'report' not in r.stdout        # before the probe ran
        one_line_error(r.stderr, 'probe.py', '--out=')
    r = cli('prepare.py', '--dataset=trigger', '--data_root', UNWRITABLE)
    assert r.returncode == 2
    one_line_error(r.stderr, 'prepare.py', 'cannot write into /sys')


def test_a_file_that_is_not_a_checkpoint_says_so_and_never_suggests_trust(tmp_path, root, capsys, one_line_error):
    for source in ('README.md', 'train.py'):
        fake = tmp_path / source / 'ckpt.pt'
        fake.parent.mkdir()
        shutil.copy(os.path.join(root, source), fake)
        for argv in ([str(fake), '--out', str(tmp_path / 'p')], [str(fake), '--trust_checkpoint', '--out',
                                                                  str(tmp_path / 'p')]):
            assert probe.main(argv) == 2
            err = capsys.readouterr().err
            one_line_error(err, 'probe.py', 'not a checkpoint')
            assert 'trust' not in err
        assert train.main([f'--out_dir={fake.parent}', '--init_from=resume']) == 2
        err = capsys.readouterr().err
        one_line_error(err, 'train.py', 'not a checkpoint')
        assert 'trust' not in err


def test_a_run_killed_before_its_first_checkpoint_is_not_a_dead_end(data_root, tmp_path, cli, one_line_error):
    """Its out_dir holds log.jsonl (and maybe a temp file of the first save), no ckpt.pt: resuming says
    what works (the same command, which replaces the log), and that command works."""
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text(json.dumps(dict(event='start', iter=0, config={})) + '\n')
    (out / '.ckpt.pt.123.abcd.tmp').write_bytes(b'\0' * 100)        # a SIGKILL during the first save
    r = cli('train.py', f'--out_dir={out}', '--init_from=resume')
    assert r.returncode == 2
    one_line_error(r.stderr, 'train.py', 'stopped before its first checkpoint', f'--out_dir={out}')
    r = cli('train.py', *tiny(data_root, out))
    assert r.returncode == 0, r.stderr
    assert 'a run that stopped before its first checkpoint: removed' in r.stdout
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']
    starts = [json.loads(line) for line in open(out / 'log.jsonl') if '"start"' in line]
    assert len(starts) == 1 and starts[0]['config']['init_from'] == 'scratch'
    r = cli('train.py', f'--out_dir={tmp_path / "never"}', '--init_from=resume')
    one_line_error(r.stderr, 'train.py', 'no such checkpoint', f'python train.py --out_dir={tmp_path / "never"}')


CTRL_C_WHILE_STARTING = """
import sys, train
from lab import runfolder
class Log:                     # Ctrl-C right after out_dir was made, before anything is written into it
    def __init__(self, *a, **k):
        raise KeyboardInterrupt
runfolder.Log = Log
sys.exit(train.main(sys.argv[1:]))
"""


def test_ctrl_c_while_starting_leaves_no_empty_out_dir(data_root, tmp_path, root, env):
    import subprocess
    out = tmp_path / 'deep' / 'run'
    r = subprocess.run([sys.executable, '-c', CTRL_C_WHILE_STARTING] + tiny(data_root, out), cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and 'interrupted' in r.stderr
    assert not (tmp_path / 'deep').exists()


def test_each_input_gets_its_own_probe_folder(data_root, tmp_path, root, cli):
    """Without --out, probe_out/<the first input's name>: the demo's and a trigger run's PNGs and JSON
    do not mix (run in a copy of the repo's cwd layout: probe_out/ is relative to where it runs)."""
    a, b = tmp_path / 'run_a', tmp_path / 'run_b'
    for out in (a, b):
        assert cli('train.py', *tiny(data_root, out)).returncode == 0
    work = tmp_path / 'work'
    work.mkdir()
    import subprocess
    for target in (a / 'ckpt.pt', b / 'ckpt.pt', a):
        r = subprocess.run([sys.executable, os.path.join(root, 'probe.py'), str(target), '--num_seqs', '2'], cwd=work,
                           env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work / 'probe_out')) == ['run_a', 'run_b']
    assert {'probe.json', 'trajectory.json'} <= set(os.listdir(work / 'probe_out' / 'run_a'))
    assert not any(f.startswith('run_a') for f in os.listdir(work / 'probe_out' / 'run_b'))
