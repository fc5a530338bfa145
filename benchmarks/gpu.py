"""GPU facts and memory readings: torch's peak for work in this process, nvidia-smi's for work in
other processes (Serve replicas, batch actors), and freeing memory between phases."""

from __future__ import annotations

import gc
import shutil
import subprocess
import threading

GIB = 1024**3


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_info() -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "gpus": 0, "gpu_name": None}
    if torch.cuda.is_available():
        info.update(gpus=torch.cuda.device_count(), gpu_name=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def free_memory() -> None:
    gc.collect()
    if cuda_available():
        import torch

        torch.cuda.empty_cache()


class TorchPeak:
    """Peak memory torch allocated in this process between __enter__ and read() (None on CPU)."""

    def __enter__(self) -> TorchPeak:
        if cuda_available():
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def read(self) -> float | None:
        if not cuda_available():
            return None
        import torch

        return torch.cuda.max_memory_allocated() / GIB

    def __exit__(self, *exc) -> None:
        pass


def _smi_used_mib() -> list[int] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return [int(x) for x in out.split()]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


class SmiPeak:
    """Peak memory used on each GPU, as nvidia-smi reports it (whole card, every process), sampled
    every `period_s` while the block runs. read() gives GiB per GPU, or None without nvidia-smi."""

    def __init__(self, period_s: float = 0.5):
        self.period_s = period_s
        self.peak: list[int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            used = _smi_used_mib()
            if used is not None:
                self.peak = used if self.peak is None else [max(a, b) for a, b in zip(self.peak, used, strict=False)]
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> SmiPeak:
        if shutil.which("nvidia-smi") and cuda_available():
            self._thread = threading.Thread(target=self._sample, name="nvidia-smi", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def read(self) -> list[float] | None:
        return None if self.peak is None else [round(mib / 1024, 2) for mib in self.peak]
