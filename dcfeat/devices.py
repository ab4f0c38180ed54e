"""Where computation runs: device choice, mixed precision and timing barriers, in one place.

On CUDA the backbone runs in bf16 and training under bf16 autocast; on the CPU
everything stays float32 (CPU half-precision matmuls are many times slower).
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import AbstractContextManager, contextmanager

import torch

from dcfeat.choices import DEVICE_PATTERN, DEVICES
from dcfeat.errors import BadInput, EnvironmentProblem

_DEVICE = re.compile(DEVICE_PATTERN)


def check_device_name(device: str) -> str:
    """`device` when dcfeat supports it (auto, cpu, cuda, cuda:N); BadInput otherwise."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise BadInput(f"--device {device}: dcfeat runs on {DEVICES} (torch's other devices, such as mps "
                       "or meta, are not supported); choose one of those")
    return device


def resolve_device(device: str | torch.device = "auto", *, local_rank: int = 0, world: int = 1) -> torch.device:
    """"auto" → CUDA when there is one; under torchrun each process takes its own GPU. Only the
    CPU and CUDA devices are accepted (BadInput), and a CUDA device must exist (EnvironmentProblem)."""
    if isinstance(device, torch.device):
        return device
    check_device_name(device)
    if device == "auto" or (device == "cuda" and world > 1):
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}" if world > 1 else "cuda")
        if device == "auto":
            return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EnvironmentProblem(f"--device {device}: torch sees no CUDA device here; pass --device cpu, "
                                 "or install a CUDA build of torch on a machine with an NVIDIA GPU")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise EnvironmentProblem(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s) here "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); choose one of those")
    return resolved


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype the frozen backbone runs in on `device`."""
    return torch.bfloat16 if is_cuda(device) else torch.float32


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA, a no-op elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=is_cuda(device))


@contextmanager
def reproducible(device: torch.device):
    """On the CPU, torch's deterministic kernels while inside: the gradient of a gather (a head's
    target prototypes) otherwise accumulates in a thread-dependent order, and two runs of one seed
    part in the last bits from the second epoch on (measured here with 2 threads; no slower). On
    CUDA, where some of dcfeat's kernels have no deterministic version, nothing changes."""
    before = torch.are_deterministic_algorithms_enabled()
    if not is_cuda(torch.device(device)):
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def inner_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T as float32. On CUDA from float16 operands on the tensor cores, with float32 output
    (torch >= 2.8; else a float32 product): half-precision outputs only resolve cosines to ~5e-4,
    enough to swap near-tied neighbours or cells. Elsewhere the operands' own dtype (float32 on CPU)."""
    if not is_cuda(a.device) or a.dtype not in (torch.float16, torch.float32) or a.dtype != b.dtype:
        return (a @ b.T).float()
    try:
        return torch.mm(a.half(), b.half().T, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return a.float() @ b.float().T


def sampled_products(a: torch.Tensor, b: torch.Tensor, per_row: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Only the entries of a @ b.T that are asked for, as float32: a[i] · b[columns[j]] for the `per_row[i]`
    consecutive j of row i, rows one after the other. On the CPU one sampled product over a CSR pattern
    (torch.sparse.sampled_addmm: each asked-for row of b read where it lies, no copy of it, no Python
    loop; ~0.1 ms per query for 1,600 scattered rows of a 1.25 M-row table against ~1 ms for a product
    per run of rows); elsewhere the rows gathered in chunks."""
    if len(columns) == 0:
        return torch.zeros(0, device=a.device)
    if a.device.type != "cpu":
        return gathered_products(a, b, per_row, columns)
    a, b = a.float(), b.float()
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), per_row.to(torch.int64).cumsum(0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        pattern = torch.sparse_csr_tensor(crow, columns.to(torch.int64), torch.zeros(len(columns)),
                                          size=(len(a), len(b)), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, a.contiguous(), b.T, beta=0.0).values()


def gathered_products(a: torch.Tensor, b: torch.Tensor, per_row: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`sampled_products` by gathering the asked-for rows of a and b, 16 M values at a time (for a GPU)."""
    row = torch.repeat_interleave(torch.arange(len(a), device=a.device), per_row.to(a.device))
    step = max(1, (1 << 24) // max(1, a.shape[1]))
    return torch.cat([torch.zeros(0, device=a.device)] + [(a[row[i:i + step]].float() * b[columns[i:i + step]].float()).sum(1)
                                                          for i in range(0, len(columns), step)])


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock read after it times that work."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def available_memory(device: torch.device) -> int:
    """Bytes free where tensors on `device` live: the GPU's free memory on CUDA, the host's available
    memory otherwise."""
    if is_cuda(device):
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info["MemAvailable"])
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_budget(device: torch.device, share: float = 0.5) -> int:
    """Bytes of a split that training may hold: `share` of the free memory where the features live."""
    return int(available_memory(device) * share)
