"""
Downloads for the lab: pre-tokenized FineWeb shards (download, for prepare.py) and OpenAI's GPT-2
weights for the probe (fetch_gpt2, docs/reference.md §6), from huggingface.co or a mirror of it.

Every file goes through fetch: streamed into <file>.part, resumed with an HTTP Range request after
a dropped connection, retried with exponential backoff (base LEDGER_BACKOFF, 1 s), one line per
try; what waiting cannot heal (no such host, connection refused, HTTP 4xx) fails at once with a
DownloadError that says how to work offline. A file gets its final name only once it is checked
complete and valid, and a failed download leaves no empty folder behind.
"""

import json
import os
import sys
import time
import urllib.parse

import requests
import urllib3
from tqdm import tqdm

from lab.data import DATASETS, Incomplete, check_shard, data_folder, makedirs, remove_empty

HF_HUB = 'https://huggingface.co'
HF_URL = HF_HUB + '/datasets'  # the shards' repos; models live one level up (hub_url)

# -----------------------------------------------------------------------------
# one file: resumable, retried, verified before it gets its final name

class DownloadError(RuntimeError):
    """A download that failed for good (no such host, connection refused, HTTP 4xx, too many
    retries, or not a valid file). Its message says how to work without the network."""


class _Retry(Exception):
    """A failure worth retrying: HTTP 5xx/429 or a body that ended early."""


def _state(path, check):
    """'complete', 'partial' (check raised Incomplete: resume it) or 'bad' (missing or garbage)."""
    try:
        check(path)
        return 'complete'
    except Incomplete:
        return 'partial'
    except (OSError, ValueError):
        return 'bad'


def _is_complete(path, check=check_shard):
    return _state(path, check) == 'complete'


def _cannot_connect(url, e):
    """What went wrong, in a few words, when a connection could not even be opened (no such host,
    refused, unreachable): waiting does not heal these, so they are not retried. None otherwise
    (timeouts and connections broken midway are retried)."""
    reason = getattr(e.args[0], 'reason', None) if isinstance(e, requests.ConnectionError) and e.args else None
    if not isinstance(reason, urllib3.exceptions.NewConnectionError) or isinstance(e, requests.Timeout):
        return None
    host = urllib.parse.urlsplit(url).netloc
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return f"cannot resolve the host name {host.rsplit(':', 1)[0]} (no network, or a wrong --base_url)"
    why = str(reason).rsplit(': ', 1)[-1].split('] ')[-1]  # e.g. 'Connection refused'
    return f"cannot connect to {host}: {why}"


def _short(e, part):
    """A retried failure in a few words (requests' own messages run to 300 characters)."""
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        got = os.path.getsize(part) if os.path.exists(part) else 0
        return f"connection broken after {got:,} bytes"
    return str(e)


def _fetch_once(url, part, have, desc, offline):
    """One GET that appends to `part` from byte `have` on. Returns when the body is complete."""
    headers = {'Range': f'bytes={have}-'} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=(10, 60)) as r:
        if r.status_code == 416:
            return  # range starts at the end: the part already holds the whole file
        if r.status_code >= 500 or r.status_code == 429:
            raise _Retry(f"HTTP {r.status_code} {r.reason}")
        if r.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}; check --base_url and the file name. {offline}")
        if r.status_code == 200:
            have = 0  # full body: the server ignored Range (or none was asked), start the part over
        elif not r.headers.get('Content-Range', '').startswith(f'bytes {have}-'):
            os.remove(part)
            raise _Retry(f"server answered Range bytes={have}- with {r.headers.get('Content-Range')!r}")
        size = r.headers.get('Content-Length')
        total = have + int(size) if size is not None else None
        # a progress bar on a terminal only; a try that fails takes its bar away, so that each try
        # leaves one line at most (the retry message)
        with open(part, 'ab' if have else 'wb') as f, \
                tqdm(desc=desc, total=total, initial=have, unit='B', unit_scale=True, unit_divisor=1024,
                     disable=None) as bar:
            try:
                for chunk in r.iter_content(chunk_size=1 << 16):  # a dropped connection loses < 64 KiB
                    f.write(chunk)
                    bar.update(len(chunk))
                if total is not None and f.tell() < total:
                    raise _Retry(f"connection closed at byte {f.tell():,} of {total:,}")
            except BaseException:
                bar.leave = False
                raise


