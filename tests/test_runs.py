"""probe.py on training runs (log.jsonl trajectories), snapshots, and groups of runs (statistics)."""
import json
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch

import probe
from lab import report
from lab import groups, trajectories
from lab.stats import STATS_KEYS
from keytree import check_keys, documented_keys
from lab.data import write_shard

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


def start(residual='ledger', n_layer=2, tbs=TBS, it=0, **config):
    return dict(event='start', iter=it, config=dict(residual=residual, n_layer=n_layer, n_embd=16,
                                                    total_batch_size=tbs, block_size=32, **config))


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
    check_keys(data, documented_keys('trajectory.json'), 'trajectory.json')
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
    assert h['missing'] == list(trajectories.NEWER_KEYS) and old['val_aux'] == {}
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


def test_trajectories_of_many_runs_keep_their_panels(tmp_path):
    """Many runs (42 in results/mitigations/run.sh) get one legend beside the panels, not one per
    panel: 42 legends in the panels made matplotlib give up on the layout ('axes sizes collapsed')."""
    from lab import plots
    plt = plots._pyplot()
    for n, figsize in ((42, (15, 7.5)), (42, (11, 4)), (3, (11, 4))):
        fig, axes = plt.subplots(1, 2, figsize=figsize, layout='constrained')
        for ax in axes:
            for i in range(n):
                ax.plot([0, 1], [i, i + 1], label=f'ledger_gate_elementwise_s{i}')
        plots._legends(fig, axes, n)
        assert (len(fig.legends), [ax.get_legend() is not None for ax in axes]) == \
            ((1, [False, False]) if n > plots.MANY else (0, [True, True]))
        with warnings.catch_warnings():
            warnings.simplefilter('error', UserWarning)
            plots._save(fig, str(tmp_path / f'{n}.png'))


def test_partial_keys_after_a_resume_with_newer_code(tmp_path, capsys):
    """Resumed with a newer train.py: the first evals lack start_mass, the later ones have it."""
    events = [start('vanilla'), ev(0, dict(h=stats([1.0, 2.0], new=False)), commit=None), start('vanilla', it=0),
              ev(10, dict(h=stats([1.0, 20.0], 4)), commit=None)]
    code, text, err = run_main(capsys, write_log(tmp_path / 'r', events), '--out', tmp_path / 'o')
    assert code == 0, err
    h = json.loads((tmp_path / 'o' / 'trajectory.json').read_text())['runs'][0]['streams']['h']
    assert h['start_mass'] == [None, 0.2] and h['dominant_dim'] == [None, 4] and h['missing'] == []
    assert set(h['partial']) == set(trajectories.NEWER_KEYS)
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
    # the same model trained from scratch again into the same out_dir (train.py before it refused that)
    'second_scratch': ([start(init_from='scratch'), ev(0, dict(h=stats([1.0, 2.0]))), start(init_from='scratch')],
                       "line 3: a second run was started from scratch into this log (its start event says init_from "
                       "'scratch'; a resumed run's says 'resume'), after the one that started at line 1; the lines "
                       "from 3 on are the later run"),
    # a cut line, then a resumed run's start record appended to it (train.py before it set cut lines aside)
    'joined': ([start(), ev(0, dict(h=stats([1.0, 2.0]))), '{"event": "eval", "it' + json.dumps(start(it=0)),
                ev(2, dict(h=stats([1.0, 2.0])))],
               "line 3 is not JSON (Expecting ':' delimiter, column 24): a record cut off by a killed run, with the "
               "next one appended to it"),
}


@pytest.mark.parametrize('case', sorted(BAD_LOGS))
def test_malformed_logs_are_one_line_errors(tmp_path, capsys, case, one_line_error):
    events, words = BAD_LOGS[case]
    folder = write_log(tmp_path / case, events)
    code, _, err = run_main(capsys, folder, '--out', tmp_path / 'o')
    assert code == 2
    one_line_error(err, 'probe.py', os.path.join(folder, 'log.jsonl'), words)
    assert not (tmp_path / 'o').exists()                  # nothing written


