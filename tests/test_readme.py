"""The README's results say no more than the committed results: every number in its '## Results'
sections appears in a study's generated summary (findings.md, table.md, times.txt, measures.txt: what
results/study.py and the run.sh scripts regenerate), its design or, for a setting, config/; and every
verdict word there is findings.md's."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a results section may quote: a study's generated summaries, its design and times, the presets;
# not the per-checkpoint dumps (groups.txt, trajectory.txt), which hold nearly every short number
SOURCES = ('results/*/findings.md', 'results/*/table.md', 'results/*/times.txt', 'results/*/measures.txt',
           'results/*/design.py', 'config/*.py')
NUMBER = re.compile(r'(?<![\w.§/])\d[\d,]*(?:\.\d+)?(?![\w/])')


def results_sections():
    text = open(os.path.join(ROOT, 'README.md')).read()
    parts = re.split(r'(?m)^## ', text)
    return {p.split('\n', 1)[0]: p for p in parts if p.startswith('Results')}


def numbers(text):
    text = re.sub(r'(?<=\d)x\b', ' x', text)      # a ratio '5.89x' is the number 5.89
    return {n.replace(',', '').rstrip('.') for n in NUMBER.findall(text)}


def test_the_readme_has_its_results_sections():
    assert len(results_sections()) >= 2


@pytest.mark.parametrize('title', sorted(results_sections()))
def test_every_number_in_a_results_section_is_in_a_committed_results_file(title):
    sources = [p for pattern in SOURCES for p in glob.glob(os.path.join(ROOT, pattern))]
    known = set()
    for path in sources:
        known |= numbers(open(path, errors='replace').read())
    section = results_sections()[title]
    section = re.sub(r'\[[^\]]*\]\([^)]*\)', '', section)          # link targets and image paths are not results
    section = re.sub(r'`[^`]*`', '', section)                        # nor are file names and commands
    missing = sorted(numbers(section) - known, key=float)
    assert not missing, f"{title}: numbers that no committed results file holds: {missing}"


def test_shown_is_said_only_where_findings_say_it():
    """'shown' in the README's results is a verdict: each sentence that says a primary is shown names
    a question whose findings.md verdict is shown."""
    verdicts = {}
    for path in glob.glob(os.path.join(ROOT, 'results', '*', 'findings.md')):
        study = os.path.basename(os.path.dirname(path))
        for line in open(path):
            m = re.match(r'\| (Q\d+) \|.*\*\*(shown[^*]*|not shown)\*\*', line)
            if m:
                verdicts[(study, m.group(1))] = m.group(2)
    assert verdicts
    said = 0
    for title, section in results_sections().items():
        study = 'mitigations' if 'fix' in title.lower() or 'mitigation' in title.lower() else 'trigger'
        for q, verdict in re.findall(r'\b(Q\d+)\b[^\n]*?\*\*(shown[^*]*|not shown)\*\*', section):
            assert verdicts.get((study, q)) == verdict, (title, q, verdict)
            said += 1
    assert said, "no verdict found in the README's results sections: the check above checked nothing"


def test_the_cpu_cost_in_the_usage_guide_is_the_committed_benchmark():
    """The ledger's CPU step ratios quoted in docs/usage.md (Benchmark) are those of results/bench/cpu.txt,
    which results/bench/run.sh regenerates: every decimal number of that paragraph is in the file."""
    text = open(os.path.join(ROOT, 'docs', 'usage.md')).read()
    start = text.index('What a ledger step costs on a CPU')
    paragraph = text[start:text.index('\n\n', start)]
    quoted = {n for n in numbers(paragraph) if '.' in n}
    assert len(quoted) >= 6                      # three shapes, each a time ratio and a FLOP ratio
    measured = numbers(open(os.path.join(ROOT, 'results', 'bench', 'cpu.txt')).read())
    assert quoted <= measured, f"numbers that results/bench/cpu.txt does not hold: {sorted(quoted - measured)}"


def test_the_quickstart_times_are_the_measured_ones():
    """Every time the README states as 'NmSSs' (the demo, the testbed line) is one that
    results/demo/run.sh measured into results/demo/times.txt."""
    readme = open(os.path.join(ROOT, 'README.md')).read()
    stated = set(re.findall(r'\b\d+m\d\ds\b', readme))
    assert len(stated) >= 2
    measured = set(re.findall(r'\b\d+m\d\ds\b', open(os.path.join(ROOT, 'results', 'demo', 'times.txt')).read()))
    assert stated <= measured, f"times the README states that results/demo/times.txt does not hold: {sorted(stated - measured)}"
