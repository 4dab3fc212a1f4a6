"""Memory and throughput measurement.

CUDA: the caching allocator's peak allocated and reserved bytes, and the whole process's device memory
from NVML (the convention of the paper's Table 3, docs/method.md#what-the-paper-reports) when NVML is available.
CPU: an exact accounting of the bytes held by tensors saved for backward, alive at the peak. This is
the activation memory local learning saves, and it makes memory claims testable without a GPU.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable

import torch


class SavedTensorAccountant:
    """Context manager counting the bytes of distinct storages saved for backward that are alive.

    Each saved tensor is packed into a small handle; when autograd frees the graph, the handle dies and
    its storage's count drops. Storages are counted once however many tensors view them; the storages
    of `ignore` (parameters, buffers) are persistent, so they are not counted.

    peak_bytes: the largest total seen while the context was active.
    """

    def __init__(self, ignore: Iterable[torch.Tensor] = ()):
        self._ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self._refs: dict[int, int] = {}  # storage data_ptr -> live handles
        self._sizes: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self._hooks = None

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current_bytes -= self._sizes.pop(key)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._ignore or storage.nbytes() == 0 or tensor.device.type == "meta":
            return tensor
        if key not in self._refs:
            self._refs[key] = 0
            self._sizes[key] = storage.nbytes()
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._refs[key] += 1
        return _SavedHandle(tensor, weakref.WeakMethod(self._release), key)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _SavedHandle) else packed

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


class _SavedHandle:
    __slots__ = ("tensor", "_release", "_key")

    def __init__(self, tensor, release, key):
        self.tensor = tensor
        self._release = release
        self._key = key

    def __del__(self):
        release = self._release()
        if release is not None:
            release(self._key)


def nvml_process_bytes(device: torch.device) -> int | None:
    """Device memory used by this process according to NVML (None when NVML is unavailable)."""
    try:
        import pynvml  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pid = os.getpid()
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid:
                return int(proc.usedGpuMemory)
    except Exception:  # NVML missing in containers, no permission: the figure is optional
        return None
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak(device: torch.device) -> dict:
    """Peak allocated / reserved bytes since the last reset, and the process total (NVML)."""
    torch.cuda.synchronize(device)
    return {
        "kind": "cuda",
        "max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "max_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "process_total_bytes": nvml_process_bytes(device),
    }


def parameter_storages(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: persistent tensors the saved-tensor accounting should not count."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def step_saved_bytes(learner, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes saved for backward during one `LocalLearner.step` (its gradients are left in `.grad`)."""
    with SavedTensorAccountant(ignore=parameter_storages(learner)) as acct:
        learner.step(x, y)
    return acct.peak_bytes


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), or what the platform module knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What a reader needs to know which machine a number came from: the GPU's name, or the CPU's and the
    number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {threads} thread{'s' if threads > 1 else ''}"
