"""Samples that take minutes to draw, cached on disk by a hash of everything they depend on: A*-PO's stage 1
(common/prompt_scores.py) and reward.py's policy pairs. A second run with the same settings loads them."""
import hashlib
import json
import os

from common.model_sources import resolve_model


def model_fingerprint(name: str) -> str:
    """The name of a hub model; for a local folder, its path plus the size and mtime of its weight files (retraining
    in place changes it)."""
    path = resolve_model(name)
    if not os.path.isdir(path):
        return name
    stats = sorted((f, os.path.getsize(os.path.join(path, f)), int(os.path.getmtime(os.path.join(path, f))))
                   for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    return json.dumps([os.path.abspath(path), stats])


def prompts_digest(rows) -> str:
    """A hash of the rows' prompts, for a cache key."""
    return hashlib.sha256(json.dumps([r["prompt"] for r in rows]).encode()).hexdigest()


def cache_path(folder: str, key: dict) -> str:
    """{folder}/<hash of key>.json."""
    return os.path.join(folder, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")


def load_cached(path: str):
    """The value cached at `path`, or None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_cached(path: str, value: dict) -> None:
    """Write `value` to `path` atomically: a half-written file is never read as a cache."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(value, f)
    os.replace(f"{path}.tmp{os.getpid()}", path)
