"""The two variant points are each one entry in one registry (docs/reference.md §1.5): a throwaway
residual operator with a setting and a loss penalty, and a throwaway attention weighting with a
setting and a learnt parameter, defined here and nowhere in the repo, are trained (their settings
and penalty as config keys), resumed, probed, traced over their runs, compared in groups and
benchmarked by the real tools, which report them by name.

Everything runs in this process (the classes exist only here), on tiny shapes.
"""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import bench
import model
import probe
import train
from lab import weightings
from lab.config import option
from lab.report import residual_info


class TwoLane(model.Residual):
    """Made up for this test: every sublayer adds its output to a fast lane; a gate per token moves
    a slow lane towards the fast one, and only the slow lane is decoded."""
    streams = {'fast': 'fast lane: every sublayer adds its output', 'slow': 'slow lane: a gated running mix'}
    decoded = 'slow'
    aux = {'mix_rate': 'mean mixing gate'}
    settings = dict(lane_gate_bias=option(-1.0, "initial bias of the mixing gate"))
    penalties = {'lane_sparsity': ('mix_rate', option(0.05, "weight of the mean mixing gate in the loss"))}

    def __init__(self, config, s):
        super().__init__(config, s)
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.gate = nn.Linear(config.n_embd, 1)
        self.gate_bias = config.lane_gate_bias

    def init_weights(self):
        with torch.no_grad():
            self.gate.bias.fill_(self.gate_bias)

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
    args = dict(out_dir=out_dir, dataset='text', data_root=data_root, residual=residual,
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
                                     aux=TwoLane.aux, penalties={'lane_sparsity': 'mix_rate'})
    assert start['config']['lane_sparsity'] == 0.05 and start['config']['lane_gate_bias'] == -1.0
    train_ev = next(e for e in events if e['event'] == 'train')
    assert set(train_ev['aux']) == {'mix_rate'}
    assert train_ev['loss'] == pytest.approx(train_ev['ce'] + 0.05 * train_ev['aux']['mix_rate'], rel=1e-5)
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
    decoded = g['metrics']['[decoded] outlier_ratio']['per_group']
    assert decoded['lanes']['n'] == decoded['vanilla']['n'] == 2
    fast = g['metrics']['[fast] outlier_ratio']['per_group']
    assert fast['lanes']['n'] == 2 and fast['vanilla']['n'] == 0

    # the benchmark
    assert bench.main(['--residuals=vanilla,twolane', '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=8',
                       '--batch_size=2', '--warmup=1', '--steps=1', '--device=cpu', '--lane_gate_bias=-2']) == 0
    text = capsys.readouterr().out
    assert 'twolane/vanilla time ratio' in text
    assert json.loads(text.strip().splitlines()[-1])['twolane']['params'] > 0


def test_an_operator_is_checked_and_described_by_its_class(twolane, capsys):
    with pytest.raises(ValueError, match="residual='twolane' is pre-norm only"):
        model.GPTConfig(residual='twolane', norm_position='post')
    with pytest.raises(ValueError, match="residual='nothing' is not one of"):
        model.GPTConfig(residual='nothing')
    assert residual_info('ledger')['penalties'] == {'commit_sparsity': 'commit_rate'}
    assert residual_info('twolane')['penalties'] == {'lane_sparsity': 'mix_rate'}
    # its setting is a model option, its penalty a training key: defaults, given, refused where they do not apply
    gpt = model.GPT(model.GPTConfig(residual='twolane', lane_gate_bias=-2.5, n_layer=1, n_head=2, n_embd=16))
    assert gpt.sublayers[1].res.gate.bias.item() == -2.5
    cfg, _ = train.load_config(['--residual=twolane'])
    assert (cfg.residual, cfg.lane_sparsity, cfg.commit_sparsity, cfg.lane_gate_bias) == ('twolane', 0.05, 0.0, -1.0)
    cfg, _ = train.load_config(['--residual=twolane', '--lane_sparsity=0.3', '--lane_gate_bias=-3'])
    assert (cfg.lane_sparsity, cfg.lane_gate_bias) == (0.3, -3.0)
    assert train.load_config(['--residual=ledger'])[0].lane_sparsity == 0.0
    with pytest.raises(train.ConfigError, match="commit_sparsity=0.1 penalises commit_rate, but "
                                                "residual='twolane' has no commit_rate"):
        train.load_config(['--residual=twolane', '--commit_sparsity=0.1'])
    with pytest.raises(train.ConfigError, match="lane_sparsity=0.1 penalises mix_rate, but residual='vanilla'"):
        train.load_config(['--residual=vanilla', '--lane_sparsity=0.1'])
    with pytest.raises(train.ConfigError, match="lane_gate_bias .* must be float"):
        train.load_config(['--residual=twolane', '--lane_gate_bias=high'])
    assert train.main(['--help']) == 0
    text = capsys.readouterr().out
    assert '--lane_gate_bias=-1.0' in text and '--lane_sparsity=None' in text


