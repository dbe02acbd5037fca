"""bench.py: what one training step of one model costs. On the CPU (these tests): the models are
measured one at a time, memory is reported as n/a rather than a number torch does not keep, the
presets' vocabulary is the default, and bad input is one line on stderr with exit code 2.
Speed goals live in bench.py itself, never in timed assertions here."""
import gc
import json
import weakref

import pytest
import torch

import bench

TINY = ['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=8', '--batch_size=2', '--warmup=1', '--steps=1',
        '--device=cpu']


def test_one_model_at_a_time_and_memory_is_n_a_on_the_cpu(capsys, monkeypatch):
    """When a model is built every earlier one is gone (its weights and AdamW state freed), also over
    --rounds, where the models take turns; the step-memory columns say n/a on the CPU, in the table
    and as null in the JSON line; the vocabulary is 50257 unless --vocab_size says otherwise."""
    built, alive, refs = [], [], []
    real_build = bench.build

    def build(args, residual):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))
        out = real_build(args, residual)
        built.append(residual)
        refs.append(weakref.ref(out[0]))
        return out
    monkeypatch.setattr(bench, 'build', build)
    assert bench.main(TINY + ['--rounds=2']) == 0
    assert [r for r, _ in built] == ['vanilla', 'ledger', 'vanilla', 'ledger'] and alive == [0, 0, 0, 0]
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(('vanilla ', 'ledger '))]
    assert [r[0] for r in rows] == ['vanilla', 'ledger']
    for r in rows:
        assert r[-3:] == ['n/a', 'n/a', 'n/a']   # MFU, state, step mem
    result = json.loads(out.strip().splitlines()[-1])
    assert result['vocab_size'] == 50257
    for name in ('vanilla', 'ledger'):
        assert result[name]['step_mem_gib'] is None and result[name]['state_mem_gib'] is None
        assert result[name]['mfu'] is None and result[name]['ms_per_step'] > 0
    assert result['ledger']['ratio'] == result['ratio'] > 0

    monkeypatch.undo()
    assert bench.main(TINY + ['--vocab_size=64', '--residuals=vanilla']) == 0
    small = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert small['vocab_size'] == 64
    assert result['vanilla']['params'] - small['vanilla']['params'] == 2 * (50257 - 64) * 16   # embedding and head


def test_step_memory_needs_cuda_and_still_runs_the_step():
    calls = []
    assert bench.step_memory(lambda: calls.append(1), 'cpu') == (None, None)
    assert calls == [1]


@pytest.mark.parametrize('argv, words', [
    (['--device=cuda'], ["device='cuda'", 'use device']),
    (['--residuals=vanilla,ledgr'], ['ledgr', 'model.RESIDUALS']),
    (['--preset=1b'], ['--preset', '1b']),
    (['--no_such_flag'], ['--no_such_flag']),
    (['--steps=x'], ['--steps', "'x'"]),
    (['--n_embd=30'], ['n_embd=30', 'n_head']),
    (['--batch_size=0'], ['--batch_size', '>= 1']),
    (['--attention=softmax,plux_one'], ['plux_one', 'lab.weightings.ATTENTION_VARIANTS']),
])
def test_bad_input_is_one_line(argv, words, capsys, monkeypatch, one_line_error):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)   # --device=cuda is bad input on any machine
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    one_line_error(captured.err, 'bench.py', *words)
    assert captured.out == ''


def test_the_script_exits_2(cli, one_line_error):
    r = cli('bench.py', '--residuals=nothing')
    assert r.returncode == 2 and r.stdout == ''
    one_line_error(r.stderr, 'bench.py', 'nothing')


def test_every_attention_variant_against_plain_softmax(capsys):
    """--attention=all: each variant of lab.weightings.ATTENTION_VARIANTS is timed with each residual, relative to
    the first model (vanilla with plain softmax attention)."""
    from lab.weightings import ATTENTION_VARIANTS
    assert bench.main(['--attention=all', '--residuals=vanilla', '--n_layer=1', '--n_head=2', '--n_embd=16',
                       '--block_size=8', '--batch_size=2', '--vocab_size=64', '--warmup=0', '--steps=1',
                       '--device=cpu']) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    others = [f'vanilla+{name}' for name in ATTENTION_VARIANTS if name != 'softmax']
    assert set(result) >= {'vanilla', *others}
    for name in others:
        assert f'{name}/vanilla time ratio' in out and result[name]['ratio'] > 0
