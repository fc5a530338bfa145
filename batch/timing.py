"""Where the batch job's wall time goes: Ray start, plan, actors ready, answering, writing.

The driver marks its own phases; the answering actors report to a small clock actor when their
engine is ready (with the engine's own load and warm-up seconds and what its compile cache did) and
when each engine call starts and ends. Times are wall-clock (time.time()) so that the driver's and
the actors' marks compare; on a cluster that relies on the nodes' clocks being in sync (NTP).

    ray start     start_ray(): starting or joining the cluster
    plan          listing inputs, reading the resume set, preflight checks, building the dataset
    actors ready  from submitting the dataset to the first engine ready: actor start (process, imports,
                  the config), then that engine's model load and warm-up (compile, CUDA graphs)
    waiting       from the first engine ready to the first engine call (reading the first block)
    answering     from the first engine call's start to the last one's end
    writing       from the last engine call to the job's end: the last Parquet files, closing
Each part is the span between two marks, so the parts add up to the total.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import ray

log = logging.getLogger("batch")


@ray.remote(num_cpus=0)
class JobClock:
    """Collects the answering actors' marks; the driver reads them after the job."""

    def __init__(self):
        self.engines: list[dict] = []  # one per actor, in the order they became ready
        self.first_call: float | None = None
        self.last_call: float | None = None

    def engine_ready(self, at: float, startup: dict) -> None:
        self.engines.append({"at": at, **startup})

    def engine_call(self, started: float, ended: float) -> None:
        self.first_call = started if self.first_call is None else min(self.first_call, started)
        self.last_call = ended if self.last_call is None else max(self.last_call, ended)

    def read(self) -> dict:
        engines = sorted(self.engines, key=lambda e: e["at"])
        return {"engines": engines, "first_call": self.first_call, "last_call": self.last_call}


def tell(clock, mark: str, *args) -> None:
    """Send the clock one of the actors' marks and wait for it (the driver reads the clock right after
    the job); a clock gone wrong costs the split, never the answers."""
    if clock is None:
        return
    try:
        ray.get(getattr(clock, mark).remote(*args), timeout=60)
    except Exception as err:  # a dead or hung clock actor: Ray's errors vary
        log.warning("answerer: could not report %s to the job's clock: %r", mark, err)


def read_clock(clock) -> dict:
    """The clock's marks; none (the split then lacks the engine parts) when it cannot be read."""
    try:
        return ray.get(clock.read.remote(), timeout=60)
    except Exception as err:  # as in tell(): the answers are written, a lost clock costs only the split
        log.warning("batch: could not read the job's clock: %r", err)
        return {"engines": [], "first_call": None, "last_call": None}


@dataclass
class TimeSplit:
    """The job's seconds, part by part (see the module docstring); the engine parts are the first
    ready engine's own measurements, and `engines` every actor's."""

    ray_start_s: float = 0.0
    plan_s: float = 0.0
    actors_ready_s: float = 0.0
    actor_start_s: float = 0.0  # of actors_ready_s: before the engine's model load
    load_s: float = 0.0  # of actors_ready_s: the model load
    warm_up_s: float = 0.0  # of actors_ready_s: the warm-up (compile, CUDA graphs)
    compile_cache: str = "off"  # what the first ready engine's compile cache did
    waiting_s: float = 0.0
    answering_s: float = 0.0
    writing_s: float = 0.0
    total_s: float = 0.0
    engines: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The summary's lines: the split, then the engine start-up inside "actors ready"."""
        parts = {
            "ray start": self.ray_start_s,
            "plan": self.plan_s,
            "actors ready": self.actors_ready_s,
            "waiting": self.waiting_s,
            "answering": self.answering_s,
            "writing": self.writing_s,
        }
        return [
            "time split:      "
            + ", ".join(f"{name} {s:.1f} s" for name, s in parts.items())
            + f" (total {self.total_s:.1f} s)",
            f"engine start:    actor {self.actor_start_s:.1f} s, model load {self.load_s:.1f} s, "
            f"warm-up {self.warm_up_s:.1f} s, compile cache {self.compile_cache} ({len(self.engines)} engine(s) ready)",
        ]

    def log_line(self) -> str:
        """One line of JSON for machines (benchmarks/batch_job.py reads it)."""
        return "batch timing: " + json.dumps(self.as_dict())


def _span(start: float | None, end: float | None) -> float:
    return max(0.0, end - start) if start is not None and end is not None else 0.0


def cache_status(startup: dict) -> str:
    """The engine's compile cache in a word: off, loaded, saved, ignored+saved, ..."""
    cache = startup.get("compile_cache") or {}
    status, save = cache.get("status", "off"), cache.get("save", "")
    return f"{status}, {save}" if save else status


def split(marks: dict[str, float], clock: dict) -> TimeSplit:
    """The split from the driver's marks (start, ray_start, ray_started, submitted, end: time.time())
    and the clock's read(). A job with nothing to answer has no engine marks: its dataset's run counts
    as writing."""
    engines, first_call, last_call = clock["engines"], clock["first_call"], clock["last_call"]
    submitted, end = marks["submitted"], marks["end"]
    times = TimeSplit(
        ray_start_s=_span(marks["ray_start"], marks["ray_started"]),
        plan_s=_span(marks["start"], marks["ray_start"]) + _span(marks["ray_started"], submitted),
        total_s=_span(marks["start"], end),
        engines=engines,
    )
    if not engines or first_call is None:
        times.writing_s = _span(submitted, end)
        return times
    first = engines[0]
    times.actors_ready_s = _span(submitted, first["at"])
    times.load_s, times.warm_up_s = first.get("load_s", 0.0), first.get("warm_up_s", 0.0)
    times.actor_start_s = max(0.0, times.actors_ready_s - times.load_s - times.warm_up_s)
    times.compile_cache = cache_status(first)
    times.waiting_s = _span(first["at"], first_call)
    times.answering_s = _span(first_call, last_call)
    times.writing_s = _span(last_call, end)
    return times


class Marks:
    """The driver's marks, taken as the job goes (time.time())."""

    def __init__(self):
        self.times: dict[str, float] = {"start": time.time()}

    def mark(self, name: str) -> None:
        self.times[name] = time.time()
