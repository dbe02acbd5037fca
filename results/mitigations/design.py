"""The mitigations study's design, declared before its runs (2026-12-07; docs/reference.md §5).

The paper's question, asked of the published fixes that let an attention head do nothing
(docs/reference.md §1.6; each a key of lab.weightings.ATTENTION_VARIANTS): the ledger's C carries a
start-token concentration (results/trigger, Q1). If that concentration is how the ledger implements
"do nothing", a fix that gives every head another way to do nothing should take it away; if C
rebuilds it anyway, it is not (only) a sink.

  Q1-Q3  Does C's share of its mass on the start token change when the ledger's attention has a
         learnt bias slot (attn_bias, Sun et al. 2024), unnormalised sigmoid weights (sigmoid, Gu et
         al. 2025), or a sigmoid gate on each head's output (gate_elementwise, Qiu et al. 2025)?
         One fix per way of doing nothing (a slot to attend to, rows that need not sum to one, an
         output that can be switched off), each from the paper this lab follows for it.

Primary endpoint of each (PRIMARY): C's start_mass at the last sublayer (what the head reads), on
the log scale (ratio of geometric means), the ledger with the fix against the plain ledger: 10 seeds
each, the plain ledger's 10 being results/trigger's. The family is the three: exact two-sided
permutation p (every split of 10 + 10 runs), Holm across the three; "shown" only at an adjusted p
below 0.05. Power at 10 vs 10 with m = 3: 37 %, 75 % and 96 % for normal shifts of 1.0, 1.5 and 2.0
standard deviations (noncentral t approximation).

Exploration (EXPLORE, 3 seeds each, never "shown", estimates only): vanilla with the three primary
fixes against the plain vanilla of results/trigger (does the fix remove vanilla's conditional sink
here, the check that it is a working way to do nothing, and what it does to the task), and the
ledger with relu (Ran-Milo 2026), registers (Darcet et al. 2024) and softpick.

Budget (the issue's: at most 3 hours on 2 cores): 30 primary ledger runs (~7.5 min each, two at a
time) and 18 exploratory ones come to ~2.8 hours. Revised on 2026-12-07 before any run of this
study had been trained, to fit that budget: the first declaration had five primaries at 10 seeds
and eleven fixes in the exploration (~6 hours). The fixes left out (plus_one, clipped, sink_logit;
relu and registers as primaries) were dropped for cost, chosen by mechanism, not by any result.

    python results/mitigations/design.py      # the training runs it declares, one per line (run.sh reads them)
    python results/mitigations/design.py --groups out/mitigations out/trigger   # probe.py's --group arguments
"""

SEEDS = range(1, 11)
EXPLORE_SEEDS = range(1, 4)
PROBE = dict(num_seqs=256)
ALPHA = 0.05
BASE = {'vanilla': 'config/trigger_vanilla.py', 'ledger': 'config/trigger_ledger.py'}   # trained by results/trigger

PRIMARY_FIXES = ['attn_bias', 'sigmoid', 'gate_elementwise']
PRIMARY = [(f'Q{i + 1}', '[C] start_mass_last', 'log', 'ledger', f'ledger+{fix}')
           for i, fix in enumerate(PRIMARY_FIXES)]

QUESTIONS = {f'Q{i + 1}': f"the ledger's C changes its start-token share with {fix}"   # wording only
             for i, fix in enumerate(PRIMARY_FIXES)}

EXPLORE = [('vanilla', fix) for fix in PRIMARY_FIXES] + [('ledger', fix) for fix in ('relu', 'registers', 'softpick')]


# every fix against the plain model of its residual: the estimates findings.md lists after the primaries
SECONDARY_PAIRS = [(r, f'{r}+{fix}') for r, fix in [('ledger', fix) for fix in PRIMARY_FIXES] + EXPLORE]


def runs():
    """(group, seed, out folder name, config file, fix) of every training run this study adds, seed by
    seed (a study cut short has the same number of runs in every group), the primaries first."""
    out = [(f'ledger+{fix}', s, f'ledger_{fix}_s{s}', BASE['ledger'], fix) for s in SEEDS for fix in PRIMARY_FIXES]
    out += [(f'{r}+{fix}', s, f'{r}_{fix}_s{s}', BASE[r], fix) for s in EXPLORE_SEEDS for r, fix in EXPLORE]
    return out


def groups(out, base):
    """{group: [its checkpoints]}: the plain vanilla and ledger runs of results/trigger (in base), then
    every group this study trains (in out)."""
    found = {r: [f'{base}/{r}_s{s}/ckpt.pt' for s in SEEDS] for r in BASE}
    for g, s, name, _, _ in runs():
        found.setdefault(g, []).append(f'{out}/{name}/ckpt.pt')
    return found


if __name__ == '__main__':
    import os
    import sys
    if sys.argv[1:2] == ['--groups']:
        for g, paths in groups(*sys.argv[2:4]).items():
            print('--group', f"{g}={','.join(paths)}")
        sys.exit()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
    from lab.weightings import ATTENTION_VARIANTS
    for g, s, name, cfg, fix in runs():
        print(name, cfg, ' '.join(f'--{k}={v}' for k, v in ATTENTION_VARIANTS[fix].items()), f'--seed={s}')
