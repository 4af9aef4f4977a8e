"""A hub id when the model hub cannot be reached: one probe, then the hub client's local cache,
or one line. Without this, the hub client retries for tens of seconds and prints each retry."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from mlx_lens.core.errors import LensError
from mlx_lens.loading.sources import ModelSource

PROBE_SECONDS = 3.0
_YES = ("1", "true", "yes", "on")


def unreachable() -> str | None:
    """Why the hub cannot serve a download now (offline mode, or no TCP connection to its
    endpoint within PROBE_SECONDS), or None. A failed probe turns the hub client's offline mode
    on for this process and the processes it starts, so nothing else waits on the network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _YES:
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        os.environ["HF_HUB_OFFLINE"] = "1"
        return f"no connection to {host}: {exc.strerror or exc}"
    return None


def reachable_or_cached(source: ModelSource) -> ModelSource:
    """`source` itself when it is no hub id or the hub answers; otherwise the hub client's
    cached snapshot of it as a local folder, or a one-line LensError."""
    if source.hub_id is None:
        return source
    reason = unreachable()
    if reason is None:
        return source
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(source.hub_id, local_files_only=True,
                                   cache_dir=constants.HF_HUB_CACHE)
    except Exception as exc:  # not cached (the client's error names no cause a user can act on)
        raise LensError(f"cannot fetch {source.hub_id}: the model hub cannot be reached "
                        f"({reason}) and the model is not in the local cache "
                        f"{constants.HF_HUB_CACHE}") from exc
    return ModelSource(source.name, path=Path(folder))
