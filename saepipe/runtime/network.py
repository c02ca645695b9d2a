"""Is the Hugging Face hub reachable? Asked once, quickly, before anything downloads.

Without a network, ``huggingface_hub`` retries every request with back-off (about 35 s for one
dataset) and logs each retry; saepipe asks one TCP connection instead (``CONNECT_TIMEOUT`` seconds)
and, when it fails, reads from the local cache only or fails at once with a message that says why.
``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) skips the question: offline on purpose.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

CONNECT_TIMEOUT = 3.0
"""Seconds one connection attempt to the hub may take."""

_TRUE = ("1", "true", "yes", "on")


def offline_by_choice() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_endpoint() -> tuple[str, int]:
    """(host, port) of the hub (``HF_ENDPOINT``, default https://huggingface.co)."""
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.lru_cache(maxsize=1)
def _probe(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot connect to {host}:{port} ({err.strerror or err})"


def hub_unreachable() -> str | None:
    """Why the hub cannot be used now (offline mode, or no connection), or None when it can."""
    if offline_by_choice():
        return "offline mode is on (HF_HUB_OFFLINE)"
    host, port = hub_endpoint()
    return _probe(host, port, CONNECT_TIMEOUT)


__all__ = ["CONNECT_TIMEOUT", "hub_endpoint", "hub_unreachable", "offline_by_choice"]
