"""The key trees that probe.py and runs.py document in their docstrings (probe.json,
trajectory.json), parsed, and a check that an output has every documented key."""


def documented_keys(doc, what):
    """[(key, children)] of the indented block after '<what> (tests/...' in a docstring."""
    block = doc.split(f'{what} (tests/')[1]
    lines = [l for l in block.split('\n\n')[1].split('\n') if l.strip()]
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
