"""prepare.py's trigger language (--dataset=trigger): deterministic builds, the rules verified on
every document by a checker that shares nothing with the generator (and that can fail), the
statistics, one-line CLI errors, meta.json / dataset_meta, ensure_dataset, and doc-aligned
sampling at BOS. Offline, CPU, everything under tmp_path."""
import hashlib
import inspect
import json
import os

import numpy as np
import pytest
import torch

import prepare
from lab.data import (EOT, TRIGGER_DEFAULTS, TRIGGER_FLAGS, Sampler, build_trigger, check_trigger_rule, dataset_meta,
                      ensure_dataset, read_shard, shard_paths, write_shard)

SMALL = ['--trigger_docs', '3000', '--trigger_val_docs', '500']
META_KEYS = {'dataset', 'tokenizer', 'vocab_size', 'bos', 'trigger', 'content', 'trigger_p', 'seq_len', 'doc_len',
             'seed', 'train_docs', 'val_docs', 'train_tokens', 'val_tokens', 'doc_aligned', 'rule', 'files'}


def build(root, *argv):
    """Build through the CLI; the files of <root>/trigger as {name: bytes}."""
    assert prepare.main(['--dataset=trigger', '--data_root', str(root), *argv]) == 0
    folder = root / 'trigger'
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def split_tokens(root, split):
    return np.concatenate([read_shard(p) for p in shard_paths('trigger', split, str(root))])


@pytest.fixture(scope='module')
def default_root(tmp_path_factory):
    """A build with the default parameters (4.5M tokens, well under a second)."""
    root = tmp_path_factory.mktemp('data')
    build_trigger(str(root))
    return root

# -----------------------------------------------------------------------------
# builds

def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, capsys):
    a, b = build(tmp_path / 'a', *SMALL), build(tmp_path / 'b', *SMALL)
    assert sorted(a) == ['meta.json', 'trigger_train_000000.bin', 'trigger_val_000000.bin']
    assert a == b
    out = capsys.readouterr().out  # summary() works for trigger
    assert out.count('trigger: 2 files, 227,500 tokens (195,000 train, 32,500 val)') == 2
    c = build(tmp_path / 'c', *SMALL, '--trigger_seed', '1')
    for name in ('trigger_train_000000.bin', 'trigger_val_000000.bin'):
        assert len(c[name]) == len(a[name]) and c[name] != a[name]
    assert json.loads(c['meta.json'])['seed'] == 1
    train = split_tokens(tmp_path / 'a', 'train').reshape(-1, 65)[:500]
    val = split_tokens(tmp_path / 'a', 'val').reshape(-1, 65)
    assert (train != val).any(axis=1).all()  # val is another stream, not a copy of train's start


def test_first_documents_do_not_depend_on_how_many(tmp_path):
    few = build_trigger(str(tmp_path / 'few'), train_docs=10, val_docs=3)
    many = build_trigger(str(tmp_path / 'many'), train_docs=9000, val_docs=3)  # two streams of 8192
    assert few['train_tokens'] == 650 and many['train_tokens'] == 9000 * 65
    for split in ('train', 'val'):
        first = split_tokens(tmp_path / 'few', split)
        np.testing.assert_array_equal(split_tokens(tmp_path / 'many', split)[:len(first)], first)


def test_shards_hold_whole_documents_and_a_rebuild_replaces_them(tmp_path):
    root = str(tmp_path)
    meta = build_trigger(root, train_docs=1000, val_docs=30, shard_tokens=6500 + 64)  # 100 docs a shard
    train = shard_paths('trigger', 'train', root)
    assert len(train) == 10 and len(shard_paths('trigger', 'val', root)) == 1
    assert meta['files'] == [os.path.basename(p) for p in train] + ['trigger_val_000000.bin']
    for p in train:
        shard = read_shard(p)
        assert len(shard) == 6500 and (shard.reshape(-1, 65)[:, 0] == 0).all()
    assert check_trigger_rule(split_tokens(tmp_path, 'train'), meta)['docs'] == 1000
    sharded = split_tokens(tmp_path, 'train')
    build_trigger(root, train_docs=1000, val_docs=30)  # the same documents in one shard
    np.testing.assert_array_equal(split_tokens(tmp_path, 'train'), sharded)
    assert sorted(os.listdir(tmp_path / 'trigger')) == ['meta.json', 'trigger_train_000000.bin',
                                                        'trigger_val_000000.bin']  # old shards and temp gone
    build_trigger(root, vocab_size=10, train_docs=5, val_docs=5)
    assert dataset_meta('trigger', root)['vocab_size'] == 10 and len(split_tokens(tmp_path, 'train')) == 5 * 65

