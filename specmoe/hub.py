"""Hugging Face hub look-ups that fail in seconds, with one line, when there is no network.

Without a network the hub's clients retry for half a minute before giving up; with
HF_HUB_OFFLINE=1 they fail at once but say little about what to do.  `require_hub`
runs before a model or dataset is looked up on the hub: in offline mode it checks the
local cache, otherwise it makes one short request to the hub first."""

from __future__ import annotations

import os
import threading

from .errors import SpecmoeError, first_line

PROBE_TIMEOUT_S = 4.0

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) forbids the hub."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE
           for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def offline_hint(kind: str, name: str) -> str:
    """The one line for something HF_HUB_OFFLINE=1 keeps from being downloaded."""
    return (f"{kind} {name} is neither a local path nor in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
            f"keeps it from being downloaded (download it once with the network on, or pass a local path)")


def hub_unreachable(kind: str, name: str, reason: str) -> str:
    return (f"{kind} {name} is not a local path and the Hugging Face hub cannot be reached ({reason}); "
            f"without a network, set HF_HUB_OFFLINE=1 to use only the local cache, or pass a local path")


def probe_hub(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers within `timeout` seconds, else why not (in a few words).

    The request runs in a daemon thread so that a hanging name lookup cannot hold it up."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    result: list[str | None] = []

    def request() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            result.append(None)
        except Exception as err:  # noqa: BLE001 - any failure means: not reachable
            text = first_line(err)
            result.append(text)

    thread = threading.Thread(target=request, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout + 1.0)
    if not result:
        return f"no answer from {constants.ENDPOINT} within {timeout:.0f} s"
    return result[0]


def require_hub(kind: str, name: str, repo_type: str = "model", revision: str | None = None,
                cached_file: str | None = "config.json") -> None:
    """Raise SpecmoeError at once where looking `name` up on the hub cannot work.

    kind: "model" or "dataset", for the message; cached_file: a file whose presence in the
    local cache shows that offline mode can load the repository (None: not checked)."""
    if hub_offline():
        if cached_file is None:
            return
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(name, cached_file, revision=revision, repo_type=repo_type)
        except Exception:  # noqa: BLE001 - a name the cache cannot even hold
            found = None
        if not isinstance(found, str):
            raise SpecmoeError(offline_hint(kind, name))
        return
    reason = probe_hub()
    if reason is not None:
        raise SpecmoeError(hub_unreachable(kind, name, reason))
