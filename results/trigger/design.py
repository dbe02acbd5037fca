"""The trigger study's design, declared before its runs (2026-12-07; docs/reference.md §5).

What it asks, on the trigger testbed (docs/reference.md §3.5: a language on which a softmax head
needs a sink to do nothing), with the paper's four models and a vanilla model of the ledger's size:

  Q1  Does the stream the head reads carry more of its mass on the start token in the ledger (C)
      than in vanilla (h)?  The paper: massive activations come back inside C, on the start token.
  Q2  Is the decoded stream's outlier ratio larger in the ledger's C than in vanilla's h?
      The paper: C holds the massive activations.
  Q3  Does heavy commit sparsity (alpha 0.3) raise C's outlier ratio over the ledger's (alpha 0.02)?
      The paper: the penalty makes them stronger.
  Q4  Does QK-norm ('suppress') lower h's outlier ratio?  The paper's suppression baseline.
  Q5  Does the ledger have a smaller conditional sink than vanilla?  (The testbed's signature: a
      head that puts the ordinary queries' attention on BOS and the trigger queries' elsewhere.)
  Q6  Does the ledger solve the task better than a vanilla model with its parameter count?
      (Against capacity: vanilla_wide has 98.8 % of the ledger's parameters and ~its FLOPs.)

One primary endpoint per question (PRIMARY): the metric (its name in probe.json's groups, computed by
the probe: docs/reference.md §4-5), the scale it is analysed on ('log' for positive, heavy-tailed
metrics: ratios of geometric means; 'raw' for bounded ones: differences of means) and the two groups.
The family is all six: exact two-sided permutation p of each (every split of 10 + 10 runs), Holm
across the six; "shown" only at an adjusted p below 0.05. Every other metric the probe compares is
secondary: an estimate with its interval, never "shown". The runs, the probe settings and this file
are fixed before any run of the study is looked at; nothing here is tuned afterwards.

Power: at 10 vs 10 the smallest exact p is 2/184,756; Holm's first step needs p < 0.05/6. For a
normal shift of 1.0, 1.5 and 2.0 within-group standard deviations that happens 27 %, 65 % and 92 %
of the time (the noncentral t approximation of the permutation test; the analysis prints it again
next to the results).

    python results/trigger/design.py          # the training runs it declares, one per line (run.sh reads them)
    python results/trigger/design.py --groups out/trigger   # probe.py's --group arguments for those runs
"""

SEEDS = range(1, 11)
PROBE = dict(num_seqs=256)        # every run is probed on the same 256 validation documents
ALPHA = 0.05

GROUPS = {   # name -> the config file that trains one run of it (the seed is added)
    'vanilla': 'config/trigger_vanilla.py',
    'suppress': 'config/trigger_suppress.py',
    'vanilla_wide': 'config/trigger_vanilla_wide.py',
    'ledger': 'config/trigger_ledger.py',
    'ledger_hs': 'config/trigger_ledger_hs.py',
}

PRIMARY = [  # question, metric, scale, group A, group B: the estimate is B against A
    ('Q1', '[decoded] start_mass_last', 'log', 'vanilla', 'ledger'),
    ('Q2', '[decoded] outlier_ratio', 'log', 'vanilla', 'ledger'),
    ('Q3', '[C] outlier_ratio', 'log', 'ledger', 'ledger_hs'),
    ('Q4', '[h] outlier_ratio', 'log', 'vanilla', 'suppress'),
    ('Q5', 'cond_sink_gap', 'raw', 'vanilla', 'ledger'),
    ('Q6', 'task_acc', 'raw', 'vanilla_wide', 'ledger'),
]

QUESTIONS = {   # the questions above, as findings.md names them (wording only; the tests are PRIMARY's)
    'Q1': "C carries more mass on the start token than h",
    'Q2': "the decoded stream's outlier ratio is larger in C than in h",
    'Q3': "heavy sparsity raises C's outlier ratio",
    'Q4': "QK-norm lowers h's outlier ratio",
    'Q5': "the ledger has a smaller conditional sink than vanilla",
    'Q6': "the ledger solves the task better than a vanilla of its size",
}

SECONDARY_PAIRS = [('vanilla', 'ledger'), ('vanilla', 'suppress'), ('ledger', 'ledger_hs'),
                   ('vanilla_wide', 'ledger'), ('vanilla', 'vanilla_wide')]


def runs():
    """(group, seed, out folder name, config file) of every training run, seed by seed (so that a
    study cut short has the same number of runs in every group)."""
    return [(g, s, f'{g}_s{s}', cfg) for s in SEEDS for g, cfg in GROUPS.items()]


if __name__ == '__main__':
    import sys
    if sys.argv[1:2] == ['--groups']:
        for g in GROUPS:
            print('--group', f"{g}=" + ','.join(f'{sys.argv[2]}/{name}/ckpt.pt' for g_, _, name, _ in runs() if g_ == g))
    else:
        for g, s, name, cfg in runs():
            print(name, cfg, f'--seed={s}')
