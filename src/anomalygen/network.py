"""Third-party libraries kept quiet and off the network when there is none.

``quiet()`` (at CLI start, before diffusers / transformers / peft are imported) turns off their
progress bars ("Loading weights", downloads: rich shows ours), advisory warnings and telemetry.
``offline_unless_reachable(models)`` decides once per command whether the Hugging Face hub may be
asked: never when every model is a local folder; otherwise one TCP connection to the hub (at most
``TIMEOUT_S``, DNS included), and when it fails ``HF_HUB_OFFLINE=1`` for this process, so that a
missing model fails at once with its error instead of after retries, and peft does not warn
"Unable to fetch remote file".
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

TIMEOUT_S = 1.5
QUIET = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DIFFUSERS_NO_ADVISORY_WARNINGS": "1",
}
TRUE = ("1", "true", "yes", "on")


def quiet() -> None:
    """Third-party progress bars and advisory messages off (a value the user set is kept)."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)


def reachable(url: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (name lookup
    included: it runs in a thread that is not waited for longer)."""
    parsed = urlparse(url)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def go_offline() -> None:
    """``HF_HUB_OFFLINE`` for this process, also in an already imported huggingface_hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def offline_unless_reachable(models: Iterable[object]) -> bool:
    """Decide once whether the hub may be asked for ``models`` (hub ids, local folders or None for a
    method's default); True when this process is now offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return True
    named = [m for m in models if m is not None]
    if named and all(isinstance(m, (str, Path)) and Path(m).expanduser().is_dir() for m in named):
        go_offline()  # local folders need no hub (and peft would look their base model up there)
        return True
    if reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        return False
    go_offline()
    return True
