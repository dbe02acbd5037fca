"""
Data for the ledger-residuals lab: token shards, the offline GPT-2 tokenizer, a batch sampler,
and a CLI that fetches or builds the shards (docs/reference.md §3).

This file is that CLI (the paragraph above is its --help description); the library is lab/data.py (shard
files, tokenizer, sampler, the offline builds) and lab/download.py (FineWeb shards, GPT-2 weights).

    python prepare.py                                # FineWeb-Edu: val + 4 train shards (400M tokens)
    python prepare.py --dataset=fineweb10B --shards 8
    python prepare.py --dataset=builtin              # Python's stdlib, ~4M tokens, offline, seconds
    python prepare.py --dataset=text --input notes/ book.txt
    python prepare.py --dataset=trigger              # synthetic trigger language, 4.5M tokens, offline, < 1 s

Files land in data/<dataset>/ next to this file; set LEDGER_DATA or pass --data_root to move them.
Downloads come from huggingface.co unless --base_url or LEDGER_BASE_URL names a mirror; they
resume after a dropped connection and retry, one line per try (lab/download.py). Errors: one line,
exit code 2, no empty folder left behind.

--dataset=trigger generates the synthetic trigger language. Its full rules, and how to train on it,
are in the docstring of lab/data.py.
"""

import argparse
import os
import sys
import time

from lab.cli import OneLineParser, check_output_folder
from lab.data import (DATA_ROOT, DATASETS, TRIGGER_DEFAULTS, TRIGGER_FLAGS, VAL_FRACTION, build_builtin, build_corpus,
                      build_trigger, check_trigger_params, data_folder, summary, text_documents)
from lab.download import HF_URL, default_backoff, download


def main(argv=None):
    parser = OneLineParser(prog='prepare.py', description=__doc__.split('\n\n')[0].strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', default='finewebedu10B', choices=list(DATASETS),
                        help='FineWeb downloads (finewebedu10B, fineweb10B), or offline builds: builtin (Python '
                             'stdlib), text (--input), trigger (synthetic, options below)')
    parser.add_argument('--shards', type=int, default=4, help='FineWeb train shards to fetch, 100M tokens each')
    parser.add_argument('--base_url', default=os.environ.get('LEDGER_BASE_URL') or HF_URL,
                        help='mirror of huggingface.co/datasets (env LEDGER_BASE_URL)')
    parser.add_argument('--input', nargs='+', help='text files or folders for --dataset=text')
    parser.add_argument('--data_root', default=None, help=f'default {DATA_ROOT} (env LEDGER_DATA)')
    parser.add_argument('--val_fraction', type=float, default=VAL_FRACTION)
    parser.add_argument('--workers', type=int, default=os.cpu_count(), help='tokeniser processes')
    d = TRIGGER_DEFAULTS
    group = parser.add_argument_group(
        'trigger language (only with --dataset=trigger)',
        'Synthetic, offline, the same bytes for the same parameters. Symbols: BOS=0, TRIGGER=1,\n'
        'content 2..V-1; a document is BOS and seq_len symbols. After a TRIGGER comes the content\n'
        'symbol most frequent so far in the document (ties: smallest id); else TRIGGER with\n'
        'probability p, once a content symbol came before; else a uniform content symbol. Only\n'
        'post-trigger tokens are predictable. Train with block_size=seq_len on windows that start at\n'
        'BOS (meta.json: doc_aligned). Full rules: the docstring of prepare.py.')
    group.add_argument('--trigger_vocab', type=int, metavar='V', dest='vocab_size',
                       help=f"vocabulary size V, 4..65535 (default {d['vocab_size']}: {d['vocab_size'] - 2} content symbols)")
    group.add_argument('--trigger_p', type=float, metavar='P', dest='p',
                       help=f"probability of a TRIGGER at a position that may have one, in (0, 0.5) (default {d['p']})")
    group.add_argument('--trigger_len', type=int, metavar='N', dest='seq_len',
                       help=f"symbols after BOS per document, at least 2 (default {d['seq_len']})")
    group.add_argument('--trigger_seed', type=int, metavar='S', dest='seed', help=f"random seed (default {d['seed']})")
    group.add_argument('--trigger_docs', type=int, metavar='N', dest='train_docs',
                       help=f"train documents (default {d['train_docs']:,})")
    group.add_argument('--trigger_val_docs', type=int, metavar='N', dest='val_docs',
                       help=f"val documents, from another random stream (default {d['val_docs']:,})")
    args = parser.parse_args(argv)
    given = {key: getattr(args, key) for key in TRIGGER_FLAGS if getattr(args, key) is not None}
    if given and args.dataset != 'trigger':
        parser.error(f"{TRIGGER_FLAGS[next(iter(given))]} is only used with --dataset=trigger, "
                     f"not --dataset={args.dataset}")
    trigger = dict(TRIGGER_DEFAULTS, **given)
    if args.dataset == 'trigger':
        try:
            check_trigger_params(**trigger)
        except ValueError as e:
            parser.error(str(e))
    if args.shards < 1:
        parser.error(f"--shards must be at least 1, got {args.shards}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    if args.dataset == 'text' and not args.input:
        parser.error("--dataset=text needs --input PATH [PATH ...]")
    if args.dataset != 'text' and args.input:
        parser.error(f"--input is only used with --dataset=text, not --dataset={args.dataset}")
    try:
        check_output_folder(os.path.join(data_folder(args.data_root), args.dataset), '--data_root')
    except ValueError as e:
        parser.error(str(e))

    t0 = time.time()
    try:
        if args.dataset == 'builtin':
            build_builtin(args.data_root, args.workers)
        elif args.dataset == 'trigger':
            build_trigger(args.data_root, **trigger)
        elif args.dataset == 'text':
            build_corpus(text_documents(args.input), 'text', args.data_root, args.val_fraction, args.workers)
        else:
            download(args.dataset, args.shards, args.data_root, args.base_url, backoff=default_backoff())
        print(summary(args.dataset, args.data_root, time.time() - t0))
    except (RuntimeError, ValueError, OSError) as e:  # ours, ShardError (ValueError), requests' (OSError)
        print(f"prepare.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare.py: interrupted (builds start over, downloads resume where they stopped: run the same "
              "command again)", file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
