"""
Speed and memory of residual operators against each other at the same shape, one training step as
train.py runs it.

    python bench.py                                    # small CPU shape: vanilla vs ledger
    python bench.py --preset=160m --device=cuda        # the paper's 12 x 768 shape, bf16 + compile
    python bench.py --residuals=vanilla,ledger,mine    # any keys of model.RESIDUALS
    python bench.py --attention=all                    # every attention variant against plain softmax

Each timed step is forward + backward + gradient clipping + AdamW step on random tokens, with the
training loss of train.py (cross-entropy plus the configured penalties, e.g. commit_sparsity x
commit rate) and, as in train.py, without keeping the logits. The models are measured one at a
time: build, warm up (compile happens here), time, free, then the next, so that one model's
weights and optimizer state never sit in another's memory. With --rounds=R the models take R such
turns each, in alternation, and a model's time is the median over all its timed steps: on a shared
machine, load that comes and goes then falls on every model rather than on one. The vocabulary is
the presets' 50257 unless --vocab_size says otherwise.

Prints a table and each model's time relative to the first (ledger/vanilla: ~1.08 in FLOPs at the
paper's shapes), then one JSON line for scripts. On a GPU, 'step mem' is the peak memory of one step
minus what was allocated before it (weights and AdamW moments, the 'state' column): activations,
gradients and the logits; on other devices it is n/a. MFU is given for bf16 on GPUs that
lab.device.peak_flops knows, n/a otherwise. Bad input: one line on stderr and exit code 2.
"""

import argparse
import gc
import json
import sys
import time
from contextlib import nullcontext

import torch

from lab.weightings import ATTENTION_VARIANTS
from model import GPT, RESIDUALS, GPTConfig, options
from lab.cli import OneLineParser
from lab.config import ConfigError, checked, parse_value
from lab.device import peak_flops, resolve_device
from lab.measure import measure_overhead
from lab.training import backward, configure_optimizer, default_weights, update

PRESETS = {  # n_layer, n_head, n_embd, block_size, batch_size
    'tiny': (4, 4, 256, 128, 8),
    '160m': (12, 12, 768, 1024, 24),
    '290m': (12, 16, 1024, 1024, 16),
}
SHAPE = ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size')
FLOOR_MARGIN = 0.10   # the goal: a model's step time within 10 % of its FLOP ratio to the first model's


def parse_args(argv=None):
    p = OneLineParser(prog='bench.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=PRESETS, default='tiny', help='shape and batch (overridden by the flags below)')
    for name in SHAPE:
        p.add_argument(f'--{name}', type=int)
    p.add_argument('--vocab_size', type=int, default=50257, help="the presets' GPT-2 vocabulary; 50304 pads it to 64")
    p.add_argument('--residuals', default='vanilla,ledger',
                   help='comma-separated keys of model.RESIDUALS; times are given relative to the first')
    p.add_argument('--attention', default='softmax',
                   help="comma-separated keys of lab.weightings.ATTENTION_VARIANTS ('all' for every one), each run with "
                        "every residual; times are given relative to the first model")
    model = p.add_argument_group('model options (model.options(): any setting of any variant, e.g. --ledger_rank=16)')
    for name in options():
        if name not in SHAPE + ('vocab_size', 'residual'):
            model.add_argument(f'--{name}', metavar='VALUE')
    p.add_argument('--device', default='auto', help="'auto' = cuda if available, else cpu")
    p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'], help="'auto' = bf16 on CUDA")
    p.add_argument('--compile', default='auto', choices=['auto', 'true', 'false'], help="'auto' = on for CUDA")
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per model (compile happens here)')
    p.add_argument('--steps', type=int, default=10, help='timed steps per model and round')
    p.add_argument('--rounds', type=int, default=1, help='turns per model, in alternation (e.g. 3 on a busy CPU)')
    p.add_argument('--probe', action='store_true', help="also time probe.py's instrumented passes vs plain forwards")
    args = p.parse_args(argv)
    shape = dict(zip(SHAPE, PRESETS[args.preset]))
    for k in shape:
        if getattr(args, k) is None:
            setattr(args, k, shape[k])
    for k in ('batch_size', 'steps', 'rounds'):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    args.residuals = args.residuals.split(',')
    unknown = [r for r in args.residuals if r not in RESIDUALS]
    if unknown:
        p.error(f"--residuals: {', '.join(unknown)} not in model.RESIDUALS ({', '.join(RESIDUALS)})")
    args.attention = list(ATTENTION_VARIANTS) if args.attention == 'all' else args.attention.split(',')
    unknown = [a for a in args.attention if a not in ATTENTION_VARIANTS]
    if unknown:
        p.error(f"--attention: {', '.join(unknown)} not in lab.weightings.ATTENTION_VARIANTS ({', '.join(ATTENTION_VARIANTS)})")
    args.models = [(r, a) for r in args.residuals for a in args.attention]   # (residual, attention variant)
    opts, args.settings = options(), {}
    for name in opts:
        text = getattr(args, name, None) if name not in SHAPE + ('vocab_size', 'residual') else None
        if text is not None:
            try:
                args.settings[name] = checked(opts, name, parse_value(text, opts[name]), f"(--{name}={text})")
            except ConfigError as e:
                p.error(str(e))
    for model in args.models:
        try:
            config(args, model)
        except ValueError as e:
            p.error(str(e))
    try:
        args.device, args.dtype, args.compile = resolve_device(
            args.device, args.dtype, 'auto' if args.compile == 'auto' else args.compile == 'true')
    except ValueError as e:
        p.error(str(e))
    return args


def config(args, model):
    residual, attention = model
    return GPTConfig(**{**args.settings, **ATTENTION_VARIANTS[attention]}, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd, block_size=args.block_size, vocab_size=args.vocab_size, residual=residual)


def name_of(model):
    residual, attention = model
    return residual if attention == 'softmax' else f'{residual}+{attention}'


def build(args, model):
    torch.manual_seed(0)
    model = GPT(config(args, model)).to(args.device)
    opt = configure_optimizer(model, 0.1, 3e-4, (0.9, 0.999), device_type=args.device.split(':')[0])
    fwd = torch.compile(model) if args.compile else model
    return model, fwd, opt


def make_step(args, model, fwd, opt):
    ctx = (torch.autocast(args.device.split(':')[0], dtype=torch.bfloat16)
           if args.dtype == 'bfloat16' else nullcontext())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1), generator=g).to(args.device)

    batch, weights = (x[:, :-1], x[:, 1:]), default_weights(model.config.residual)   # train.py's default penalties
    aux = list(RESIDUALS[model.config.residual].aux)

    def step():   # train.py's step (lab.training): one micro-step, clipping, AdamW
        backward(fwd, batch, lambda: batch, 1, weights, aux, ctx)
        update(model, opt, grad_clip=1.0)
    return step


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def step_memory(step, device):
    """(GiB allocated before one step, GiB of that step's peak above it) on CUDA; (None, None) elsewhere,
    where torch keeps no such count."""
    if not device.startswith('cuda'):
        step()
        return None, None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return before / 2**30, (torch.cuda.max_memory_allocated(device) - before) / 2**30


