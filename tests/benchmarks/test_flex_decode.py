"""benchmarks/flex_decode.py: GPU only, so on CPU it stops with a clear message instead of a traceback;
its candidates name real kernel settings, the engine's among them."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.flex_decode import CANDIDATES
from mistral_qa.engine.attention import FLEX_DECODE_OPTIONS
from tests.conftest import ROOT


def test_without_a_gpu_it_says_so():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.flex_decode"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_the_candidates_hold_inductors_default_and_the_engines_settings():
    assert CANDIDATES["inductor default"] is None
    assert FLEX_DECODE_OPTIONS in CANDIDATES.values()
    allowed = {"BLOCK_N", "num_stages", "num_warps", "SPLIT_KV"}
    assert all(set(options) <= allowed for options in CANDIDATES.values() if options)
