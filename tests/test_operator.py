"""A new residual operator is one class and one RESIDUALS entry (docs/reference.md §1.5): a throwaway
operator defined here, and nowhere in the repo, is trained, probed, traced over its run, compared in
groups and benchmarked by the real tools, which report it by its name and its decoded stream.

Everything runs in this process (the class exists only here), on tiny shapes.
"""
import json
import os

import pytest
import torch
import torch.nn as nn

import bench
import model
import probe
import train


class TwoLane(model.Residual):
    """Made up for this test: every sublayer adds its output to a fast lane; a gate per token moves
    a slow lane towards the fast one, and only the slow lane is decoded."""
    streams = {'fast': 'fast lane: every sublayer adds its output', 'slow': 'slow lane: a gated running mix'}
    decoded = 'slow'
    aux = {'mix_rate': 'mean mixing gate'}

    def __init__(self, config, s):
        super().__init__(config, s)
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.gate = nn.Linear(config.n_embd, 1)

    def init_weights(self):
        with torch.no_grad():
            self.gate.bias.fill_(-1.0)

    @staticmethod
    def start(x):
        return (x, torch.zeros_like(x))

    def read(self, state):
        return self.norm(state[0])

    def write(self, state, u, y):
        fast, slow = state
        fast = fast + y
        g = torch.sigmoid(self.gate(u))
        return (fast, slow + g * (fast - slow)), {'mix_rate': g.float().mean()}

    @staticmethod
    def decode(state, config):
        return state[1]


@pytest.fixture
def twolane(monkeypatch):
    monkeypatch.setitem(model.RESIDUALS, 'twolane', TwoLane)


def train_run(out_dir, data_root, residual, seed, capsys):
    args = dict(out_dir=out_dir, dataset='text', data_root=data_root, residual=residual, commit_sparsity=0,
                n_layer=2, n_head=2, n_embd=16, vocab_size=64, block_size=16, batch_size=4, total_batch_size=64,
                eval_iters=1, eval_interval=1, log_interval=1, stats_seqs=2, max_iters=2, warmup_iters=1,
                device='cpu', compile=False, seed=seed, snapshot_interval=1)
    code = train.main([f'--{k}={v}' for k, v in args.items()])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_a_new_operator_needs_only_its_class(twolane, tmp_path, capsys, random_shards):
    data = random_shards(tmp_path / 'data', 'text', 64, 4000, 1000)
    runs = {name: str(tmp_path / name) for name in ('lane1', 'lane2', 'van1', 'van2')}
    for name, folder in runs.items():
        text = train_run(folder, data, 'twolane' if name.startswith('lane') else 'vanilla', int(name[-1]), capsys)
        if name == 'lane1':
            assert 'mix_rate' in text                           # the aux term is logged and printed by name

    # the training log describes the operator
    events = [json.loads(line) for line in open(os.path.join(runs['lane1'], 'log.jsonl'))]
    start = events[0]
    assert start['residual'] == dict(name='twolane', decoded='slow', streams=TwoLane.streams, views={},
                                     aux=TwoLane.aux, has_gates=False)
    assert set(next(e for e in events if e['event'] == 'train')['aux']) == {'mix_rate'}
    assert set(next(e for e in events if e['event'] == 'eval')['stats']) == {'fast', 'slow'}

    # the probe: report and probe.json by name, the decoded stream marked
    out = tmp_path / 'probe'
    assert probe.main([os.path.join(runs['lane1'], 'ckpt.pt'), os.path.join(runs['van1'], 'ckpt.pt'),
                       '--out', str(out), '--num_seqs', '2', '--interventions']) == 0
    text = capsys.readouterr().out
    r = json.loads((out / 'probe.json').read_text())
    lane = r['checkpoints'][0]
    assert lane['residual']['name'] == 'twolane' and lane['residual']['decoded'] == 'slow'
    assert set(lane['streams']) == {'fast', 'slow'} and lane['interventions']['zero']['streams']
    assert 'model: twolane, 2 layers' in text
    assert 'stream slow: slow lane: a gated running mix, after each sublayer (decoded)' in text
    rows = dict(r['comparison']['rows'])
    assert rows['decoded stream'] == ['slow', 'h'] and rows['residual'] == ['twolane', 'vanilla']
    assert rows['[fast] max top1/median'][1] is None              # vanilla has no fast lane
    assert os.path.getsize(out / 'lane1_layerwise.png') > 1000

    # trajectories of the runs
    out = tmp_path / 'traj'
    assert probe.main([runs['lane1'], runs['van1'], '--out', str(out)]) == 0
    text = capsys.readouterr().out
    traj = json.loads((out / 'trajectory.json').read_text())['runs']
    assert [(t['residual'], t['decoded']) for t in traj] == [('twolane', 'slow'), ('vanilla', 'h')]
    assert set(traj[0]['val_aux']) == {'mix_rate'} and traj[1]['val_aux'] == {}
    assert 'twolane (decodes slow)' in text
    assert (out / 'trajectory_decoded.png').exists() and (out / 'trajectory_fast.png').exists()

    # groups of two runs each: the decoded streams (slow vs h) are compared, fast only where it exists
    out = tmp_path / 'groups'
    ckpt = {name: os.path.join(folder, 'ckpt.pt') for name, folder in runs.items()}
    assert probe.main(['--group', f"lanes={ckpt['lane1']},{ckpt['lane2']}",
                       '--group', f"vanilla={ckpt['van1']},{ckpt['van2']}",
                       '--out', str(out), '--num_seqs', '2']) == 0
    capsys.readouterr()
    g = json.loads((out / 'probe.json').read_text())['groups']
    assert g['members'] == dict(lanes=['lane1', 'lane2'], vanilla=['van1', 'van2'])
    decoded = g['metrics']['[decoded] max_top1_median']['per_group']
    assert decoded['lanes']['n'] == decoded['vanilla']['n'] == 2
    fast = g['metrics']['[fast] max_top1_median']['per_group']
    assert fast['lanes']['n'] == 2 and fast['vanilla']['n'] == 0

    # the benchmark
    assert bench.main(['--residuals=vanilla,twolane', '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=8',
                       '--batch_size=2', '--warmup=1', '--steps=1', '--device=cpu']) == 0
    text = capsys.readouterr().out
    assert 'twolane/vanilla time ratio' in text
    assert json.loads(text.strip().splitlines()[-1])['twolane']['params'] > 0


def test_an_operator_is_checked_and_described_by_its_class(twolane):
    with pytest.raises(ValueError, match="residual='twolane' is pre-norm only"):
        model.GPTConfig(residual='twolane', norm_position='post')
    with pytest.raises(ValueError, match="residual='nothing' is not one of"):
        model.GPTConfig(residual='nothing')
    assert model.residual_info('ledger')['has_gates'] and not model.residual_info('twolane')['has_gates']
    cfg, _ = train.load_config(['--residual=twolane', '--commit_sparsity=0'])
    assert cfg.residual == 'twolane'
    with pytest.raises(train.ConfigError, match="commit_sparsity=0.1 penalises the commit_rate, but "
                                                "residual='twolane' has no commit gates"):
        train.load_config(['--residual=twolane', '--commit_sparsity=0.1'])