def test_a_cut_last_line_is_left_out_and_said(tmp_path, capsys):
    """Only the last line, and only without a newline after it (a run killed while writing it, or
    one still writing): the reader leaves it out. Garbage elsewhere stays an error (BAD_LOGS)."""
    events = [start(), ev(0, dict(h=stats([1.0, 2.0]))), ev(2, dict(h=stats([1.0, 3.0])))]
    folder = write_log(tmp_path / 'run', events)
    with open(os.path.join(folder, 'log.jsonl'), 'a') as f:
        f.write('{"event": "eval", "iter": 4, "stats": {"h": {"top1_med')
    got, cut = trajectories.read_log(os.path.join(folder, 'log.jsonl'))
    assert [line for line, _ in got] == [1, 2, 3] and cut == 4
    code, out, err = run_main(capsys, folder, '--out', tmp_path / 'o')
    assert code == 0, err
    assert 'line 4 of the log is cut off (a run killed while writing it, or still writing) and left out' in out
    run = json.loads((tmp_path / 'o' / 'trajectory.json').read_text())['runs'][0]
    assert run['iters'] == [0, 2] and run['cut_line'] == 4
    with open(os.path.join(folder, 'log.jsonl'), 'a') as f:
        f.write('\n')                                                 # the same text, now a whole line
    code, _, err = run_main(capsys, folder, '--out', tmp_path / 'o')
    assert code == 2 and 'line 4 is not JSON' in err and 'only a cut-off last line is left out' in err


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


def test_group_names_may_name_a_variant(tmp_path):
    """results/mitigations names groups residual+fix; names stay free of spaces, '=' and ','."""
    a, b, c = tmp_path / 'a.pt', tmp_path / 'b.pt', tmp_path / 'c.pt'
    for f in (a, b, c):
        f.write_bytes(b'x')
    assert probe.parse_groups([f'vanilla+relu={a},{b}', f'ledger-1.v2={c}']) == \
        {'vanilla+relu': [str(a), str(b)], 'ledger-1.v2': [str(c)]}
    for bad in [f'a b={a}', f'a,b={a}', f'={a}', 'a/b=x.pt']:
        with pytest.raises(ValueError, match='expected NAME=CKPT'):
            probe.parse_groups([bad])


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


def test_welch_interval_and_p_match_scipy_with_b_minus_a():
    # by hand: d = 3, s_a = s_b = 1, se = sqrt(1/3 + 1/3), df = (2/3)^2 / (2 (1/3)^2 / 2) = 4,
    # t_{4, 0.975} = 2.776445, t = 3 / se = 3.674235, two-sided p = 0.0213116
    ci, p, df = groups.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    half = 2.776445 * math.sqrt(2 / 3)
    assert df == pytest.approx(4.0) and ci == pytest.approx([3 - half, 3 + half], abs=1e-5)
    assert p == pytest.approx(0.0213116, abs=1e-6)
    ci_swapped, p_swapped, _ = groups.welch([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])     # d = mean(b) - mean(a): sign flips
    assert ci_swapped == pytest.approx([-ci[1], -ci[0]]) and p_swapped == pytest.approx(p)
    # unequal sizes and variances: exactly scipy's Welch test of b against a
    from scipy import stats
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 4), rng.normal(2, 3, 6)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci, p, df = groups.welch(a, b)
    assert ci == list(ref.confidence_interval(0.95)) and p == ref.pvalue and df == ref.df
    pair = groups.compare(a, b, 'A', 'B')          # the raw scale: the difference of means and Welch's interval
    assert (pair['a'], pair['b'], pair['n_a'], pair['n_b'], pair['scale']) == ('A', 'B', 4, 6, 'raw')
    assert pair['estimate'] == pytest.approx(b.mean() - a.mean()) and pair['ci'] == pytest.approx(ci)
    assert pair['ci'][0] < pair['estimate'] < pair['ci'][1]
    pos_a, pos_b = np.exp(a), np.exp(b)             # the log scale: the same numbers as ratios of geometric means
    logged = groups.compare(pos_a, pos_b, 'A', 'B', 'log')
    assert logged['estimate'] == pytest.approx(math.exp(b.mean() - a.mean()))
    assert logged['ci'] == pytest.approx([math.exp(c) for c in ci]) and logged['p_perm'] == pair['p_perm']


