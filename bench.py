"""
Speed of residual operators against each other at the same shape, measured in one process.

    python bench.py                                    # small CPU shape: vanilla vs ledger
    python bench.py --preset=160m --device=cuda        # the paper's 12 x 768 shape, bf16 + compile
    python bench.py --residuals=vanilla,ledger,mine    # any keys of model.RESIDUALS

Each timed step is forward + backward + AdamW step on random tokens, with the training loss of
train.py (cross-entropy plus the configured penalties, e.g. commit_sparsity x commit rate). The
models alternate step by step after a warm-up, so drift in clock speed or other load hits all alike.
Prints a table, each model's time relative to the first (ledger/vanilla: ~1.08 in FLOPs at the
paper's shapes), and one JSON line for scripts.
"""

import argparse
import json
import time
from contextlib import nullcontext

import torch

from model import GPT, RESIDUALS, GPTConfig, resolve_device
from train import TrainConfig, peak_flops, total_loss

PRESETS = {  # n_layer, n_head, n_embd, block_size, batch_size
    'tiny': (4, 4, 256, 128, 8),
    '160m': (12, 12, 768, 1024, 24),
    '290m': (12, 16, 1024, 1024, 16),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=PRESETS, default='tiny', help='shape and batch (overridden by the flags below)')
    for name in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size'):
        p.add_argument(f'--{name}', type=int)
    p.add_argument('--residuals', default='vanilla,ledger',
                   help='comma-separated keys of model.RESIDUALS; times are given relative to the first')
    p.add_argument('--ledger_rank', type=int, default=64)
    p.add_argument('--device', default='auto', help="'auto' = cuda if available, else cpu")
    p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'], help="'auto' = bf16 on CUDA")
    p.add_argument('--compile', default='auto', choices=['auto', 'true', 'false'], help="'auto' = on for CUDA")
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per model (compile happens here)')
    p.add_argument('--steps', type=int, default=10, help='timed steps per model')
    p.add_argument('--probe', action='store_true', help="also time probe.py's instrumented passes vs plain forwards")
    args = p.parse_args(argv)
    shape = dict(zip(('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size'), PRESETS[args.preset]))
    for k in shape:
        if getattr(args, k) is None:
            setattr(args, k, shape[k])
    args.residuals = args.residuals.split(',')
    unknown = [r for r in args.residuals if r not in RESIDUALS]
    if unknown:
        p.error(f"--residuals: {', '.join(unknown)} not in model.RESIDUALS ({', '.join(RESIDUALS)})")
    try:
        args.device, args.dtype, args.compile = resolve_device(
            args.device, args.dtype, 'auto' if args.compile == 'auto' else args.compile == 'true')
    except ValueError as e:
        p.error(str(e))
    return args


def build(args, residual):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                    vocab_size=50304, residual=residual, ledger_rank=args.ledger_rank)
    model = GPT(cfg).to(args.device)
    opt = model.configure_optimizer(0.1, 3e-4, (0.9, 0.999), device_type=args.device.split(':')[0])
    fwd = torch.compile(model) if args.compile else model
    return model, fwd, opt


def make_step(args, model, fwd, opt):
    ctx = (torch.autocast(args.device.split(':')[0], dtype=torch.bfloat16)
           if args.dtype == 'bfloat16' else nullcontext())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (args.batch_size, args.block_size + 1), generator=g).to(args.device)

    train_cfg = TrainConfig(residual=model.config.residual)   # train.py's default penalty weights
    if 'commit_rate' not in RESIDUALS[model.config.residual].aux:
        train_cfg.commit_sparsity = 0.0

    def step():
        with ctx:
            _, ce, aux = fwd(x[:, :-1], x[:, 1:])
            loss = total_loss(ce, aux, train_cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    names = args.residuals
    models, steps = {}, {}
    for name in names:
        models[name] = build(args, name)
        steps[name] = make_step(args, *models[name])
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    sync(args.device)
    times = {name: [] for name in names}
    peak_mem = {}
    for name in names:
        if args.device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
        steps[name]()
        sync(args.device)
        peak_mem[name] = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith('cuda') else None
    for _ in range(args.steps):
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)

    tokens = args.batch_size * args.block_size
    peak = peak_flops(args.device) if args.dtype == 'bfloat16' else None  # the table is dense bf16
    result = dict(device=args.device, dtype=args.dtype, compile=args.compile, n_layer=args.n_layer,
                  n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size, batch_size=args.batch_size)
    print(f"shape {args.n_layer}x{args.n_embd}x{args.n_head}, T={args.block_size}, B={args.batch_size}, "
          f"{args.device} {args.dtype} compile={args.compile}, median of {args.steps} steps")
    print(f"{'model':8s} {'params':>10s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'peak mem':>9s}")
    for name in names:
        model = models[name][0]
        ms = 1000 * sorted(times[name])[len(times[name]) // 2]
        tps = tokens / (ms / 1000)
        mfu = model.estimate_mfu(tps, peak) if peak else None
        mem = peak_mem[name]
        print(f"{name:8s} {model.num_params() / 1e6:9.1f}M {ms:9.1f} {tps:10.0f} "
              f"{f'{100 * mfu:5.1f}%' if mfu else '  n/a':>6s} {f'{mem:.2f} GiB' if mem else 'n/a':>9s}")
        result[name] = dict(params=model.num_params(), ms_per_step=ms, tokens_per_s=tps, mfu=mfu, peak_mem_gib=mem,
                            flops_per_token=model.estimate_flops_per_token())
    base = names[0]
    for name in names[1:]:
        ratio = result[name]['ms_per_step'] / result[base]['ms_per_step']
        flop_ratio = result[name]['flops_per_token'] / result[base]['flops_per_token']
        result[name].update(ratio=ratio, flop_ratio=flop_ratio)
        print(f"{name}/{base} time ratio {ratio:.3f} (FLOP ratio {flop_ratio:.3f}"
              + (", goal <= 1.10)" if (base, name) == ('vanilla', 'ledger') else ")"))
    if 'vanilla' in result and 'ledger' in result:   # the paper's comparison, kept at the top level for scripts
        result['ratio'] = result['ledger']['ms_per_step'] / result['vanilla']['ms_per_step']
        result['flop_ratio'] = result['ledger']['flops_per_token'] / result['vanilla']['flops_per_token']

    if args.probe:
        from probe import measure_overhead
        for name in names:
            model = models[name][0].eval()
            x = torch.randint(0, 50257, (min(args.batch_size, 8), args.block_size), device=args.device)
            plain, instrumented = measure_overhead(model, x)
            result[f'probe_{name}'] = dict(plain_s=plain, instrumented_s=instrumented, ratio=instrumented / plain)
            print(f"probe overhead {name}: plain {plain:.3f}s, instrumented {instrumented:.3f}s, "
                  f"ratio {instrumented / plain:.2f} (goal <= 1.5)")
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    main()