def measure(args, spec):
    """One turn of one model ((residual, attention variant)), alone on the device: build, warm up, step
    memory, timed steps, and the probe's overhead with --probe. Everything is freed before it returns."""
    model, fwd, opt = build(args, spec)
    step = make_step(args, model, fwd, opt)
    for _ in range(args.warmup):
        step()
    state_mem, step_mem = step_memory(step, args.device)
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    info = dict(params=model.num_params(), flops_per_token=model.estimate_flops_per_token(), times=times,
                state_mem_gib=state_mem, step_mem_gib=step_mem)
    if args.probe:
        x = torch.randint(0, args.vocab_size, (min(args.batch_size, 8), args.block_size), device=args.device)
        plain, instrumented = measure_overhead(model.eval(), x)
        info['probe'] = dict(plain_s=plain, instrumented_s=instrumented, ratio=instrumented / plain)
    del model, fwd, opt, step
    gc.collect()
    if args.compile:
        torch._dynamo.reset()   # the compiled code holds on to the model
    if args.device.startswith('cuda'):
        torch.cuda.empty_cache()
    return info


def gib(v):
    return 'n/a' if v is None else f'{v:.2f} GiB'


def main(argv=None):
    try:
        args = parse_args(argv)
    except SystemExit as e:        # --help (0), or bad input: one line on stderr (2)
        return e.code
    names = [name_of(m) for m in args.models]
    tokens = args.batch_size * args.block_size
    peak = peak_flops(args.device, args.dtype)   # None unless bf16 on a known GPU
    result = dict(device=args.device, dtype=args.dtype, compile=args.compile, n_layer=args.n_layer,
                  n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size, batch_size=args.batch_size,
                  vocab_size=args.vocab_size)
    print(f"shape {args.n_layer}x{args.n_embd}x{args.n_head}, T={args.block_size}, B={args.batch_size}, "
          f"V={args.vocab_size}, {args.device} {args.dtype} compile={args.compile}, one model at a time, "
          f"median of {args.rounds} x {args.steps} steps, each round after {args.warmup} warm-up steps")
    turns = {name: [] for name in names}
    for _ in range(args.rounds):
        for model in args.models:
            turns[name_of(model)].append(measure(args, model))
    w = max(8, max(map(len, names)))
    print(f"{'model':{w}s} {'params':>10s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'state':>10s} {'step mem':>10s}")
    for name in names:
        r = result[name] = turns[name][0]   # size and memory: the same in every round
        times = sorted(t for turn in turns[name] for t in turn.pop('times'))
        r['ms_per_step'] = 1000 * times[len(times) // 2]
        r['tokens_per_s'] = tokens / (r['ms_per_step'] / 1000)
        r['mfu'] = r['flops_per_token'] * r['tokens_per_s'] / peak if peak else None
        mfu = 'n/a' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{name:{w}s} {r['params'] / 1e6:9.1f}M {r['ms_per_step']:9.1f} {r['tokens_per_s']:10.0f} {mfu:>6s} "
              f"{gib(r['state_mem_gib']):>10s} {gib(r['step_mem_gib']):>10s}", flush=True)
    base = names[0]
    for name in names[1:]:
        ratio = result[name]['ms_per_step'] / result[base]['ms_per_step']
        flop_ratio = result[name]['flops_per_token'] / result[base]['flops_per_token']
        result[name].update(ratio=ratio, flop_ratio=flop_ratio)
        print(f"{name}/{base} time ratio {ratio:.3f} (FLOP ratio {flop_ratio:.3f}; goal: within {FLOOR_MARGIN:.0%} "
              f"of it, <= {(1 + FLOOR_MARGIN) * flop_ratio:.3f})")
    if len(names) > 1:   # the first comparison at the top level, for scripts (vanilla,ledger: the paper's)
        result['ratio'], result['flop_ratio'] = result[names[1]]['ratio'], result[names[1]]['flop_ratio']
    for name in names if args.probe else []:
        p = result[name]['probe']
        print(f"probe overhead {name}: plain {p['plain_s']:.3f}s, instrumented {p['instrumented_s']:.3f}s, "
              f"ratio {p['ratio']:.2f} (goal <= 1.5)")
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
