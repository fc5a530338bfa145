"""A warm start for torch.compile: the engine's compile artifacts saved after one engine's warm-up
and loaded by the next engine's, through a folder that can live on shared storage (engine.compile_cache).

torch.compiler.save_cache_artifacts() serialises what this process compiled (Inductor's FX graph
and autotuning caches, and more); load_cache_artifacts() puts such bytes into this process's
caches, so the next compile of the same graphs hits them instead of generating and building kernels.
The file name is keyed on what changes the compiled graphs (torch version, device and its
capability, the model's config, the engine settings that shape the decode step); a file of another
key is never read. torch checks its own cache keys as well, so a stale artifact can cost a
recompile, never a wrong kernel. A file that cannot be read or loaded is logged and ignored: the
engine then compiles as it would without a cache. Writes go to a temporary name that is then
renamed, so engines starting together never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class CompileCacheReport:
    """What the engine's compile cache did at start-up (Engine.startup carries it)."""

    location: str | None = None  # engine.compile_cache (None: off)
    file: str | None = None  # the artifact's name in it, keyed (see cache_key)
    status: str = "off"  # what loading found: off | missing | loaded | ignored (unreadable or not torch's)
    save: str = ""  # after the warm-up: saved | nothing compiled | failed ("": not tried, e.g. loaded)
    loaded_bytes: int = 0
    saved_bytes: int = 0
    load_s: float = 0.0
    message: str = ""  # why a file was ignored or a save failed

    def as_dict(self) -> dict:
        return asdict(self)


def device_tag(device: torch.device) -> str:
    """The device type and, for CUDA, its compute capability and CUDA version (kernels differ)."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda{torch.version.cuda}-sm{major}{minor}"


def cache_key(model_config: dict, shape: dict) -> str:
    """The artifact's file name: torch version, device tag (shape["device"]) and a hash of the model's
    config and the engine settings that change the compiled graphs (shape)."""
    model = {k: v for k, v in model_config.items() if k != "_name_or_path"}  # where it was loaded from: not its shape
    digest = hashlib.sha256(json.dumps([model, shape], sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"engine-torch{torch.__version__}-{shape['device']}-{digest}.bin".replace("+", "_")


class CompileCache:
    """One engine's artifact file in the cache folder: load() before the warm-up, save() after it."""

    def __init__(self, location: str, file: str):
        self.report = CompileCacheReport(location=location, file=file, status="missing")
        self._fs = None  # resolved on first use, inside load()/save(): a bad URI must not stop the engine
        self._folder, self._path = location, f"{location.rstrip('/')}/{file}"
        self._tried = False  # load() reads the file once: a later warm-up must not load what it saved

    def load(self) -> None:
        """Load the artifact into torch's caches if there is one; a bad one is logged and ignored."""
        import pyarrow.fs as pafs

        if self._tried:
            return
        self._tried = True
        started = time.perf_counter()
        try:
            self._resolve()
            if self._fs.get_file_info(self._path).type != pafs.FileType.File:
                log.info(
                    "compile cache: no %s in %s; this engine compiles and saves it",
                    self.report.file,
                    self.report.location,
                )
                return
            with self._fs.open_input_stream(self._path) as f:
                data = f.read()
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as err:  # a corrupt, truncated or foreign file must not stop the engine
            self._ignore(f"{type(err).__name__}: {err}")
            return
        if info is None:
            self._ignore("torch found no artifacts in it")
            return
        self.report.status, self.report.loaded_bytes = "loaded", len(data)
        self.report.load_s = time.perf_counter() - started
        log.info("compile cache: loaded %d bytes from %s in %.1f s", len(data), self._path, self.report.load_s)

    def _ignore(self, why: str) -> None:
        self.report.status, self.report.message = "ignored", why
        log.warning("compile cache: ignoring %s (%s); compiling without it", self._path, why)

    def save(self) -> None:
        """Save what this process compiled, unless the artifact was loaded (the file holds it) or saved
        already (an ignored file is replaced); nothing compiled (compile off, or CPU, where the engine runs eagerly) saves nothing."""
        if self.report.status == "loaded" or self.report.save == "saved":
            return
        try:
            self._resolve()
            saved = torch.compiler.save_cache_artifacts()
            if saved is None or not saved[0]:
                self.report.save = "nothing compiled"
                log.info("compile cache: nothing was compiled, nothing saved")
                return
            self._write(saved[0])
        except Exception as err:  # a full or read-only share must not stop the engine either
            self.report.save, self.report.message = "failed", f"{type(err).__name__}: {err}"
            log.warning("compile cache: could not save %s (%s)", self._path, self.report.message)
            return
        self.report.save, self.report.saved_bytes = "saved", len(saved[0])
        log.info("compile cache: saved %d bytes to %s", len(saved[0]), self._path)

    def _resolve(self) -> None:
        if self._fs is None:
            from ..storage import resolve_filesystem  # imports pyarrow: only when a cache is set

            self._fs, self._folder = resolve_filesystem(self.report.location.rstrip("/"))
            self._path = f"{self._folder}/{self.report.file}"

    def _write(self, data: bytes) -> None:
        """Write under a temporary name, then rename: a reader sees the whole file or none."""
        self._fs.create_dir(self._folder, recursive=True)
        tmp = f"{self._path}.{uuid.uuid4().hex}.tmp"
        with self._fs.open_output_stream(tmp) as f:
            f.write(data)
        self._fs.move(tmp, self._path)


def engine_cache(location: str | None, model, settings: dict) -> CompileCache | None:
    """The engine's cache (None when engine.compile_cache is off). settings: what shapes the compiled
    decode step besides the model (resolved dtype, batch size, context, prefill pack, attention,
    adapters) plus "device", a device_tag."""
    if location is None:
        return None
    return CompileCache(location, cache_key(model.config.to_dict(), settings))


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process so far (Dynamo's tracing through
    Inductor, cache hits included), for the start-up report; 0 where this torch does not say."""
    try:
        from torch._dynamo.utils import calculate_time_spent  # private: a report, never a dependency

        return float(calculate_time_spent().get("entire_frame_compile", 0.0))
    except Exception:
        return 0.0
