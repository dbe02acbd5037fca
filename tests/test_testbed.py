"""The trigger testbed end to end: train.py on the trigger language (vocabulary and doc alignment from
its meta.json, the task accuracy in every eval record), and the probe's conditional sink on a model
whose answer is known by construction. CPU, offline, tiny shapes."""
import json
import os

import pytest
import torch

from lab import measure
from lab.data import TRIGGER, Sampler, build_trigger, dataset_meta, shard_paths, task_mask
from model import GPT, GPTConfig

V, T = 34, 32     # the trigger language's default vocabulary; documents of 32 symbols after BOS


@pytest.fixture(scope='module')
def trigger_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    build_trigger(str(root), seq_len=T, train_docs=2000, val_docs=200)
    return str(root)


def conditional_sink_model():
    """A 1-layer vanilla model with one head that is a conditional sink by construction.

    Embeddings are zero except channel 6 = 1 everywhere and channel 7 = 1 at position 0 (wpe), and
    on the TRIGGER token (wte) channel 6 = -1 and channel 5 = 1, so its channel 6 is exactly 0.
    After RMSNorm, head 0's q is 100 u6 in its first dimension (large away from trigger positions,
    exactly 0 at them) and its k is 100 u7: every non-trigger query puts all its attention on
    position 0; a trigger query attends uniformly (1/(t+1) on position 0). Head 1 has q = 0."""
    torch.manual_seed(0)
    d = 16
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=d, block_size=T, vocab_size=V))
    with torch.no_grad():
        m.wte.weight.zero_()
        m.wpe.weight.zero_()
        m.wpe.weight[:, 6] = 1
        m.wpe.weight[0, 7] = 1
        m.wte.weight[TRIGGER, 5], m.wte.weight[TRIGGER, 6] = 1, -1
        W = m.sublayers[0].fn.qkv.weight                 # rows: q (0..d-1), k (d..2d-1), v
        W[:2 * d] = 0
        W[0, 6] = 100                                    # head 0, q dim 0
        W[d, 7] = 100                                    # head 0, k dim 0
    return m.eval()


def test_the_conditional_sink_is_measured_per_query_kind(trigger_root):
    meta = dataset_meta('trigger', trigger_root)
    x, y = Sampler(shard_paths('trigger', 'val', trigger_root), 16, T, 0, doc_aligned=True,
                           bos=meta['bos']).get(0)
    answers = task_mask(x, meta)
    assert answers.any() and (x[:, 0] == meta['bos']).all()
    result, _ = measure.measure(conditional_sink_model(), x, y, task=meta)
    cs = result['attention']['conditional']
    # by hand: head 0 puts 1 on position 0 from every non-trigger query, 1/(t+1) from a trigger query at t
    t = answers.nonzero()[:, 1].double()
    assert cs['n_trigger'] == int(answers.sum()) and cs['n_other'] == 16 * (T - 1) - cs['n_trigger']
    assert cs['other'][0][0] == pytest.approx(1.0, abs=1e-6)
    assert cs['trigger'][0][0] == pytest.approx(float((1 / (t + 1)).mean()), abs=1e-6)
    assert cs['heads'] == [[0, 0]] and cs['max_gap_head'] == [0, 0]
    # head 1 is uniform: both kinds see 1/(t+1) on average, no conditional sink
    assert abs(cs['other'][0][1] - cs['trigger'][0][1]) < 0.1
    assert result['task_answers'] == cs['n_trigger'] and 0 <= result['task_acc'] <= 1
    # a natural-text dataset has no task: no conditional sink, no task accuracy
    plain, _ = measure.measure(conditional_sink_model(), x, y)
    assert plain['attention']['conditional'] is None and plain['task_acc'] is None


def test_a_short_trigger_run_learns_and_logs_the_task_accuracy(trigger_root, tmp_path, cli):
    out = tmp_path / 'run'
    r = cli('train.py', '--dataset=trigger', f'--data_root={trigger_root}', f'--out_dir={out}', '--residual=vanilla', '--commit_sparsity=0',
            '--n_layer=2', '--n_head=2', '--n_embd=32', f'--block_size={T}', '--batch_size=16',
            f'--total_batch_size={16 * T}', '--max_iters=60', '--eval_interval=30', '--warmup_iters=5',
            '--learning_rate=3e-3', '--eval_iters=2', '--stats_seqs=2', '--device=cpu', '--compile=False', timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'val task acc' in r.stdout
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    cfg = log[0]['config']
    assert cfg['vocab_size'] == V and cfg['doc_aligned'] is True          # from the dataset's meta.json
    evals = [e for e in log if e['event'] == 'eval']
    assert [e['iter'] for e in evals] == [0, 30, 60]
    for e in evals:
        assert 0 <= e['val_task_acc'] <= 1 and 0 <= e['train_task_acc'] <= 1
    assert evals[-1]['val_loss'] < evals[0]['val_loss']
    p = cli('probe.py', out / 'ckpt.pt', '--out', tmp_path / 'probe', '--num_seqs', 8)
    assert p.returncode == 0, p.stderr
    assert 'task (trigger): accuracy' in p.stdout and 'conditional sink' in p.stdout
    c = json.loads((tmp_path / 'probe' / 'probe.json').read_text())['checkpoints'][0]
    assert c['data']['doc_aligned'] and c['data']['bos_at_pos0'] == 1.0 and c['data']['task']['trigger'] == 1
    assert c['attention']['conditional']['n_trigger'] == c['task_answers'] > 0


@pytest.mark.parametrize('args, words', [
    (['--vocab_size=20'], ['vocab_size=20 is smaller than the trigger vocabulary (34 tokens)']),
    ([f'--block_size={T + 1}'], [f'block_size={T + 1}', f'documents are {T + 1} tokens long']),
])
def test_the_dataset_decides_what_it_must(trigger_root, tmp_path, cli, one_line_error, args, words):
    r = cli('train.py', '--dataset=trigger', f'--data_root={trigger_root}', f'--out_dir={tmp_path / "o"}',
            '--n_layer=1', '--n_head=1', '--n_embd=16', '--batch_size=4', f'--total_batch_size={4 * 33}',
            '--block_size=33' if '--block_size' not in args[0] else args[0], '--max_iters=1', '--device=cpu',
            *[a for a in args if not a.startswith('--block_size')])
    assert r.returncode == 2
    one_line_error(r.stderr, 'train.py', *words)
    assert not os.path.exists(tmp_path / 'o')
