"""Whether the Hugging Face hub can be reached: asked once per process, with a short timeout, by every
loader (models, calibration data, evaluation tasks), so that offline runs fail or fall back at once
instead of retrying each file."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def _offline_flag() -> bool:
    from huggingface_hub import constants

    values = {os.environ.get(k, "").strip().lower()
              for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    return bool(constants.HF_HUB_OFFLINE) or bool(values & {"1", "true", "yes", "on"})


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub (or the proxy to it) accepts a connection; False when offline mode
    is set. Asked once per process, with a short timeout, instead of letting every file request retry."""
    if _offline_flag():
        return False
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    target = urlparse(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else endpoint
    host = target.hostname or "huggingface.co"
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


__all__ = ["hub_reachable"]
