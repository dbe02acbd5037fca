"""Gradient statistics during training (docs/reference.md §4.11): lab.stats.gradient_stats against
gradients taken by hand, a run logs them at every evaluation without changing its weights, and
probe.py out_dir draws them."""
import json
import os

import pytest
import torch

import train
from lab.stats import gradient_stats
from model import GPT, GPTConfig, Observer

V = 64


def make(residual='vanilla', **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=V, residual=residual,
                          ledger_rank=8, **kw)).eval()
    with torch.no_grad():                     # move the zero-initialised maps, so every path carries a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (3, 12), generator=g), torch.randint(0, V, (3, 12), generator=g)


def test_parameter_gradient_norms_are_those_of_backward():
    model = make('ledger')
    x, y = batch()
    got = gradient_stats(model, x, y)
    assert all(p.grad is None for p in model.parameters())          # .grad untouched
    _, loss, _ = model(x, y)
    loss.backward()
    want = [sum(float(p.grad.double().square().sum()) for p in sub.parameters()) ** 0.5 for sub in model.sublayers]
    assert got['sublayer'] == pytest.approx(want, rel=1e-6)


def test_stream_gradients_by_hand():
    """The last sublayer's h: its gradient by hand (retain_grad on the tensor the model hands on);
    a strict ledger's C is append-only and read by no block, so its gradient is the same after every
    sublayer; the ledger's last D does not reach the loss: 0."""
    class Keep(Observer):
        def on_sublayer(self, s, streams):
            if s == 3:
                self.h = streams['h']
                self.h.retain_grad()
                return {'h': self.h}
    model, keep = make(), Keep()
    x, y = batch(1)
    _, loss, _ = model(x, y, observer=keep)
    loss.backward()
    norm = keep.h.grad.double().norm(dim=-1)
    got = gradient_stats(model, x, y)['streams']['h']
    assert got['pos0'][3] == pytest.approx(float(norm[:, 0].mean()), rel=1e-6)
    assert got['other'][3] == pytest.approx(float(norm[:, 1:].mean()), rel=1e-6)
    strict = gradient_stats(make('ledger', commit_read='off'), x, y)['streams']
    c = strict['C']['pos0']
    assert c == pytest.approx([c[0]] * 4, rel=1e-6) and c[0] > 0
    assert strict['D']['pos0'][-1] == 0.0 and strict['D']['pos0'][0] > 0


@pytest.fixture
def in_process():
    """train() sets torch's deterministic-algorithms flag on the CPU; put it back afterwards."""
    state = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])


def test_a_run_logs_them_without_changing_its_weights(tmp_path, random_shards, capsys, in_process):
    data = random_shards(tmp_path / 'data', 'text', V, 6000, 2000)
    base = ['--dataset=text', f'--data_root={data}', '--residual=ledger', '--n_layer=2', '--n_head=2', '--n_embd=16',
            f'--vocab_size={V}', '--block_size=16', '--ledger_rank=4', '--batch_size=4', '--total_batch_size=64',
            '--eval_interval=2', '--eval_iters=1', '--max_iters=4', '--warmup_iters=1', '--device=cpu',
            '--compile=False']
    assert train.main(base + [f'--out_dir={tmp_path / "with"}', '--stats_seqs=2']) == 0
    assert train.main(base + [f'--out_dir={tmp_path / "without"}', '--stats_seqs=0']) == 0
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True)['model'] for d in ('with', 'without'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [json.loads(line) for line in open(tmp_path / 'with' / 'log.jsonl') if '"eval"' in line]
    assert len(evals) == 3 and all(len(e['grads']['sublayer']) == 4 for e in evals)
    assert set(evals[0]['grads']['streams']) == {'D', 'C'} and len(evals[0]['grads']['streams']['C']['pos0']) == 4
    capsys.readouterr()
    import probe
    assert probe.main([str(tmp_path / 'with'), '--out', str(tmp_path / 'traj')]) == 0
    traj = json.loads((tmp_path / 'traj' / 'trajectory.json').read_text())['runs'][0]
    assert traj['grads']['sublayer'][0] == evals[0]['grads']['sublayer']
    assert os.path.getsize(tmp_path / 'traj' / 'trajectory_grads.png') > 1000
