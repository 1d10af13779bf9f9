"""Reading the small JSON files of checkpoints, bundles and generation configs, with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: Path, error: type[Exception], what: str = "a JSON object") -> dict:
    """The JSON object in `path`; invalid JSON or another JSON value raises `error` naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path}: not valid JSON ({problem})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not {what} (expected a JSON object)")
    return value
