"""The engine thread: takes submitted requests from any thread and runs the step loop while there
is work. Requests that arrive mid-generation join the running batch at the next step boundary.

Health (`check_health`, for serving's health check): the thread must be alive, and no step may run
longer than STEP_TIMEOUT_S (a hang). A thread that died is not restarted: its runner's state is
unknown, so every later request fails at once with the reason, until the engine is replaced.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from .errors import EngineFailure
from .request import Delta, Request
from .runner import StepRunner

log = logging.getLogger(__name__)

_STOP = object()
# The longest a step may run before the engine counts as stuck. Generous: compiling and capturing CUDA
# graphs for the first shapes happens in Engine's constructor (its warm-up), but a new shape bucket met
# later (more rows, a longer context) compiles or captures on first use, which can take tens of seconds.
STEP_TIMEOUT_S = 120.0


class EngineThread:
    def __init__(self, runner: StepRunner, step_timeout_s: float = STEP_TIMEOUT_S):
        self._runner = runner
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.pending = 0  # submitted and not yet finished; read by serving for back-pressure
        self.step_timeout_s = step_timeout_s
        self.died: BaseException | None = None  # what ended the engine thread, if something did
        self.closed = False
        self._step_started: float | None = None  # monotonic time the running step began
        self._parked = threading.Event()  # set while the thread, with no work, waits for a request

    def submit(self, request: Request) -> None:
        """Queue a request; its on_delta is then called from the engine thread (or at once, with the
        reason, when the engine thread has died or the engine is closed)."""
        callback = request.on_delta

        def on_delta(delta, callback=callback):
            if delta.finished:
                with self._lock:
                    self.pending -= 1
            callback(delta)

        with self._lock:  # under the lock: the thread's death (see _run) cannot slip between check and put
            if self.died is not None or self.closed:
                callback(Delta("", error=self._dead_error()))
                return
            request.on_delta = on_delta
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
            self._inbox.put(request)

    def check_health(self) -> None:
        """Raise EngineFailure if the engine thread has died (or was closed) or a step has been
        running longer than step_timeout_s; else return."""
        if self.died is not None or self.closed:
            raise self._dead_error()
        started = self._step_started
        if started is not None and time.monotonic() - started > self.step_timeout_s:
            running = time.monotonic() - started
            raise EngineFailure(
                TimeoutError(f"a step has been running for {running:.1f} s (the bound is {self.step_timeout_s} s)")
            )

    def wait_parked(self, timeout: float = 60.0) -> None:
        """Wait until the thread has no work and waits for a request. From then until the next
        submit no other thread touches the runner, so a test or a probe may step it directly.
        (`pending == 0` is not enough: the step launched ahead of the last answer may still run.)"""
        if self._thread is not None and not self._parked.wait(timeout):
            raise TimeoutError(f"the engine thread still had work after {timeout} s")

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the engine thread to end; whether it has (or never started)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def _dead_error(self) -> EngineFailure:
        if self.closed:
            return EngineFailure(RuntimeError("the engine is closed"))
        return EngineFailure(RuntimeError(f"the engine thread died: {type(self.died).__name__}: {self.died}"))

    def close(self) -> None:
        self.closed = True
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # not an Exception (those fail requests, not the loop): the thread ends
            with self._lock:
                self.died = err
            log.critical("the engine thread died", exc_info=err)
            try:
                while True:  # what was queued and not taken yet
                    item = self._inbox.get_nowait()
                    if item is not _STOP:
                        self._runner.add(item)
            except queue.Empty:
                pass
            try:
                self._runner.fail_all(EngineFailure(err))
            finally:
                raise

    def _loop(self) -> None:
        runner = self._runner
        while True:
            # Block only when idle; while generating, take whatever has arrived and keep stepping.
            items = []
            if not runner.has_work():
                self._parked.set()
                items.append(self._inbox.get())
                self._parked.clear()
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
            self._step_started = time.monotonic()
            try:
                runner.step()
            except Exception as err:  # the loop must survive anything a step throws
                log.exception("engine step failed")
                runner.fail_all(err)
            finally:
                self._step_started = None
