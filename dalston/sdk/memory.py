"""Process memory: what an engine holds, and handing it back after an unload."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

_process = psutil.Process()


def _torch_cuda():
    # Only if some runtime already imported torch: the core never needs it.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda
    return None


def rss_bytes() -> int:
    return _process.memory_info().rss


def vram_bytes() -> int | None:
    cuda = _torch_cuda()
    return int(cuda.memory_allocated()) if cuda else None


def device_bytes(device: str) -> int:
    """All the memory of `device`, which its loaded models share: the GPU's VRAM ("cuda",
    "cuda:1"), else the machine's RAM."""
    if device.startswith("cuda"):
        try:
            import torch
        except ImportError:  # a GPU runtime without torch (CTranslate2 alone) cannot tell
            pass
        else:
            index = int(device.partition(":")[2] or 0)
            return int(torch.cuda.get_device_properties(index).total_memory)
    return int(psutil.virtual_memory().total)


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# While a model is pulled or loads, every block over LOAD_MMAP_THRESHOLD gets its own mapping,
# so an unload hands the weights (and a pull its copy buffers) back to the OS whole. Left alone,
# glibc raises its threshold to 32 MiB after the first large free and puts the next model's
# weights on the heap among small long-lived blocks, where trimming cannot free them. Inference
# keeps its large working buffers on the heap: mapping each of them costs about 25% in speed.
# `python -m bench` (bench/memory.py) measures the whole: RSS after ten unloads spreads 17-37%
# on glibc's defaults, 3-4% with these settings, at the same speed.
LOAD_MMAP_THRESHOLD = 128 * 1024
RUN_MMAP_THRESHOLD = 32 * 1024 * 1024


def _mallopt(parameter: int, value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(parameter, value)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator's defaults stand


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Few malloc arenas, set before any worker thread starts (the engine runner does, before it
    builds the actor): with one arena per thread (the glibc default) each swap leaves freed model
    memory stranded in some thread's arena, and RSS creeps up swap after swap (measured: 152 ->
    248 MB over 12 swaps; with 2 arenas, flat)."""
    _mallopt(_M_ARENA_MAX, arenas)


@contextmanager
def large_blocks_mapped() -> Iterator[None]:
    """Around a model pull or load: its large blocks (weights, copy buffers) are allocated as
    mappings that go back to the OS whole when freed, and strand nothing on the heap."""
    _mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)
        # Fixing the threshold also fixes when free() trims the heap, at 128 KiB: inference would
        # then hand pages back and fault them in again on every call. Twice the threshold is
        # glibc's own dynamic choice; `release` still trims everything after an unload.
        _mallopt(_M_TRIM_THRESHOLD, 2 * RUN_MMAP_THRESHOLD)


def release() -> None:
    """After dropping a model's references: collect, hand CUDA blocks and free heap back."""
    gc.collect()
    cuda = _torch_cuda()
    if cuda:
        cuda.synchronize()
        cuda.empty_cache()
    try:
        # glibc keeps freed arenas; without this RSS only grows across swaps.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
