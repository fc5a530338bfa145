"""Waiting for a deployed app: poll its /health until it answers 200."""

from __future__ import annotations

import time
import urllib.request


def wait_until_ready(url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f} s")