def test_permutation_p_is_the_share_of_splits_with_abs_d_at_least_the_observed():
    assert groups.permutation_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == (0.1, 'exact: 20 splits (all)', 0.1)
    assert groups.permutation_p([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])[0] == 0.1
    # by hand: pooled 1, 2, 3, 4, 10, two runs in a; of the 10 splits, {1,2} (the observed, |d| = 4.17),
    # {3,10} (4.17) and {4,10} (5) have |d| >= 4.17: p = 3/10. scipy's own 'two-sided' doubles the
    # one-sided p (d >= 4.17: 1/10) and gives 0.2, which is not this definition.
    assert groups.permutation_p([1.0, 2.0], [3.0, 4.0, 10.0]) == (pytest.approx(0.3), 'exact: 10 splits (all)', 0.1)
    from scipy import stats
    assert stats.permutation_test(([1.0, 2.0], [3.0, 4.0, 10.0]), lambda x, y: np.mean(y) - np.mean(x),
                                  n_resamples=np.inf).pvalue == pytest.approx(0.2)
    # against an enumeration of every split
    import itertools
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, 4), rng.normal(1, 1, 5)
    pooled, obs = np.concatenate([a, b]), abs(b.mean() - a.mean())
    ds = [abs(np.delete(pooled, idx).mean() - pooled[list(idx)].mean()) for idx in itertools.combinations(range(9), 4)]
    assert groups.permutation_p(a, b)[0] == pytest.approx(np.mean(np.array(ds) >= obs - 1e-12))
    same = [1.0, 2.0, 3.0]
    assert groups.permutation_p(same, same)[0] == 1.0
    assert groups.permutation_p([0.3, 0.1, 0.2], [0.1 + 0.2, 0.2, 0.1])[0] == 1.0     # equal up to rounding
    # 7 + 7 runs: 3432 splits, enumerated; with at most 10,000 splits enumerated, 8 + 8 (12,870) takes 10,000
    # random permutations, seeded; by default (MAX_EXACT 200,000) 10 + 10 (184,756) is enumerated
    assert groups.permutation_p(np.arange(7.0), np.arange(7.0) + 100) == (2 / 3432, 'exact: 3,432 splits (all)', 2 / 3432)
    p, test, p_min = groups.permutation_p(np.arange(8.0), np.arange(8.0) + 100, max_exact=10_000)
    assert test == 'random: 10,000 random permutations' and p_min == 1 / 10_001 and 1 / 10_001 <= p < 0.001
    assert groups.permutation_p(np.arange(8.0), np.arange(8.0) + 100, max_exact=10_000)[0] == p   # fixed seed
    assert groups.permutation_p(np.arange(8.0), np.arange(8.0), max_exact=10_000)[0] == 1.0
    assert groups.MAX_EXACT >= 184_756
    assert groups.permutation_p([1.0, 2.0, 3.0], [10.0, 11.0, 12.0], max_exact=19)[1] == 'random: 10,000 random permutations'


def test_holm_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.06
    assert groups.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert groups.holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]   # m = 2
    assert groups.holm([0.5, 0.6]) == [1.0, 1.0]                                                 # capped at 1
    assert groups.holm([None]) == [None] and groups.holm([]) == []


