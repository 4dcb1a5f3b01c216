"""codegen_q_manifest.json: the sha256 and size of every other file of a quantized directory,
written last, so a directory with a manifest is complete and one that matches it is intact."""

from __future__ import annotations

import hashlib
import json
import os

from codegen_q.format.config import FORMAT_VERSION
from codegen_q.format.schema import MANIFEST


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, fsynced (the directory it lands in is renamed into place after)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(directory: str, files: dict[str, dict[str, int | str]]) -> None:
    """``files``: name -> {"sha256", "size"} of every file of ``directory`` but the manifest."""
    write_json(os.path.join(directory, MANIFEST), {"format_version": FORMAT_VERSION, "files": dict(sorted(files.items()))})


def verify_manifest(path: str) -> None:
    """ValueError, in one sentence, unless every file the manifest of ``path`` lists is there with
    its size and checksum."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ValueError(f"{path} has no {MANIFEST}; it is incomplete (pass verify=False / --no-verify to load anyway)")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    for name, want in manifest["files"].items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise ValueError(f"{p} is listed in the manifest but missing")
        if os.path.getsize(p) != want["size"] or sha256_file(p) != want["sha256"]:
            raise ValueError(f"{p} does not match its checksum in {MANIFEST}: the file is corrupt or was modified")
