"""
Where the work runs: the device, dtype and compile choice that train.py, probe.py and bench.py
share, a training rank's setup under torchrun, the GPU peak FLOP/s behind MFU, and a hint for CPUs
that other processes keep busy.
"""
import contextlib
import datetime
import os
import re
import types

import torch
import torch.distributed as dist


def resolve_device(device='auto', dtype='auto', compile='auto'):
    """(device, dtype, compile) with 'auto' resolved the one way train.py, probe.py and bench.py
    share: the device cuda, then mps, then cpu; bfloat16 autocast on CUDA when the GPU supports it,
    else float32; torch.compile on CUDA only. ValueError (one line) for a device that is not there."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind = device.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch.cuda.is_available() is False (no CUDA GPU or a CPU-only "
                         f"torch); use device='cpu'")
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}, but MPS is not available; use device='cpu'")
    if dtype == 'auto':
        dtype = 'bfloat16' if kind == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    if compile == 'auto':
        compile = kind == 'cuda'
    return device, dtype, compile


def setup(device='auto', dtype='auto', compile='auto', ddp_timeout=30.0):
    """A namespace of where this training rank runs: ddp, rank, local_rank, world_size, master
    (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE), device (cuda:LOCAL_RANK under torchrun), dtype,
    compile, device_type, autocast; TF32 matmuls on CUDA, deterministic algorithms on the CPU (exact
    resume); the process group, whose ddp_timeout (minutes) bounds every wait for the other ranks.
    ValueError (one line) for a device that cannot run."""
    env = os.environ
    r = types.SimpleNamespace(ddp='RANK' in env, rank=int(env.get('RANK', 0)), local_rank=int(env.get('LOCAL_RANK', 0)),
                              world_size=int(env.get('WORLD_SIZE', 1)))
    r.master = r.rank == 0
    r.device, r.dtype, r.compile = resolve_device(device, dtype, compile)
    if r.device.startswith('cuda'):
        if r.ddp and r.device != 'cuda':
            raise ValueError(f"device={device!r}: under torchrun use device='cuda' (each rank takes cuda:LOCAL_RANK)")
        r.device = f'cuda:{r.local_rank}' if r.ddp else ('cuda:0' if r.device == 'cuda' else r.device)
        torch.cuda.set_device(r.device)
    elif r.device == 'mps' and r.ddp:
        raise ValueError("device='mps' is not available under torchrun")
    r.device_type = r.device.split(':')[0]
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[r.dtype]
    r.autocast = contextlib.nullcontext() if r.dtype == 'float32' else torch.autocast(r.device_type, dtype=ptdtype)
    if r.device_type == 'cuda':
        torch.set_float32_matmul_precision('high')  # TF32 for the fp32 matmuls
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)  # exact resume on CPU
    if r.ddp:
        dist.init_process_group('nccl' if r.device_type == 'cuda' else 'gloo',
                                device_id=torch.device(r.device) if r.device_type == 'cuda' else None,
                                timeout=datetime.timedelta(minutes=ddp_timeout))
    return r


# dense (no sparsity: half the datasheets' headline) bf16 tensor-core peak FLOP/s, by
# torch.cuda.get_device_name(); the first match wins. NVL and PCIe cards have lower clocks or fewer
# SMs than the SXM ones of the same name ('NVIDIA H100 80GB HBM3' is the SXM H100, 'NVIDIA H200' the
# SXM H200); both NVL cards are rated 1,671 TFLOP/s with sparsity.
PEAK_FLOPS = [
    (r'H100.*NVL', 836e12), (r'H100.*PCIe', 756e12), (r'H100', 989e12),
    (r'H200.*NVL', 836e12), (r'H200', 989e12),
    (r'A100', 312e12), (r'\bL4\b', 121e12), (r'\bA10\b', 125e12), (r'RTX 4090', 165e12),
]


def peak_flops(device, dtype):
    """The GPU's peak FLOP/s for MFU (train.py and bench.py): only for bf16 on a GPU of PEAK_FLOPS,
    the table's precision; None otherwise (CPU, fp32, fp16, an unknown GPU), reported as n/a."""
    if not device.startswith('cuda') or dtype != 'bfloat16':
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, name)), None)


def busy_cpu_hint():
    """A line for CPU runs on a machine where other processes keep cores busy (1-minute load
    average), None otherwise. torch's OpenMP threads spin-wait for each other, so a thread that
    shares its core with other work slows every step down: the demo's step on 2 cores, one kept
    busy by another process, took 20 s with torch's 2 threads and 10 s with 1 (README,
    Troubleshooting). The default stays torch's, a thread per core: a load average lags and is
    coarse, and a thread count chosen from it would differ from run to run; a hint costs nothing
    when it is wrong."""
    threads = torch.get_num_threads()
    if os.environ.get('OMP_NUM_THREADS') or threads < 2 or not hasattr(os, 'getloadavg'):
        return None
    busy = os.getloadavg()[0]  # mostly others' load: this run has only just started
    if busy < (os.cpu_count() or threads) - threads + 0.9:  # a core's worth of others' work or more
        return None
    return (f"note: other processes keep about {busy:.1f} of the {os.cpu_count()} CPU cores busy (load average) and "
            f"torch's {threads} threads spin-wait for each other, which can make every step several times slower; "
            f"OMP_NUM_THREADS=1 (or the number of idle cores) before the command is faster then")
