"""Fail fast without a network: one quick look at the hub before huggingface_hub's retries (about 23 s and
eleven lines of warnings) would find out, then offline mode so that a cached copy is used at once."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable() -> bool:
    """True when the hub's host cannot be reached directly; False when it can, or when offline mode or a
    proxy (which a direct probe cannot judge) is set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in _PROXIES):
        return False
    url = urlparse(constants.ENDPOINT)
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS):
            return False
    except OSError:
        return True


@contextlib.contextmanager
def offline_when_unreachable() -> Iterator[bool]:
    """Within the block, huggingface_hub and datasets run offline if the hub cannot be reached.
    Yields whether offline mode was switched on."""
    if not hub_unreachable():
        yield False
        return
    from huggingface_hub import constants

    saved = [(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)]
    with contextlib.suppress(ImportError):
        import datasets.config

        saved.append((datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE))
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield True
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
