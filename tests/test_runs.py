"""probe.py on training runs (log.jsonl trajectories), snapshots, and groups of runs (statistics)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import probe
import runs
from stats import STATS_KEYS
from keytree import check_keys, documented_keys
from prepare import write_shard

TBS = 1000           # total_batch_size of the constructed logs: tokens = iter x 1000


def run_main(capsys, *args):
    """probe.main in this process: (exit code, stdout, stderr)."""
    code = probe.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def stats(ratio, channel=None, new=True):
    """One stream's logged stats with top1/median `ratio` per sublayer; new=False: as logged before
    start_mass and the channels were (four keys)."""
    S = len(ratio)
    st = dict(top1_median=list(ratio), kurtosis=[1.0] * S, feat_maxmed=[2.0] * S, n_massive=[0] * (S - 1) + [3])
    if new:
        st.update(start_mass=[0.1 * (s + 1) for s in range(S)], start_mass_dominant=[0.5] * S,
                  top_channel=[channel] * S, dominant_dim=channel, peak_layer=S - 1)
    return st


def start(residual='ledger', n_layer=2, tbs=TBS, it=0):
    return dict(event='start', iter=it, config=dict(residual=residual, n_layer=n_layer, n_embd=16,
                                                    total_batch_size=tbs, block_size=32))


def ev(it, streams, val_loss=3.0, commit=0.2):
    out = dict(event='eval', iter=it, train_loss=val_loss, val_loss=val_loss, stats=streams)
    if commit is not None:
        out['val_commit'] = commit
    return out


def write_log(folder, events):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'log.jsonl'), 'w') as f:
        for e in events:
            f.write((e if isinstance(e, str) else json.dumps(e)) + '\n')
    return str(folder)


# the constructed ledger run: D's top1/median (max over sublayers, each time at another sublayer) crosses
# 10 at iter 200, 100 at iter 300 (exactly 100: '>=' counts), never 1000; its dominant channel goes 5, 7, 3.
# The run is resumed after iter 300 and logs iter 300 again: the second value (100) wins over the first (40).
D_MAX = {0: 2.0, 100: 5.0, 200: 12.0, 300: 100.0, 400: 150.0, 500: 900.0, 600: 999.0}
D_CHANNEL = {0: 5, 100: 5, 200: 7, 300: 7, 400: 3, 500: 3, 600: 3}


def ledger_events():
    events = [start('ledger')]
    for it in sorted(D_MAX):
        ratio = [1.5] * 4
        ratio[it // 100 % 4] = D_MAX[it]
        streams = dict(D=stats(ratio, D_CHANNEL[it]), C=stats([1.2, 1.3, 1.1, 1.0], 11),
                       read=stats([1.5] * 4, 11))
        if it == 300:
            events.append(ev(it, dict(streams, D=stats([40.0, 1, 1, 1], 7)), val_loss=9.9))   # killed run ...
            events.append(start('ledger', it=300))                                          # ... resumed here
        events.append(ev(it, streams, val_loss=5.0 - it / 200))
    return events


def vanilla_old_events():
    """A vanilla run logged before start_mass and the channels: h only, four keys, no commit rate.
    top1/median 50 at iter 10 and 2000 at iter 20, with 100 tokens per step."""
    return [start('vanilla', tbs=100)] + [ev(it, dict(h=stats([1.0, r, 2.0, 1.0], new=False)), commit=None)
                                          for it, r in ((0, 3.0), (10, 50.0), (20, 2000.0))]


# ----------------------------------------------------------------------------------------------
# trajectories


def test_trajectories_from_constructed_logs(tmp_path, capsys):
    ledger = write_log(tmp_path / 'ledger_run', ledger_events())
    vanilla = write_log(tmp_path / 'old', vanilla_old_events())
    out = tmp_path / 'out'
    code, text, err = run_main(capsys, ledger, os.path.join(vanilla, 'log.jsonl'), '--out', out)
    assert code == 0, err
    data = json.loads((out / 'trajectory.json').read_text())
    check_keys(data, documented_keys(runs.__doc__, 'trajectory.json'), 'trajectory.json')
    led, old = data['runs']
    assert (led['name'], old['name']) == ('ledger_run', 'old')
    # resumed: every iter once, the last eval of iter 300 kept
    assert led['starts'] == 2 and led['iters'] == sorted(D_MAX) and led['tokens'] == [i * TBS for i in sorted(D_MAX)]
    D = led['streams']['D']
    assert D['top1_median_max'] == [D_MAX[i] for i in sorted(D_MAX)]
    assert D['top1_median_max_sublayer'] == [i // 100 % 4 for i in sorted(D_MAX)]
    assert D['crossings'] == {'10': dict(iter=200, tokens=200_000), '100': dict(iter=300, tokens=300_000),
                              '1000': None}
    assert D['n_massive_total'] == [3] * 7 and D['start_mass'] == [0.4] * 7      # at peak_layer 3
    assert led['val_loss'][3] == pytest.approx(3.5) and led['val_aux'] == {'commit_rate': [0.2] * 7}
    # a changing dominant channel, and one that stays
    assert D['dominant'] == dict(channel=3, stable_from_iter=400, stable_from_tokens=400_000, changes=2,
                                 segments=[[5, 0, 100], [7, 200, 300], [3, 400, 600]], channels=[3, 5, 7])
    assert led['streams']['C']['dominant']['changes'] == 0
    assert led['streams']['D']['missing'] == [] and led['streams']['D']['partial'] == []
    # the log from before this change: plotted with what it has, the rest named
    h = old['streams']['h']
    assert h['crossings'] == {'10': dict(iter=10, tokens=1000), '100': dict(iter=20, tokens=2000),
                              '1000': dict(iter=20, tokens=2000)}
    assert h['start_mass'] is None and h['dominant'] is None
    assert h['missing'] == list(runs.NEWER_KEYS) and old['val_aux'] == {}
    assert "first top1/median (max over sublayers) >= 10: step 200 (200,000 tokens), >= 100: step 300 " \
           "(300,000 tokens), >= 1000: never" in text
    assert "changed 2 time(s): 5 (steps 0-100), 7 (steps 200-300), 3 (steps 400-600); stable at 3 from step 400 " \
           "(400,000 tokens)" in text
    assert "the same, 11, at every eval" in text
    assert "resumed 1 time(s)" in text
    assert "not in this log (written before train.py logged them; not plotted): start_mass" in text
    assert "dominant channel: not logged" in text
    # vanilla (h) next to ledger (C) share the 'decoded' figure
    for name in ('trajectory_h', 'trajectory_D', 'trajectory_C', 'trajectory_read', 'trajectory_decoded',
                 'trajectory_loss', 'trajectory_heatmap_ledger_run', 'trajectory_heatmap_old'):
        assert (out / f'{name}.png').stat().st_size > 1000, name


def test_partial_keys_after_a_resume_with_newer_code(tmp_path, capsys):
    """Resumed with a newer train.py: the first evals lack start_mass, the later ones have it."""
    events = [start('vanilla'), ev(0, dict(h=stats([1.0, 2.0], new=False)), commit=None), start('vanilla', it=0),
              ev(10, dict(h=stats([1.0, 20.0], 4)), commit=None)]
    code, text, err = run_main(capsys, write_log(tmp_path / 'r', events), '--out', tmp_path / 'o')
    assert code == 0, err
    h = json.loads((tmp_path / 'o' / 'trajectory.json').read_text())['runs'][0]['streams']['h']
    assert h['start_mass'] == [None, 0.2] and h['dominant_dim'] == [None, 4] and h['missing'] == []
    assert set(h['partial']) == set(runs.NEWER_KEYS)
    assert 'logged at some evals only' in text


BAD_LOGS = {
    'bad_json': ([start(), '{"event": "eval", "iter": 0, "sta'], 'line 2 is not JSON'),
    'no_evals': ([start(), dict(event='train', iter=0, loss=1.0)], 'no eval events'),
    'no_stats': ([start(), ev(0, None)], 'line 2: eval at iter 0 has no activation statistics'),
    'lacks_key': ([start(), ev(0, dict(h={'kurtosis': [1.0]}))], "stream h's stats lack top1_median"),
    'before_start': ([ev(0, dict(h=stats([1.0, 2.0])))], 'line 1: eval event before any start event'),
    'other_model': ([start(), ev(0, dict(h=stats([1.0, 2.0]))), ev(2, dict(h=stats([1.0, 2.0, 3.0, 4.0])))],
                    'line 3: eval at iter 2 has streams'),
    'other_start': ([start(), ev(0, dict(h=stats([1.0, 2.0]))), start(n_layer=4)], 'line 3: a different model'),
}


@pytest.mark.parametrize('case', sorted(BAD_LOGS))
def test_malformed_logs_are_one_line_errors(tmp_path, capsys, case, one_line_error):
    events, words = BAD_LOGS[case]
    folder = write_log(tmp_path / case, events)
    code, _, err = run_main(capsys, folder, '--out', tmp_path / 'o')
    assert code == 2
    one_line_error(err, 'probe.py', os.path.join(folder, 'log.jsonl'), words)
    assert not (tmp_path / 'o').exists()                  # nothing written


def test_inputs_that_cannot_go_together(tmp_path, capsys, cli, one_line_error):
    run = write_log(tmp_path / 'run', vanilla_old_events())
    (tmp_path / 'empty').mkdir()
    ckpt = tmp_path / 'm.pt'
    ckpt.write_bytes(b'x')
    cases = [((run, ckpt), 'run them separately'),
             ((run, os.path.join(run, 'log.jsonl')), 'are the same log'),
             ((tmp_path / 'empty',), 'a folder with neither log.jsonl'),
             ((tmp_path / 'missing.jsonl',), 'no such log file'),
             (('--group', f'a={run}'), 'is a training run'),
             ((ckpt, '--group', f'a={ckpt}'), 'not both'),
             (('--group', 'a b=x.pt'), 'expected NAME=CKPT'),
             (('--group', f'a={ckpt}', '--group', f'b={ckpt}'), 'listed twice'),
             (('--group', f'a={ckpt}', '--group', f'a={ckpt}'), 'given twice'),
             (('--group', 'a=' + str(tmp_path / 'nothing*.pt')), 'matches no file'),
             ((), 'nothing to probe')]
    for args, words in cases:
        code, _, err = run_main(capsys, *args, '--out', tmp_path / 'o')
        assert code == 2
        one_line_error(err, 'probe.py', words)
    # and through the real command line
    r = cli('probe.py', run, ckpt, '--out', tmp_path / 'o')
    assert r.returncode == 2
    one_line_error(r.stderr, 'probe.py', 'run them separately')


# ----------------------------------------------------------------------------------------------
# a real training run: its log and its snapshots


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cli):
    """A 2 x 32 ledger model trained 4 steps by train.py, evaluated and snapshotted every 2 steps."""
    root = tmp_path_factory.mktemp('runs')
    rng = np.random.default_rng(0)
    os.makedirs(root / 'data' / 'text')
    write_shard(str(root / 'data' / 'text' / 'text_train_000000.bin'), rng.integers(0, 512, 20_000))
    write_shard(str(root / 'data' / 'text' / 'text_val_000000.bin'), rng.integers(0, 512, 4_000))
    out = root / 'tiny'
    args = dict(out_dir=out, dataset='text', data_root=root / 'data', n_layer=2, n_head=2, n_embd=32,
                vocab_size=512, block_size=32, batch_size=4, total_batch_size=128, ledger_rank=8, eval_iters=1,
                eval_interval=2, log_interval=1, stats_seqs=2, max_iters=4, warmup_iters=1, device='cpu',
                compile=False, snapshot_interval=2)
    r = cli('train.py', *[f'--{k}={v}' for k, v in args.items()])
    assert r.returncode == 0, r.stderr
    return out


def test_snapshots_are_probed_from_the_command_line(trained, tmp_path, cli):
    snaps = sorted(str(trained / 'snapshots' / f) for f in os.listdir(trained / 'snapshots'))
    assert [os.path.basename(s) for s in snaps] == ['ckpt_000000.pt', 'ckpt_000002.pt', 'ckpt_000004.pt']
    out = tmp_path / 'out'
    r = cli('probe.py', *snaps, '--out', out, '--num_seqs', 2)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / 'probe.json').read_text())
    names = ['tiny_i000000', 'tiny_i000002', 'tiny_i000004']
    assert [c['name'] for c in data['checkpoints']] == names == data['comparison']['columns']
    assert [(c['iter_num'], c['tokens']) for c in data['checkpoints']] == [(0, 0), (2, 256), (4, 512)]
    assert '=== comparison ===' in r.stdout and 'start_mass' in r.stdout
    for c in data['checkpoints']:
        sm = c['streams']['D']['summary']
        assert sm['start_mass'] == c['streams']['D']['per_sublayer']['start_mass'][sm['peak_layer']]
        assert 0 < sm['start_mass'] < 1
    assert (out / 'tiny_i000004_layerwise.png').exists() and (out / 'overlay_top1_median.png').exists()
    assert probe.checkpoint_names(['a/ckpt.pt', 'b/snapshots/ckpt_000100.pt', 'c/snapshots/ckpt_000100.pt',
                                   'c/x.pt', 'd/a/ckpt.pt']) == ['a', 'b_i000100', 'c_i000100', 'x', 'a_2']


def test_the_trajectory_of_a_real_run(trained, tmp_path, capsys):
    code, text, err = run_main(capsys, trained, '--out', tmp_path / 'o')
    assert code == 0, err
    run = json.loads((tmp_path / 'o' / 'trajectory.json').read_text())['runs'][0]
    assert run['iters'] == [0, 2, 4] and run['tokens'] == [0, 256, 512] and set(run['streams']) == {'D', 'C', 'read'}
    for st in run['streams'].values():
        assert st['missing'] == [] and len(st['top1_median']) == 3 and st['n_sublayers'] == 4
        assert all(isinstance(c, int) for c in st['dominant_dim']) and st['dominant'] is not None
    logged = [json.loads(l) for l in open(trained / 'log.jsonl')]
    evals = [e for e in logged if e['event'] == 'eval']
    assert set(evals[0]['stats']['D']) == set(STATS_KEYS)
    assert 'tiny' in text and 'never' in text


def test_trust_checkpoint(trained, tmp_path, capsys, one_line_error):
    """A checkpoint holding a pickled object (numpy's RNG state, as old train.py wrote) needs --trust_checkpoint."""
    ckpt = torch.load(trained / 'snapshots' / 'ckpt_000004.pt', weights_only=True)
    ckpt['rng'] = np.random.get_state()
    torch.save(ckpt, tmp_path / 'old.pt')
    code, _, err = run_main(capsys, tmp_path / 'old.pt', '--out', tmp_path / 'o', '--num_seqs', 1)
    assert code == 2
    one_line_error(err, 'probe.py', f"{tmp_path / 'old.pt'}: contains pickled Python objects, which could run code; "
                                     f"refusing", '--trust_checkpoint')
    code, _, err = run_main(capsys, tmp_path / 'old.pt', '--out', tmp_path / 'o', '--num_seqs', 1,
                            '--trust_checkpoint')
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# groups of runs


def test_bootstrap_interval_covers_a_known_difference():
    rng = np.random.default_rng(1)
    a, b = 10 + rng.normal(0, 1, 8), 15 + rng.normal(0, 1, 8)
    ci = runs.bootstrap_ci(a, b)
    assert ci[0] < 5 < ci[1] and ci[0] > 0 and ci[1] - ci[0] < 4
    assert runs.bootstrap_ci(a, b) == ci                        # fixed seed: the same interval every time
    assert runs.bootstrap_ci([1.0, 1.0, 1.0], [1.0, 1.0]) == [0.0, 0.0]
    assert runs.bootstrap_ci([1.0], [2.0, 3.0]) is None         # one run: no interval exists
    assert runs.bootstrap_ci([2.0, 3.0], [1.0]) is None


def test_permutation_pvalue_exact_and_random():
    same = [1.0, 2.0, 3.0]
    assert runs.permutation_pvalue(same, same) == (1.0, dict(test='exact', count=20))
    assert runs.permutation_pvalue([1.0, 2.0, 3.0], [10.0, 11.0, 12.0]) == (2 / 20, dict(test='exact', count=20))
    assert runs.permutation_pvalue([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])[0] == 2 / 20     # two-sided
    assert runs.permutation_pvalue([0.3, 0.1, 0.2], [0.1 + 0.2, 0.2, 0.1])[0] == 1.0     # equal up to rounding
    # 7 + 7 runs: 3432 splits, enumerated; 8 + 8: 12870 > 10,000, so 10,000 random permutations
    p, test = runs.permutation_pvalue(np.arange(7.0), np.arange(7.0) + 100)
    assert test == dict(test='exact', count=math.comb(14, 7)) and p == 2 / math.comb(14, 7)
    p, test = runs.permutation_pvalue(np.arange(8.0), np.arange(8.0) + 100)
    assert test == dict(test='random', count=10_000) and 1 / 10_001 <= p < 0.001
    p, test = runs.permutation_pvalue(np.arange(8.0), np.arange(8.0))
    assert test['test'] == 'random' and p == 1.0
    # the switch is max_exact
    assert runs.permutation_pvalue([1.0, 2.0, 3.0], [10.0, 11.0, 12.0], max_exact=19)[1] == dict(test='random',
                                                                                                  count=10_000)


def fake_result(name, ratio, loss, stream='h'):
    sm = dict(max_top1_median=ratio, bos_concentration=2.0, start_mass=0.1, start_mass_dominant=0.5, persistence=1.0)
    return dict(name=name, streams={stream: dict(summary=sm)}, attention=dict(sink1_prefix=50.0), val_loss=loss)


def test_group_statistics_on_constructed_values():
    results = [fake_result('v1', 10.0, 3.0), fake_result('v2', 11.0, 3.1), fake_result('v3', 12.0, 3.2),
               fake_result('l1', 100.0, 3.0, 'C'), fake_result('l2', 110.0, 3.1, 'C'),
               fake_result('l3', 120.0, 3.2, 'C'), fake_result('solo', 50.0, 3.0)]
    g = runs.group_statistics(results, dict(vanilla=['v1', 'v2', 'v3'], ledger=['l1', 'l2', 'l3'], one=['solo']))
    assert g['names'] == ['vanilla', 'ledger', 'one']
    m = g['metrics']['[h|C] max_top1_median']
    assert m['per_group']['vanilla'] == dict(n=3, values=[10.0, 11.0, 12.0], mean=11.0, std=1.0, note=None)
    pair = m['pairs'][0]
    assert (pair['a'], pair['b'], pair['diff'], pair['p']) == ('vanilla', 'ledger', 99.0, 0.1)
    assert pair['test'] == 'exact: 20 splits (all)' and pair['ci'][0] <= 99.0 <= pair['ci'][1]
    same = g['metrics']['val_loss']['pairs'][0]
    assert same['p'] == 1.0 and same['diff'] == pytest.approx(0.0, abs=1e-12)
    solo = m['per_group']['one']
    assert solo['std'] is None and solo['mean'] == 50.0 and 'no interval' in solo['note']
    vs_one = [p for p in m['pairs'] if p['b'] == 'one']
    assert all(p['ci'] is None and 'no interval exists' in p['note'] for p in vs_one)
    assert '[D] max_top1_median' not in g['metrics']                # no group measured it
    text = runs.groups_text(g)
    assert '11 +- 1' in text and '50 (one run)' in text and '=== ledger - vanilla' in text
    assert 'exact: 20 splits (all)' in text and 'one run in one: no interval exists' in text


def test_groups_from_the_command_line(trained, tmp_path, capsys):
    snaps = trained / 'snapshots'
    out = tmp_path / 'out'
    code, text, err = run_main(capsys, '--group', f"early={snaps / 'ckpt_000000.pt'},{snaps / 'ckpt_000002.pt'}",
                               '--group', f"late={snaps / 'ckpt_000004.pt'}", '--out', out, '--num_seqs', 2)
    assert code == 0, err
    data = json.loads((out / 'probe.json').read_text())
    check_keys(data['groups'], dict(documented_keys(probe.__doc__, 'probe.json'))['groups'], 'probe.json.groups')
    g = data['groups']
    assert g['members'] == dict(early=['tiny_i000000', 'tiny_i000002'], late=['tiny_i000004'])
    losses = [c['val_loss'] for c in data['checkpoints']]
    v = g['metrics']['val_loss']
    assert v['per_group']['early']['mean'] == pytest.approx(np.mean(losses[:2]))
    assert v['per_group']['early']['std'] == pytest.approx(np.std(losses[:2], ddof=1))
    assert v['pairs'][0]['diff'] == pytest.approx(losses[2] - np.mean(losses[:2]))
    assert v['pairs'][0]['ci'] is None and v['pairs'][0]['test'] == 'exact: 3 splits (all)'
    assert '=== groups: mean +- sample std over runs ===' in text and '(one run)' in text
    assert (out / 'groups.png').stat().st_size > 1000
    assert not any(f.endswith('_layerwise.png') for f in os.listdir(out))     # per-checkpoint PNGs skipped


def test_many_snapshots_stay_readable(tmp_path):
    """20 snapshots: the comparison table is cut into blocks that fit 160 characters, and the overlay
    colours the lines by iter with a colour bar instead of a 20-line legend."""
    names = [f'run_i{100 * i:06d}' for i in range(20)]
    comp = dict(columns=names, rows=[['iter', list(range(0, 2000, 100))], ['residual', ['ledger'] * 20]])
    text = probe.comparison_text(comp)
    assert max(len(line) for line in text.splitlines()) <= 160
    assert all(n in text for n in names) and '(20 checkpoints,' in text
    results = [dict(name=n, iter_num=100 * i, residual=dict(decoded='C'), streams=dict(C=dict(per_sublayer=dict(
        top1_median=[1.0 + i, 2.0, 3.0, 4.0], top1=[0.1, 0.2, 0.3, 0.4 + i])))) for i, n in enumerate(names)]
    import plots
    [path] = plots.plot_overlay(results, str(tmp_path))
    assert os.path.getsize(path) > 1000