# -----------------------------------------------------------------------------
# the rules

@pytest.mark.parametrize('split', ['train', 'val'])
def test_rule_holds_on_every_document_of_the_default_build(default_root, split):
    meta = dataset_meta('trigger', str(default_root))
    got = check_trigger_rule(split_tokens(default_root, split), meta)
    assert got['docs'] == meta[f'{split}_docs']
    # ~3.6 triggers a document; a few fall on the last position and have no answer
    assert 3.4 < got['triggers'] / got['docs'] < 3.8 and 0.9 * got['triggers'] < got['answers'] < got['triggers']


@pytest.mark.parametrize('params', [
    dict(vocab_size=4, p=0.49, seq_len=2, train_docs=2000, val_docs=10),    # the smallest language
    dict(vocab_size=600, p=0.3, seq_len=100, train_docs=8000, val_docs=10),  # 7013-document streams
    dict(vocab_size=34, p=0.01, seq_len=300, seed=5, train_docs=500, val_docs=10),
], ids=['tiny', 'big-vocab', 'long'])
def test_rule_holds_for_other_parameters(tmp_path, params):
    meta = build_trigger(str(tmp_path), **params)
    for split in ('train', 'val'):
        tokens = split_tokens(tmp_path, split)
        assert check_trigger_rule(tokens, meta)['docs'] == params[f'{split}_docs']
        assert tokens.max() == params['vocab_size'] - 1 or params['vocab_size'] == 600


def corrupt_first_answer(tokens, meta, new):
    """Replace the first answer (symbol after a TRIGGER) by new(expected); return its position."""
    pos = np.flatnonzero(tokens[:-1] == meta['trigger'])
    pos = pos[(pos % meta['doc_len']) < meta['doc_len'] - 1][0] + 1
    tokens[pos] = new(int(tokens[pos]))
    return pos


@pytest.mark.parametrize('damage, message', [
    (lambda t, m: corrupt_first_answer(t, m, lambda a: 2 + (a - 2 + 1) % 32), 'after TRIGGER, expected'),
    (lambda t, m: corrupt_first_answer(t, m, lambda a: 1), 'two TRIGGERs in a row'),
    (lambda t, m: t.__setitem__(65 * 7 + 1, 1), 'document 7, position 1: TRIGGER before any content symbol'),
    (lambda t, m: t.__setitem__(65 * 3 + 30, 0), 'document 3, position 30: BOS inside a document'),
    (lambda t, m: t.__setitem__(65 * 2 + 5, 34), 'document 2, position 5: symbol 34 is neither TRIGGER nor content'),
    (lambda t, m: t.__setitem__(65 * 9, 5), 'document 9 starts with 5, not BOS 0'),
], ids=['wrong-answer', 'trigger-trigger', 'early-trigger', 'bos-inside', 'out-of-range', 'no-bos'])
def test_checker_fails_on_a_corrupted_copy(default_root, damage, message):
    meta = dataset_meta('trigger', str(default_root))
    tokens = np.array(split_tokens(default_root, 'val'))  # a writable copy
    check_trigger_rule(tokens, meta)
    pos = damage(tokens, meta)
    with pytest.raises(ValueError, match=message) as e:
        check_trigger_rule(tokens, meta)
    if pos is not None:
        assert f"document {pos // 65}, position {pos % 65}:" in str(e.value)
    with pytest.raises(ValueError, match='not a whole number of 65-token documents'):
        check_trigger_rule(split_tokens(default_root, 'val')[:-1], meta)


