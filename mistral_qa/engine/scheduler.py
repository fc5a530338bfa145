"""The engine thread: takes submitted requests from any thread and runs the step loop while there
is work. Requests that arrive mid-generation join the running batch at the next step boundary."""

from __future__ import annotations

import logging
import queue
import threading

from .request import Request
from .runner import StepRunner

log = logging.getLogger(__name__)

_STOP = object()


class Scheduler:
    def __init__(self, runner: StepRunner):
        self._runner = runner
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.pending = 0  # submitted and not yet finished; read by serving for back-pressure

    def submit(self, request: Request) -> None:
        """Queue a request; its on_delta is then called from the engine thread."""
        callback = request.on_delta

        def on_delta(delta, callback=callback):
            if delta.finished:
                with self._lock:
                    self.pending -= 1
            callback(delta)

        request.on_delta = on_delta
        with self._lock:
            self.pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
        self._inbox.put(request)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout=10)

    def _run(self) -> None:
        runner = self._runner
        while True:
            # Block only when idle; while generating, take whatever has arrived and keep stepping.
            items = [self._inbox.get()] if not runner.has_work() else []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is _STOP:
                    runner.fail_all(RuntimeError("engine closed"))
                    return
                runner.add(item)
            try:
                runner.step()
            except Exception as err:  # the loop must survive anything a step throws
                log.exception("engine step failed")
                runner.fail_all(err)
