"""Optional API key: the Bearer token clients must send when a key is configured.

The key comes from MISTRAL_QA_API_KEY, or from the file named by MISTRAL_QA_API_KEY_FILE (a
mounted secret; preferred on clusters, where env vars show up in job and actor listings).
It is never logged.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from .errors import OpenAIError

KEY_ENV = "MISTRAL_QA_API_KEY"
KEY_FILE_ENV = "MISTRAL_QA_API_KEY_FILE"


def load_api_key(environ: dict | None = None) -> str | None:
    env = os.environ if environ is None else environ
    if env.get(KEY_ENV):
        return env[KEY_ENV].strip()
    path = env.get(KEY_FILE_ENV)
    if path:
        if not Path(path).is_file():
            raise RuntimeError(f"{KEY_FILE_ENV} names {path}, which does not exist")
        return Path(path).read_text().strip() or None
    return None


def check_bearer(expected: str | None, authorization: str | None) -> None:
    """Raise a 401 unless no key is configured or the header carries it."""
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise OpenAIError(401, "missing API key: send Authorization: Bearer <key>", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise OpenAIError(401, "incorrect API key", code="invalid_api_key")