def test_checker_on_hand_written_documents():
    meta = {'bos': 0, 'trigger': 1, 'content': [2, 5], 'doc_len': 8}
    good = [
        [0, 4, 3, 1, 3, 4, 1, 3],  # tie 4/3 -> 3; the answer counts: then 3 and 4 tie again -> 3
        [0, 5, 5, 2, 1, 5, 2, 1],  # most frequent 5; a TRIGGER last has no answer
        [0, 2, 2, 2, 2, 2, 2, 2],
    ]
    assert check_trigger_rule(np.concatenate(good), meta) == {'docs': 3, 'triggers': 4, 'answers': 3}
    for doc, message in [
        ([0, 4, 3, 1, 4, 4, 1, 4], 'position 4: answer 4 after TRIGGER, expected 3'),  # largest id on the tie
        ([0, 4, 3, 1, 3, 4, 1, 4], 'position 7: answer 4 after TRIGGER, expected 3'),  # answer not counted
        ([0, 1, 3, 3, 3, 3, 3, 3], 'position 1: TRIGGER before any content symbol'),
        ([0, 2, 1, 1, 2, 2, 2, 2], 'position 3: two TRIGGERs in a row'),
        ([0, 2, 2, 2, 6, 2, 2, 2], 'position 4: symbol 6 is neither'),
    ]:
        with pytest.raises(ValueError, match=message):
            check_trigger_rule(good[0] + doc, meta)  # second document, after a good one
        with pytest.raises(ValueError, match='document 1, '):
            check_trigger_rule(good[0] + doc, meta)


def test_statistics(default_root):
    """Triggers come at rate p where allowed; other content is uniform; answers are not."""
    meta = dataset_meta('trigger', str(default_root))
    p, n_content = meta['trigger_p'], meta['vocab_size'] - 2
    docs = split_tokens(default_root, 'train').reshape(-1, meta['doc_len']).astype(np.int64)
    trig = docs == 1
    assert not trig[:, :2].any()  # BOS, then always a content symbol first
    # where a TRIGGER may come (position >= 2, not right after a TRIGGER) it comes with probability p
    allowed = np.zeros_like(trig)
    allowed[:, 2:] = ~trig[:, 1:-1]
    k, n = trig[allowed].sum(), allowed.sum()
    assert abs(k / n - p) < 4 * np.sqrt(p * (1 - p) / n), (k / n, p)
    # triggers per document: q_1 = 0, q_t = p (1 - q_{t-1}); documents are independent
    q, expected = 0.0, 0.0
    for _ in range(2, meta['doc_len']):
        q = p * (1 - q)
        expected += q
    per_doc = trig.sum(axis=1)
    assert abs(per_doc.mean() - expected) < 4 * per_doc.std() / np.sqrt(len(per_doc)), (per_doc.mean(), expected)
    # free content symbols (not answers) are uniform: chi-square with 31 degrees of freedom
    answer = np.zeros_like(trig)
    answer[:, 1:] = trig[:, :-1]
    free = docs[:, 1:][~trig[:, 1:] & ~answer[:, 1:]]
    counts = np.bincount(free - 2, minlength=n_content)
    chi2 = ((counts - len(free) / n_content) ** 2 / (len(free) / n_content)).sum()
    assert chi2 < 80, chi2  # P(chi2_31 > 80) ~ 3e-6
    # control: the same statistic on the answers is huge (ties go to small ids), so it can fail
    answers = np.bincount(docs[answer] - 2, minlength=n_content)
    assert ((answers - answers.mean()) ** 2 / answers.mean()).sum() > 1000
    assert answers.argmax() == 0

# -----------------------------------------------------------------------------
# command line and the Python API

