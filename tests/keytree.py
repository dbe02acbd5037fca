"""The key trees of the probe's output files (probe.json, trajectory.json) that docs/reference.md
§4.10 documents, parsed, and a check that an output has every documented key."""

import os

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'reference.md')


def documented_keys(what, path=REFERENCE):
    """[(key, children)] of the first indented block after the line '#### <what>' in docs/reference.md."""
    with open(path, encoding='utf-8') as f:
        after = f.read().split('\n')
    after = after[after.index(f'#### {what}') + 1:]
    lines = []
    for line in after:
        if line.startswith('    ') and line.strip():
            lines.append(line)
        elif lines:   # the first line that is not indented ends the block
            break
    root = []
    stack = [(-1, root)]
    for line in lines:
        indent = len(line) - len(line.lstrip())
        node = (line.split()[0], [])
        while stack[-1][0] >= indent:
            stack.pop()
        stack[-1][1].append(node)
        stack.append((indent, node[1]))
    return root


def check_keys(obj, nodes, where):
    """Every documented key is in obj; '<name>' stands for each key of a non-empty dict, 'name[]'
    for a non-empty list whose items have the children; a documented dict may be None."""
    for key, children in nodes:
        if key.startswith('<'):
            assert isinstance(obj, dict) and obj, f"{where}: expected a non-empty dict"
            for k, v in obj.items():
                check_keys(v, children, f"{where}.{k}")
            continue
        name = key.rstrip('[]')
        assert isinstance(obj, dict) and name in obj, f"{where}: missing {name}"
        if key.endswith('[]'):
            assert obj[name], f"{where}.{name}: empty list"
            for i, item in enumerate(obj[name]):
                check_keys(item, children, f"{where}.{name}[{i}]")
        elif children and obj[name] is not None:
            check_keys(obj[name], children, f"{where}.{name}")