def test_hedges_g_by_hand():
    # s_pooled = 1, d = 3, factor 1 - 3 / (4 * 6 - 9) = 0.8
    assert groups.hedges_g([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(2.4)
    assert groups.hedges_g([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(-2.4)
    # s_a^2 = 5/3, s_b^2 = 13, s_pooled^2 = (3 * 5/3 + 2 * 13) / 5 = 6.2, d = 5 - 2.5, factor 1 - 3/19
    assert groups.hedges_g([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 9.0]) == pytest.approx(2.5 / math.sqrt(6.2) * 16 / 19)
    assert groups.hedges_g([1.0], [2.0, 3.0]) is None and groups.hedges_g([1.0, 1.0], [2.0, 2.0]) is None


def test_few_runs_and_no_spread():
    two = groups.compare([1.0, 2.0], [3.0, 4.0, 5.0], 'A', 'B')
    assert two['ci'] is not None and 'weak' in two['note'] and '2 runs in A' in two['note']
    one = groups.compare([1.0], [2.0, 3.0, 4.0], 'A', 'B')
    assert one['estimate'] == 2.0 and 'one run in A: no interval exists' in one['note']
    assert all(one[k] is None for k in ('ci', 'p_perm', 'hedges_g'))
    three = groups.compare([1.0, 2.0, 3.0], [3.0, 4.0, 6.0])
    assert three['note'] is None
    flat = groups.compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert flat['estimate'] == 0.0 and flat['ci'] is None and flat['p_perm'] == 1.0 and 'undefined' in flat['note']
    shifted = groups.compare([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], scale='log')
    assert shifted['estimate'] == 2.0 and shifted['ci'] is None and shifted['p_perm'] == 0.1 and shifted['hedges_g'] is None
    one_flat = groups.compare([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])       # one group without spread: Welch is defined
    half = 4.302653 / math.sqrt(3)          # se = sqrt(1/3 + 0), df 2, t_{2, 0.975} = 4.302653
    assert one_flat['ci'] == pytest.approx([2 - half, 2 + half], abs=1e-5) and one_flat['note'] is None
    zeros = groups.compare([0.0, 1.0, 2.0], [3.0, 4.0, 5.0], scale='log')    # the log scale takes positive values only
    assert zeros['n_a'] == 2
    results = [fake_result(f'x{i}', 5.0, 3.0) for i in range(6)]
    g = groups.group_statistics(results, dict(a=['x0', 'x1', 'x2'], b=['x3', 'x4', 'x5']))
    assert all(st['pairs'][0]['ci'] is None for st in g['metrics'].values())
    text = groups.groups_text(g)
    assert not re.search(r'\bnan\b', text) and 'undefined' in text
    json.dumps(g, allow_nan=False)


def fake_result(name, ratio, loss, stream='h'):
    sm = dict(outlier_ratio=ratio, start_mass_last=0.1, start_mass=0.1, start_mass_dominant=0.5, bos_concentration=2.0,
              persistence=1.0)
    return dict(name=name, residual=dict(decoded=stream), attention=dict(sink1_prefix=50.0), val_loss=loss,
                streams={stream: dict(summary=sm, per_sublayer=dict(n_massive=[0, 0]))})


def test_group_statistics_on_constructed_values():
    results = [fake_result('v1', 10.0, 3.0), fake_result('v2', 11.0, 3.1), fake_result('v3', 12.0, 3.2),
               fake_result('l1', 100.0, 3.0, 'C'), fake_result('l2', 110.0, 3.1, 'C'),
               fake_result('l3', 120.0, 3.2, 'C'), fake_result('solo', 50.0, 3.0)]
    results[4]['val_loss'] = 3.4                     # ledger val_loss: 3.0, 3.4, 3.2
    g = groups.group_statistics(results, dict(vanilla=['v1', 'v2', 'v3'], ledger=['l1', 'l2', 'l3'], one=['solo']))
    assert g['names'] == ['vanilla', 'ledger', 'one']
    assert g['methods']['level'] == 0.95 and g['methods']['permutation']['max_exact'] == 200_000
    m = g['metrics']['[decoded] outlier_ratio']
    assert m['scale'] == 'log' and g['methods']['scales']['val_loss'] == 'raw'
    vanilla = m['per_group']['vanilla']
    assert (vanilla['n'], vanilla['values'], vanilla['mean'], vanilla['std']) == (3, [10.0, 11.0, 12.0], 11.0, 1.0)
    assert vanilla['geomean'] == pytest.approx((10 * 11 * 12) ** (1 / 3))
    pair = m['pairs'][0]                             # ledger / vanilla: exactly 10x in every run
    assert (pair['a'], pair['b'], pair['p_perm']) == ('vanilla', 'ledger', 0.1)
    assert pair['estimate'] == pytest.approx(10.0) and pair['test'] == 'exact: 20 splits (all)'
    logs = np.log([10.0, 11.0, 12.0])
    assert pair['ci'] == pytest.approx([math.exp(c) for c in groups.welch(logs, logs + math.log(10))[0]])
    assert pair['hedges_g'] == pytest.approx(groups.hedges_g(logs, logs + math.log(10)))
    loss = g['metrics']['val_loss']['pairs'][0]
    assert loss['estimate'] == pytest.approx(0.1) and loss['p_perm'] == pytest.approx(0.7)   # 14 of 20 splits
    # Holm over the metrics of ledger vs vanilla that have a p (all of them: the ones without spread get 1.0)
    prs = [st['pairs'][0] for st in g['metrics'].values()]
    got = [pr['p_perm'] for pr in prs if pr['p_perm'] is not None]
    assert pair['p_perm_holm'] == pytest.approx(min(1, len(got) * 0.1))
    solo = m['per_group']['one']
    assert solo['std'] is None and solo['mean'] == 50.0 and 'no interval' in solo['note']
    vs_one = [p for p in m['pairs'] if p['b'] == 'one']
    assert all(p['ci'] is None and p['p_perm'] is None and 'no interval exists' in p['note'] for p in vs_one)
    assert '[D] outlier_ratio' not in g['metrics']                # no group measured it
    text = groups.groups_text(g)
    assert '11 +- 1' not in text and '10.97 x/' in text and '50 (one run)' in text
    assert '=== ledger against vanilla (exploration) ===' in text and '10x [' in text
    assert 'exact: 20 splits (all), smallest possible p 0.1' in text and 'one run in one: no interval exists' in text
    json.dumps(g, allow_nan=False)


def test_groups_from_the_command_line(trained, tmp_path, capsys):
    snaps = trained / 'snapshots'
    out = tmp_path / 'out'
    code, text, err = run_main(capsys, '--group', f"early={snaps / 'ckpt_000000.pt'},{snaps / 'ckpt_000002.pt'}",
                               '--group', f"late={snaps / 'ckpt_000004.pt'}", '--out', out, '--num_seqs', 2)
    assert code == 0, err
    data = json.loads((out / 'probe.json').read_text())
    check_keys(data['groups'], dict(documented_keys('probe.json'))['groups'], 'probe.json.groups')
    g = data['groups']
    assert g['members'] == dict(early=['tiny_i000000', 'tiny_i000002'], late=['tiny_i000004'])
    losses = [c['val_loss'] for c in data['checkpoints']]
    v = g['metrics']['val_loss']
    assert v['per_group']['early']['mean'] == pytest.approx(np.mean(losses[:2]))
    assert v['per_group']['early']['std'] == pytest.approx(np.std(losses[:2], ddof=1))
    assert v['pairs'][0]['estimate'] == pytest.approx(losses[2] - np.mean(losses[:2]))
    assert v['pairs'][0]['ci'] is None and v['pairs'][0]['p_perm'] is None and v['pairs'][0]['test'] is None
    assert 'one run in late: no interval exists' in v['pairs'][0]['note'] and '2 runs in early' in v['pairs'][0]['note']
    assert 'weak' in v['per_group']['early']['note']
    assert '=== groups: mean +- sample std over runs' in text and '(one run)' in text
    assert 'note: fewer than 3 runs in early (2 runs), late (1 run)' in text
    assert (out / 'groups.png').stat().st_size > 1000
    assert not any(f.endswith('_layerwise.png') for f in os.listdir(out))     # per-checkpoint PNGs skipped


def test_many_snapshots_stay_readable(tmp_path):
    """20 snapshots: the comparison table is cut into blocks that fit 160 characters, and the overlay
    colours the lines by iter with a colour bar instead of a 20-line legend."""
    names = [f'run_i{100 * i:06d}' for i in range(20)]
    comp = dict(columns=names, rows=[['iter', list(range(0, 2000, 100))], ['residual', ['ledger'] * 20]])
    text = report.comparison_text(comp)
    assert max(len(line) for line in text.splitlines()) <= 160
    assert all(n in text for n in names) and '(20 checkpoints,' in text
    results = [dict(name=n, iter_num=100 * i, residual=dict(decoded='C'), streams=dict(C=dict(per_sublayer=dict(
        top1_median=[1.0 + i, 2.0, 3.0, 4.0], top1=[0.1, 0.2, 0.3, 0.4 + i])))) for i, n in enumerate(names)]
    from lab import plots
    [path] = plots.plot_overlay(results, str(tmp_path))
    assert os.path.getsize(path) > 1000
