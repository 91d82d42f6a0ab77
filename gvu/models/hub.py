"""Where a model's files are: a local folder, or a hub id resolved in the local hub cache only (no download at
run time; the machines that train often have no hub access)."""

from __future__ import annotations

from gvu.config import ConfigError, resolve_path


def local_checkpoint(path: str, example: str) -> str:
    """model.path as a local folder (relative: the cwd, then the repo), or a cached hub id like `example`;
    ConfigError naming model.path and the fix otherwise."""
    found = resolve_path(path)
    if found.exists():
        return str(found)
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise ConfigError(f"model.path={path!r}: no such folder, and not a hub id like {example}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(path, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"model.path={path!r} is not in the local hub cache; download it first (`hf download {path}`) or set "
            "model.path to a local folder"
        ) from None