def fetch(url, path, tries=5, backoff=1.0, check=check_shard, what='a token shard', offline=''):
    """Download url to path via path + '.part', resuming with HTTP Range after a dropped connection.

    check(path) says what a good file is: it returns when the file is complete and valid, raises
    Incomplete for a correct beginning (resumed) and ValueError/OSError otherwise. A .part left by an
    earlier run is resumed when it is a correct beginning, else started over. Failures that waiting
    cannot heal (no such host, connection refused, HTTP 4xx) raise DownloadError at once, ending
    with `offline` (how to do without the network); others are retried, one line each on stderr,
    until `tries` failures in a row brought no new bytes, sleeping backoff * 2**k between them. The
    file gets its final name only after check passes; a body that fails it is deleted.
    """
    part = path + '.part'
    desc = os.path.basename(path)
    if os.path.exists(part) and _state(part, check) == 'bad':
        os.remove(part)  # left over from something else: start over
    failures = 0
    while not _is_complete(part, check):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            _fetch_once(url, part, have, desc, offline)
            break
        except (_Retry, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            fatal = _cannot_connect(url, e)
            if fatal:
                raise DownloadError(f"{url}: {fatal}; not retried. {offline}") from None
            now = os.path.getsize(part) if os.path.exists(part) else 0
            failures = 0 if now > have else failures + 1
            if failures >= tries:
                raise DownloadError(f"{url}: giving up after {tries} failed tries ({_short(e, part)}); re-run to "
                                    f"try again (downloads resume where they stopped). {offline}") from None
            wait = backoff * 2 ** max(failures - 1, 0)
            print(f"{desc}: {_short(e, part)}; retrying in {wait:.1f} s", file=sys.stderr)
            time.sleep(wait)
    try:
        check(part)
    except (OSError, ValueError) as e:
        if os.path.exists(part):
            os.remove(part)
        raise DownloadError(f"{desc}: the server sent something that is not {what} ({e}); "
                            f"deleted the partial file. Check --base_url: {url}") from e
    os.replace(part, path)

# -----------------------------------------------------------------------------
# pre-tokenized FineWeb shards (prepare.py --dataset=finewebedu10B / fineweb10B)

def download(dataset, n_train=4, data_root=None, base_url=HF_URL, tries=5, backoff=1.0):
    """Fetch the val shard and the first n_train train shards of a pre-tokenized FineWeb dataset.
    Files that are already complete are skipped without a request."""
    info = DATASETS[dataset]
    if n_train > info['train_shards']:
        print(f"{dataset} has {info['train_shards']} train shards; fetching all of them")
        n_train = info['train_shards']
    folder = os.path.join(data_folder(data_root), dataset)
    offline = (f"Without network: train on an offline corpus (python train.py --dataset=builtin, or python "
               f"prepare.py --dataset=text --input FILES), or copy the shards into {folder}")
    names = [f"{info['prefix']}_val_000000.bin"] + \
            [f"{info['prefix']}_train_{i:06d}.bin" for i in range(1, n_train + 1)]
    created = makedirs(folder)
    try:
        for name in names:
            path = os.path.join(folder, name)
            if not _is_complete(path):
                fetch(f"{base_url.rstrip('/')}/{info['hf_repo']}/resolve/main/{name}", path, tries, backoff,
                      offline=offline)
    finally:
        remove_empty(created)
    return [os.path.join(folder, name) for name in names]

# -----------------------------------------------------------------------------
# OpenAI GPT-2 weights for the probe (docs/reference.md §6): config.json + model.safetensors from the hub

GPT2_MODELS = {
    'gpt2': 'openai-community/gpt2',                # 124M: 12 layers, 12 heads, 768
    'gpt2-medium': 'openai-community/gpt2-medium',  # 350M: 24, 16, 1024
    'gpt2-large': 'openai-community/gpt2-large',    # 774M: 36, 20, 1280
    'gpt2-xl': 'openai-community/gpt2-xl',          # 1.5B: 48, 25, 1600
}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers too


def check_json_object(path):
    """A complete config.json: parses as one JSON object. (A cut-off JSON file cannot be told from
    a garbage one, so it is never Incomplete: such a small file is simply fetched again.)"""
    with open(path, 'rb') as f:
        data = f.read()
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: JSON {type(obj).__name__}, not an object")


def check_safetensors(path):
    """A complete .safetensors file: an 8-byte little-endian header length N, a JSON object of N bytes
    whose tensors give data_offsets [begin, end) into the data, and exactly 8 + N + the largest end
    bytes in all. Shorter, with a good header so far, is Incomplete (a download to resume)."""
    size = os.path.getsize(path)
    if size < 8:
        raise Incomplete(f"{path}: truncated: {size} bytes, not even the 8-byte header length")
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        if n > SAFETENSORS_MAX_HEADER:
            raise ValueError(f"{path}: header length {n} is over {SAFETENSORS_MAX_HEADER}: not a safetensors file")
        if size < 8 + n:
            raise Incomplete(f"{path}: truncated: {size} bytes, shorter than the {8 + n}-byte header")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the header is not JSON ({e}): not a safetensors file") from None
    try:
        expected = 8 + n + max([0] + [int(t['data_offsets'][1]) for k, t in header.items() if k != '__metadata__'])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise ValueError(f"{path}: the header is not a safetensors header (tensor -> dtype, shape, data_offsets)") from None
    if size < expected:
        raise Incomplete(f"{path}: truncated: expected {expected} bytes, got {size}")
    if size > expected:
        raise ValueError(f"{path}: too long: expected {expected} bytes, got {size}")


GPT2_WEIGHT_FILES = {  # file -> (check, what it is), in download order
    'config.json': (check_json_object, 'a JSON object'),
    'model.safetensors': (check_safetensors, 'a safetensors file'),
}


def hub_url(base_url, repo, name):
    """<hub>/<repo>/resolve/main/<name> for a model repo on huggingface.co or a mirror of it.

    A trailing /datasets is dropped from base_url: --base_url / LEDGER_BASE_URL name a mirror of
    huggingface.co/datasets for the shards, and models live one level up (huggingface.co/<repo>),
    so one mirror setting serves both."""
    base = base_url.rstrip('/').removesuffix('/datasets')
    return f"{base}/{repo}/resolve/main/{name}"


def default_backoff():
    """Seconds before the first retry: LEDGER_BACKOFF, else 1 (tests shrink it)."""
    return float(os.environ.get('LEDGER_BACKOFF', 1.0))


def fetch_gpt2(name, data_root=None, base_url=None, tries=5, backoff=None):
    """Download one of GPT2_MODELS (config.json, model.safetensors) into <data root>/gpt2/<name>/ and
    return that folder (for model.load_gpt2). Complete files are not requested again, so a second
    run is offline; an interrupted download resumes. base_url: the hub or a mirror (default
    LEDGER_BASE_URL, else huggingface.co); see hub_url. backoff: default_backoff()."""
    if name not in GPT2_MODELS:
        raise ValueError(f"unknown GPT-2 model {name!r}; choose from {', '.join(GPT2_MODELS)} "
                         "or give a folder holding config.json and model.safetensors")
    base_url = base_url or os.environ.get('LEDGER_BASE_URL') or HF_HUB
    folder = os.path.join(data_folder(data_root), 'gpt2', name)
    offline = (f"Without network: put {' and '.join(GPT2_WEIGHT_FILES)} of {GPT2_MODELS[name]} (from any "
               f"machine that has them) into a folder and give the folder instead of {name}")
    created = makedirs(folder)
    try:
        for file, (check, what) in GPT2_WEIGHT_FILES.items():
            path = os.path.join(folder, file)
            if not _is_complete(path, check):
                fetch(hub_url(base_url, GPT2_MODELS[name], file), path, tries, backoff or default_backoff(), check,
                      what, offline)
    finally:
        remove_empty(created)
    return folder