@pytest.mark.parametrize('argv, message', [
    (['--trigger_vocab', '3'], '--trigger_vocab (vocab_size) must be at least 4'),
    (['--trigger_vocab', '65536'], 'below 65536'),
    (['--trigger_p', '0'], '--trigger_p (p) must be in (0, 0.5), got 0.0'),
    (['--trigger_p', '0.5'], '--trigger_p (p) must be in (0, 0.5), got 0.5'),
    (['--trigger_p', 'nan'], 'got nan'),
    (['--trigger_len', '1'], '--trigger_len (seq_len) must be at least 2'),
    (['--trigger_seed', '-1'], '--trigger_seed (seed) must be at least 0'),
    (['--trigger_docs', '0'], '--trigger_docs (train_docs) must be at least 1'),
    (['--trigger_val_docs', '0'], '--trigger_val_docs (val_docs) must be at least 1'),
    (['--trigger_len', 'x'], "argument --trigger_len: invalid int value: 'x'"),
    (['--dataset=builtin', '--trigger_p', '0.1'], '--trigger_p is only used with --dataset=trigger, not --dataset=builtin'),
    (['--dataset=text', '--input', '.', '--trigger_docs', '5'], '--trigger_docs is only used with --dataset=trigger'),
], ids=['vocab-small', 'vocab-big', 'p-zero', 'p-half', 'p-nan', 'len', 'seed', 'docs', 'val-docs', 'not-int',
        'builtin', 'text'])
def test_bad_parameters_one_line_and_nothing_written(tmp_path, capsys, argv, message):
    root = tmp_path / 'data'
    if not any(a.startswith('--dataset') for a in argv):
        argv = ['--dataset=trigger', *argv]
    with pytest.raises(SystemExit) as e:
        prepare.main([*argv, '--data_root', str(root)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('prepare.py: error: ') and err.count('\n') == 1 and message in err, err
    assert not root.exists()


def test_python_and_cli_defaults_agree():
    defaults = {k: v.default for k, v in inspect.signature(build_trigger).parameters.items()}
    assert {k: defaults[k] for k in TRIGGER_DEFAULTS} == TRIGGER_DEFAULTS
    assert set(TRIGGER_DEFAULTS) == set(TRIGGER_FLAGS)


def test_build_trigger_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match=r'--trigger_p \(p\) must be in \(0, 0.5\), got 0.7'):
        build_trigger(str(tmp_path / 'data'), p=0.7)
    assert not (tmp_path / 'data').exists()


def test_dataset_meta(tmp_path):
    root = str(tmp_path)
    built = build_trigger(root, vocab_size=10, p=0.1, seq_len=20, seed=7, train_docs=100, val_docs=20)
    meta = dataset_meta('trigger', root)
    assert meta == built == json.loads((tmp_path / 'trigger' / 'meta.json').read_text())
    assert set(meta) == META_KEYS
    assert {k: meta[k] for k in META_KEYS - {'rule', 'files'}} == {
        'dataset': 'trigger', 'tokenizer': 'trigger', 'vocab_size': 10, 'bos': 0, 'trigger': 1, 'content': [2, 9],
        'trigger_p': 0.1, 'seq_len': 20, 'doc_len': 21, 'seed': 7, 'train_docs': 100, 'val_docs': 20,
        'train_tokens': 2100, 'val_tokens': 420, 'doc_aligned': True}
    assert 'content 2..9' in meta['rule'] and 'probability 0.1' in meta['rule']
    assert len(split_tokens(tmp_path, 'train')) == meta['train_tokens']
    # a FineWeb download has shards but no meta.json; nothing prepared at all: None too
    os.makedirs(tmp_path / 'finewebedu10B')
    write_shard(str(tmp_path / 'finewebedu10B' / 'finewebedu_val_000000.bin'), [EOT, 1, 2])
    assert dataset_meta('finewebedu10B', root) is None and dataset_meta('builtin', root) is None
    # a GPT-2 build from before vocab_size/bos/doc_aligned were recorded gets GPT-2's
    os.makedirs(tmp_path / 'text')
    (tmp_path / 'text' / 'meta.json').write_text(json.dumps({'dataset': 'text', 'tokenizer': 'gpt2'}))
    assert dataset_meta('text', root) == {'dataset': 'text', 'tokenizer': 'gpt2', 'vocab_size': 50257,
                                          'bos': EOT, 'doc_aligned': False}
    with pytest.raises(ValueError, match='unknown dataset'):
        dataset_meta('nope', root)


def test_ensure_dataset_builds_trigger_once(tmp_path, capsys):
    root = str(tmp_path)
    ensure_dataset('trigger', root)
    assert 'trigger: 2 files, 4,526,080 tokens (4,259,840 train, 266,240 val)' in capsys.readouterr().out
    folder = tmp_path / 'trigger'
    stats = {f: (os.stat(folder / f).st_mtime_ns, os.stat(folder / f).st_ino) for f in os.listdir(folder)}
    assert sorted(stats) == ['meta.json', 'trigger_train_000000.bin', 'trigger_val_000000.bin']
    meta = dataset_meta('trigger', root)
    assert {k: meta[k] for k in ('vocab_size', 'trigger_p', 'seq_len', 'seed', 'train_docs', 'val_docs')} == \
        {'vocab_size': 34, 'trigger_p': 0.06, 'seq_len': 64, 'seed': 0, 'train_docs': 2**16, 'val_docs': 4096}
    ensure_dataset('trigger', root)  # there already: nothing rebuilt, nothing printed
    assert {f: (os.stat(folder / f).st_mtime_ns, os.stat(folder / f).st_ino) for f in os.listdir(folder)} == stats
    assert capsys.readouterr().out == ''

# -----------------------------------------------------------------------------
# Sampler

@pytest.mark.parametrize('block_size', [64, 16])
def test_sampler_doc_aligned_at_bos(default_root, block_size):
    paths = shard_paths('trigger', 'train', str(default_root))
    docs = split_tokens(default_root, 'train').reshape(-1, 65)
    x, y = Sampler(paths, batch_size=64, block_size=block_size, seed=0, doc_aligned=True, bos=0).get(3)
    assert x.shape == (64, block_size) and (x[:, 0] == 0).all()
    assert torch.equal(x[:, 1:], y[:, :-1])
    window = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.uint16)
    starts = {docs[i, :block_size + 1].tobytes() for i in range(len(docs))}
    assert all(row.tobytes() in starts for row in window)  # each one a document's beginning, contiguous
    assert len({row.tobytes() for row in window}) > 60  # and not the same few
    plain, _ = Sampler(paths, batch_size=256, block_size=block_size, seed=0).get(3)
    assert (plain[:, 0] == 0).float().mean() < 0.1  # without doc_aligned a window starts anywhere


