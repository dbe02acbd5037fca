"""One way to fail, for every command line tool: bad input is one line on stderr, '<tool>: error:
...', exit code 2, and nothing is left behind (no file, no empty folder). A failure that waiting
cannot heal (no such host, connection refused, HTTP 404) is not retried and says how to work
offline. Each case runs the script as a user would, in a subprocess, offline.
"""
import os
import socket

import pytest

from http_server import FileServer


def listing(folder):
    """Every path under folder (files and folders), relative to it."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        out |= {os.path.relpath(os.path.join(dirpath, n), folder) for n in dirnames + filenames}
    return out


@pytest.fixture(scope='module')
def refused():
    """A URL on 127.0.0.1 where nothing listens: the port of a socket bound, then closed."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}'


OFFLINE_PREPARE = 'Without network: train on an offline corpus (python train.py --dataset=builtin'
OFFLINE_GPT2 = 'Without network: put config.json and model.safetensors of openai-community/gpt2'

# (script, arguments, words the one line holds); {tmp} is the test's folder, {refused} a dead port
CASES = {
    'prepare-argparse': ('prepare.py', ['--shards', 'many'], ["argument --shards: invalid int value: 'many'"]),
    'prepare-no-input': ('prepare.py', ['--dataset=text', '--input', '{tmp}/nothing', '--data_root', '{tmp}/data'],
                         ['--input {tmp}/nothing: no such file or folder']),
    'prepare-empty-text': ('prepare.py', ['--dataset=text', '--input', '{tmp}/empty.txt', '--data_root', '{tmp}/data'],
                           ['no readable text landed in the train split of text']),
    'prepare-dns': ('prepare.py', ['--base_url', 'http://nonexistent.invalid', '--data_root', '{tmp}/data'],
                    ['cannot resolve the host name nonexistent.invalid', 'not retried', OFFLINE_PREPARE]),
    'prepare-refused': ('prepare.py', ['--base_url', '{refused}', '--data_root', '{tmp}/data'],
                        ['cannot connect to', 'Connection refused', 'not retried', OFFLINE_PREPARE]),
    'probe-argparse': ('probe.py', ['{tmp}/m.pt', '--num_seqs', '0'], ['--num_seqs must be >= 1']),
    'probe-gpt2-dns': ('probe.py', ['gpt2', '--base_url', 'http://nonexistent.invalid', '--data_root', '{tmp}/data',
                                    '--out', '{tmp}/probe_out'],
                       ['cannot resolve the host name nonexistent.invalid', 'not retried', OFFLINE_GPT2]),
    'train-out-dir-is-a-file': ('train.py', ['--out_dir={tmp}/empty.txt'], ['is a file, not a folder']),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, cli, root, one_line_error, refused):
    script, args, words = CASES[case]
    (tmp_path / 'empty.txt').write_text('')
    fill = lambda text: text.format(tmp=tmp_path, refused=refused)
    before, root_before = listing(tmp_path), set(os.listdir(root))
    r = cli(script, *map(fill, args), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    one_line_error(r.stderr, script, *map(fill, words))
    assert listing(tmp_path) == before                  # no data/, no data/gpt2/gpt2/, no probe_out/
    assert set(os.listdir(root)) == root_before         # nor in the folder the tool ran in


def test_a_404_is_not_retried_and_says_how_to_work_offline(tmp_path, cli, one_line_error):
    with FileServer({}) as server:
        r = cli('prepare.py', '--base_url', server.url, '--data_root', tmp_path / 'data')
        assert len(server.gets()) == 1
    assert r.returncode == 2
    one_line_error(r.stderr, 'prepare.py', 'HTTP 404', OFFLINE_PREPARE)
    assert not (tmp_path / 'data').exists()
