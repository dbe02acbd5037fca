"""The CUDA path: bf16 autocast, torch.compile with Inductor's CUDA backend, fused AdamW, NCCL under
torchrun, the probe on a GPU, and the memory of a 160m step. Skipped without CUDA, so CI (CPU only)
stays green; results/gpu/run.sh runs it on a GPU machine.

LEDGER_TEST_DEVICE=cpu runs the same tests on the CPU (gloo instead of NCCL, the tiny bench shape
instead of 160m), to check the tests themselves before GPU time is spent on them.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from lab.training import configure_optimizer, default_weights, total_loss

DEVICE = os.environ.get('LEDGER_TEST_DEVICE', 'cuda')
pytestmark = pytest.mark.skipif(DEVICE == 'cuda' and not torch.cuda.is_available(),
                                reason='no CUDA device (LEDGER_TEST_DEVICE=cpu runs these tests on the CPU)')
VOCAB = 512
# bf16 rounds to 3 significant digits: the compiled graph fuses and reorders what eager rounds
# separately, so their losses drift apart by ~1e-2 over a few steps, not more
COMPILED_VS_EAGER = 0.05
CUDA_VS_CPU = 1e-3             # the probe in float32 on both: only the reduction order differs


def small(residual):
    return GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=VOCAB, residual=residual,
                     ledger_rank=8)


def train_steps(model, compiled, x, steps):
    """`steps` AdamW steps on one batch (so the loss must fall) under bf16 autocast, as train.py takes them."""
    opt = configure_optimizer(model, 0.1, 3e-3, (0.9, 0.999), device_type=DEVICE)
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    losses = []
    for _ in range(steps):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            _, ce, aux = fwd(x[:, :-1], x[:, 1:], return_logits=False)
            loss = total_loss(ce, aux, default_weights(model.config.residual))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('residual', ['vanilla', 'ledger'])
def test_compiled_bf16_steps_learn_and_match_eager(residual):
    torch.manual_seed(0)
    model = GPT(small(residual)).to(DEVICE)
    twin = copy.deepcopy(model)
    x = torch.randint(0, VOCAB, (8, 65), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    eager = train_steps(model, False, x, 8)
    compiled = train_steps(twin, True, x, 8)
    print(f'{residual}: eager {[round(v, 4) for v in eager]}\n{residual}: compiled {[round(v, 4) for v in compiled]}')
    assert all(torch.isfinite(torch.tensor(eager + compiled)))
    assert eager[-1] < eager[0] - 0.5 and compiled[-1] < compiled[0] - 0.5
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < COMPILED_VS_EAGER


def torchrun(root, env, *args):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                           os.path.join(root, 'train.py'), *map(str, args)], capture_output=True, text=True,
                          cwd=root, env=env, timeout=600)


def test_torchrun_trains_checkpoints_and_resumes(tmp_path, root, env, random_shards):
    data = random_shards(tmp_path / 'data', 'text', VOCAB, 60_000, 10_000)
    out = tmp_path / 'run'
    args = [f'--out_dir={out}', '--dataset=text', f'--data_root={data}', '--n_layer=2', '--n_head=2', '--n_embd=64',
            f'--vocab_size={VOCAB}', '--block_size=64', '--batch_size=4', '--total_batch_size=512', '--ledger_rank=8',
            '--eval_iters=2', '--eval_interval=4', '--log_interval=1', '--stats_seqs=2', '--warmup_iters=2',
            f'--device={DEVICE}', '--dtype=bfloat16', f'--compile={DEVICE == "cuda"}']
    r = torchrun(root, env, *args, '--max_iters=6')
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(root, env, f'--out_dir={out}', '--init_from=resume', '--max_iters=10')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resuming at iter 6' in r.stdout, r.stdout[-2000:]
    with open(out / 'log.jsonl') as f:
        events = [json.loads(line) for line in f]
    assert [e['iter'] for e in events if e['event'] == 'start'] == [0, 6]
    train = [e for e in events if e['event'] == 'train']
    assert [e['iter'] for e in train] == list(range(10)) and all(e['loss'] == e['loss'] for e in train)
    assert events[-1] == dict(event='stop', iter=10, reason='max_iters')


def test_probe_on_the_device_agrees_with_the_cpu(tmp_path, cli, random_shards, save_ckpt):
    data = random_shards(tmp_path / 'data', 'text', VOCAB, 0, 20_000)
    torch.manual_seed(0)
    ckpt = save_ckpt(GPT(small('ledger')), tmp_path / 'm' / 'ckpt.pt', data, dataset='text')
    reports = {}
    for device in ('cpu', DEVICE):
        out = tmp_path / f'probe_{device}'
        r = cli('probe.py', ckpt, '--device', device, '--dtype', 'float32', '--num_seqs', 16, '--out', out)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(out / 'probe.json') as f:
            reports[device] = json.load(f)['checkpoints'][0]
    a, b = reports['cpu'], reports[DEVICE]
    assert b['val_loss'] == pytest.approx(a['val_loss'], rel=CUDA_VS_CPU)
    for name in ('D', 'C'):
        for key in ('top1_median', 'start_mass'):
            assert b['streams'][name]['per_sublayer'][key] == pytest.approx(a['streams'][name]['per_sublayer'][key],
                                                                             rel=CUDA_VS_CPU), (name, key)
    alpha_a, alpha_b = (np.array(r['attention']['alpha1']) for r in (a, b))     # (layer, head)
    assert alpha_b.shape == alpha_a.shape and np.allclose(alpha_b, alpha_a, rtol=CUDA_VS_CPU, atol=1e-6)


def test_a_160m_step_reports_its_memory(cli):
    """bench.py at the paper's shape in bf16: each model's peak memory of one step (printed, and
    in OUT/gpu/bench.txt of results/gpu/run.sh); on the CPU stand-in, the tiny shape and no memory count."""
    preset = '160m' if DEVICE == 'cuda' else 'tiny'
    r = cli('bench.py', f'--preset={preset}', f'--device={DEVICE}', '--residuals=vanilla,ledger', '--compile=false',
            '--steps=2', '--warmup=1', timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ('vanilla', 'ledger'):
        m = result[name]
        assert m['ms_per_step'] > 0
        if DEVICE == 'cuda':
            assert 0 < m['step_mem_gib'] < 100 and 0 < m['state_mem_gib'] < 10, m
