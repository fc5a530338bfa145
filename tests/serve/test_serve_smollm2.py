"""End to end as a user does it: a quickstart adapter on SmolLM2-135M-Instruct, served by
`python -m serve` (its own local Ray), asked by the `openai` client; the answer must be on topic."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
PORT = 8123
SLEEP_WORDS = ("sleep", "screen", "phone", "bed")


@pytest.fixture(scope="module")
def served(smollm2_adapter):
    env = {**os.environ, "RAY_ADDRESS": "local", "MISTRAL_QA_API_KEY": "test-key"}
    command = [sys.executable, "-m", "serve", "--adapter", str(smollm2_adapter), "--port", str(PORT)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # keep reading, or a full pipe would block the server's logging
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ready.wait(timeout=600), "".join(lines[-40:])
        yield f"http://127.0.0.1:{PORT}"
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C: the CLI shuts Serve down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_sleep_question_gets_an_on_topic_answer(served):
    client = OpenAI(base_url=f"{served}/v1", api_key="test-key", max_retries=0)
    assert {m.id for m in client.models.list()} == {"base", "mobile-health"}
    reply = client.chat.completions.create(
        model="mobile-health",
        messages=[{"role": "user", "content": "How does using my phone in bed affect my sleep?"}],
        max_tokens=96,
        temperature=0,
    )
    answer = reply.choices[0].message.content
    assert any(word in answer.lower() for word in SLEEP_WORDS), answer
    assert "### Instruction" not in answer