def test_sampler_doc_aligned_needs_the_bos_token(tmp_path):
    path = str(tmp_path / 'gpt2.bin')
    write_shard(path, np.full(500, EOT))
    Sampler([path], 4, 16, seed=0, doc_aligned=True).get(0)  # EOT is the default bos
    with pytest.raises(ValueError, match=r'no bos \(0\) token leaves room for a window of 17 tokens'):
        Sampler([path], 4, 16, seed=0, doc_aligned=True, bos=0).get(0)


def test_sampler_default_behaviour_is_bitwise_unchanged(tmp_path):
    """Batches hashed with the Sampler as it was before bos existed (numpy 2.4.6): the same bytes."""
    paths = []
    for i, n in enumerate([3000, 500, 8000, 20]):
        paths.append(str(tmp_path / f'count_{i}.bin'))
        write_shard(paths[-1], (10_000 * i + np.arange(n)) % 50_000)
    rng = np.random.default_rng(3)
    docs = rng.integers(0, EOT, 20000).astype(np.uint16)
    docs[rng.random(20000) < 1 / 300] = EOT
    docs[0] = EOT
    write_shard(str(tmp_path / 'docs.bin'), docs)
    h = hashlib.sha256()
    batches = [s.get(step, micro) for s in (Sampler(paths, 8, 32, seed=1), Sampler(paths, 8, 32, seed=2, rank=1))
               for step, micro in [(0, 0), (5, 1)]]
    batches.append(Sampler([str(tmp_path / 'docs.bin')], 16, 64, seed=4, doc_aligned=True).get(2, 0))
    for x, y in batches:
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    assert h.hexdigest() == '2700450e40384a66dd804041d46e90d7d898667d281c5330fd9bc9795fc4fe2d'
    x, y = Sampler(paths, 8, 32, seed=1, bos=0).get(5, 1)  # bos matters only with doc_aligned
    assert torch.equal(x, batches[1][0]) and torch.equal(y, batches[1][1])