class Scaled(weightings.Softmax):
    """Made up for this test: softmax of the scores times a learnt per-head factor exp(theta_h),
    theta_h starting at -log(attn_temperature)."""
    fused = False
    settings = dict(attn_temperature=option(2.0, "initial softmax temperature of every head"))

    def __init__(self, config):
        super().__init__(config)
        self.theta = nn.Parameter(torch.full((config.n_head, 1, 1), -math.log(config.attn_temperature)))

    def forward(self, scores, mask):
        return super().forward(scores * self.theta.exp(), mask)


@pytest.fixture
def scaled(monkeypatch):
    monkeypatch.setitem(weightings.WEIGHTINGS, 'scaled', Scaled)


def test_a_new_attention_weighting_needs_only_its_class(scaled, tmp_path, capsys, random_shards):
    """Its formula (by hand, at the configured temperature), its setting as a config key, its learnt
    parameter in the checkpoint (trained, resumed exactly), its label in the probe's report, bench."""
    gpt = model.GPT(model.GPTConfig(attn_softmax='scaled', attn_temperature=4.0, n_layer=1, n_head=2, n_embd=16,
                                    vocab_size=64, block_size=16)).eval()
    scores, mask = torch.randn(2, 2, 5, 5), model.attention_mask(5, 0, 'cpu')
    want = torch.softmax((scores / 4.0).masked_fill(~mask, float('-inf')), -1)
    torch.testing.assert_close(gpt.sublayers[0].fn.weighting(scores.clone(), mask), want)
    data = random_shards(tmp_path / 'data', 'text', 64, 4000, 1000)
    base = ['--dataset=text', f'--data_root={data}', '--residual=vanilla', '--attn_softmax=scaled',
            '--attn_temperature=3', '--n_layer=2', '--n_head=2', '--n_embd=16', '--vocab_size=64', '--block_size=16',
            '--batch_size=4', '--total_batch_size=64', '--eval_iters=1', '--eval_interval=2', '--stats_seqs=2',
            '--warmup_iters=1', '--device=cpu', '--compile=False']
    assert train.main(base + [f'--out_dir={tmp_path / "whole"}', '--max_iters=4']) == 0
    assert train.main(base + [f'--out_dir={tmp_path / "cut"}', '--max_iters=2']) == 0
    assert train.main([f'--out_dir={tmp_path / "cut"}', '--init_from=resume', '--max_iters=4']) == 0
    whole, cut = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('whole', 'cut'))
    assert whole['model_args']['attn_temperature'] == 3.0
    theta = whole['model']['sublayers.0.fn.weighting.theta']
    assert theta.shape == (2, 1, 1) and not torch.allclose(theta, torch.full_like(theta, -math.log(3.0)))   # it learnt
    assert all(torch.equal(whole['model'][k], cut['model'][k]) for k in whole['model'])
    capsys.readouterr()
    assert probe.main([str(tmp_path / 'cut' / 'ckpt.pt'), '--out', str(tmp_path / 'p'), '--num_seqs', '2']) == 0
    assert 'attention scaled' in capsys.readouterr().out
    assert bench.main(['--residuals=vanilla', '--attention=softmax', '--attn_softmax=scaled', '--n_layer=1',
                       '--n_head=2', '--n_embd=16', '--block_size=8', '--batch_size=2', '--warmup=1', '--steps=1',
                       '--device=cpu']) == 0


def test_a_vanilla_subclass_is_reported_under_its_own_name(monkeypatch):
    """The label comes from the config, not from the class it inherits: a fork's Vanilla subclass is
    not reported as 'vanilla' (post-norm stays a suffix of its own name)."""
    class Scaled(model.Vanilla):
        """Made up for this test."""
    monkeypatch.setitem(model.RESIDUALS, 'scaled_vanilla', Scaled)
    from lab.report import model_kind
    assert model_kind({'residual': 'scaled_vanilla'}) == 'scaled_vanilla'
    assert model_kind({'residual': 'scaled_vanilla', 'norm_position': 'post'}) == 'scaled_vanilla post-norm'
    assert residual_info('scaled_vanilla')['name'] == 'scaled_vanilla'
