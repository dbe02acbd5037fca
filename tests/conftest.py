"""Helpers every test file shares, as fixtures: the repository root, the subprocess environment
(one thread, no mirror or data folder from the user's shell), a runner for the repo's scripts, the
one-line-error assertion, and small checkpoints and datasets.

The top-level modules (model, train, probe, prepare, ...) are made importable here too.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """Tiny shapes: one intra-op thread is faster, and 10-50x faster when other processes load the
    CPU (OpenMP's threads spin-wait)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def root():
    """The repository's folder."""
    return ROOT


@pytest.fixture(scope='session')
def env():
    """The environment of every subprocess: one thread, unbuffered output, fast download retries,
    and none of the user's LEDGER_DATA / LEDGER_BASE_URL, so tests only see their own files."""
    e = {k: v for k, v in os.environ.items() if k not in ('LEDGER_BASE_URL', 'LEDGER_DATA')}
    e.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', LEDGER_BACKOFF='0.01')
    return e


@pytest.fixture(scope='session')
def cli(env):
    """cli('probe.py', *args, timeout=..., **env_overrides) -> the CompletedProcess of one of the
    repo's scripts, run as a user would (text output captured)."""
    def run(script, *args, timeout=300, **overrides):
        return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                              text=True, cwd=ROOT, env={**env, **overrides}, timeout=timeout)
    return run


def check_one_line_error(err, tool, *words):
    """err (stderr) is exactly one line, '<tool>: error: ...', holding every one of words."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f'{tool}: error:'), err
    assert 'Traceback' not in err, err
    for w in words:
        assert str(w) in lines[0], (w, err)


@pytest.fixture(scope='session')
def one_line_error():
    """one_line_error(stderr, 'train.py', *words): see check_one_line_error."""
    return check_one_line_error


def write_checkpoint(model, path, data_root, dataset='builtin', **extra):
    """A weights-only checkpoint as train.py's snapshots are, for a model built in a test: it names
    its dataset and data_root so that the probe finds validation windows."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    torch.save(dict(model=model.state_dict(), model_args=dict(vars(model.config)),
                    config=dict(dataset=dataset, data_root=str(data_root), block_size=model.config.block_size),
                    iter_num=7, **extra), path)
    return str(path)


@pytest.fixture(scope='session')
def save_ckpt():
    """save_ckpt(model, path, data_root, dataset='builtin', **extra) -> path: see write_checkpoint."""
    return write_checkpoint


def write_random_shards(data_root, dataset, vocab, n_train, n_val, seed=0):
    """<data_root>/<dataset>/<prefix>_{train,val}_000000.bin of uniform random token ids."""
    from lab.data import DATASETS, write_shard
    rng = np.random.default_rng(seed)
    folder = os.path.join(str(data_root), dataset)
    os.makedirs(folder, exist_ok=True)
    prefix = DATASETS[dataset]['prefix']
    for split, n in (('train', n_train), ('val', n_val)):
        if n:
            write_shard(os.path.join(folder, f'{prefix}_{split}_000000.bin'), rng.integers(0, vocab, n))
    return str(data_root)


@pytest.fixture(scope='session')
def random_shards():
    """random_shards(data_root, dataset, vocab, n_train, n_val, seed=0) -> data_root: see write_random_shards."""
    return write_random_shards
