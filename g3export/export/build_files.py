"""The files of a build directory: hashing, and the checks `load_build` makes before anything
opens them (g3export.export.manifest says why a build directory is untrusted input).

Every name a manifest gives (its `files` table, the tokenizer, component graphs, engines, and the
external-data files the .onnx graphs point at) must be a plain file name, no separators, that
resolves after symlinks inside the build directory to a regular file (never a FIFO or device,
which would block a reader), and be listed in `files` with its size and sha256. Sizes are always
checked; hashes unless the caller opts out.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError

MANIFEST = "manifest.json"  # the one file that makes a directory a g3export build


@dataclass(frozen=True)
class FileEntry:
    """A file of the build, as the manifest's `files` table records it."""

    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


def rebuild_hint(path: Path) -> str:
    return f"rebuild it with `g3export build ... --out {path} --force`"


def sha256_file(path: Path, bar=None, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
            if bar is not None:
                bar.update(len(b))
    return h.hexdigest()


def hash_files(root: Path, names: list[str], progress: bool, desc: str,
                known: dict[str, dict] | None = None) -> dict[str, FileEntry]:
    """{name: FileEntry} of files in `root`, with one progress bar over the bytes it reads.

    known: digests taken as the files were written (the streamed weights:
    g3export.export.stream), {name: {"size", "sha256", "mtime_ns"}}; used when the file's size
    and mtime are still those recorded (a step that rewrites a file afterwards gets it hashed
    again), so a build does not read its weights back.
    """
    from tqdm import tqdm

    out, todo = {}, []
    for n in names:
        st = (root / n).stat()
        k = (known or {}).get(n)
        if k is not None and (k["size"], k["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            out[n] = FileEntry(k["size"], k["sha256"])
        else:
            todo.append(n)
    total = sum((root / n).stat().st_size for n in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
              leave=False) as bar:
        for n in todo:
            p = root / n
            out[n] = FileEntry(p.stat().st_size, sha256_file(p, bar))
    return dict(sorted(out.items()))


def regular_file(path: Path) -> bool:
    """True for a regular file (after symlinks)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def inside(root: Path, p: Path) -> bool:
    """Whether `p` resolves (after symlinks) to a path inside `root`."""
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def short(v: Any) -> str:
    """A value for a one-line message: JSON, at most 40 characters."""
    try:
        r = json.dumps(v)
    except (TypeError, ValueError):
        r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def plain_name(root: Path, name: Any, entry: str) -> Path:
    """root/name when `name` is a plain file name that stays inside root and is a regular file;
    otherwise BuildError naming the manifest `entry`."""
    hint = rebuild_hint(root)
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name)):
        raise BuildError(f"{root}: manifest entry `{entry}` names {short(name)}, which is not a "
                         f"plain file name in the build directory; " + hint)
    p = root / name
    if not inside(root, p):
        raise BuildError(f"{root}: manifest entry `{entry}` ({name}) resolves outside the build "
                         f"directory (a symlink); " + hint)
    if not p.exists():
        raise BuildError(f"{root} is missing {name} (listed in its manifest as `{entry}`); "
                         + hint)
    if not regular_file(p):
        raise BuildError(f"{root}: manifest entry `{entry}` ({name}) is not a regular file; "
                         + hint)
    return p


def external_data(onnx_path: Path) -> list[str]:
    """The external-data locations an .onnx graph names (the files of its weights). Parses the
    graph protobuf without its weights (small), with onnx (not onnx_ir: no torch either)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # a hostile or truncated protobuf: DecodeError and friends
        raise BuildError(f"{onnx_path} is not a readable ONNX graph ({type(e).__name__}); "
                         + rebuild_hint(onnx_path.parent)) from None
    tensors = []

    def collect(g) -> None:  # a graph's (or local function's) tensors and its subgraphs'
        tensors.extend(getattr(g, "initializer", ()))
        for st in getattr(g, "sparse_initializer", ()):  # a sparse tensor: two dense parts
            tensors.extend((st.values, st.indices))
        for n in g.node:
            for a in n.attribute:
                tensors.extend(([a.t] if a.HasField("t") else []) + list(a.tensors))
                for st in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(
                        a.sparse_tensors):
                    tensors.extend((st.values, st.indices))
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    collect(sub)

    for g in [model.graph, *model.functions]:  # If branches and local functions, recursively
        collect(g)
    locations = set()
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    return sorted(locations)


def check_files(root: Path, files: dict[str, FileEntry], refs: dict[str, str],
                check_hashes: bool = True, progress: bool = False) -> None:
    """`files`: the manifest's table; `refs`: {name: manifest entry} of every file a runtime
    opens. Each must be a confined regular file, listed in `files`, of the listed size and
    (check_hashes) sha256; so must the external data of every referenced .onnx graph."""
    hint = rebuild_hint(root)
    if not files:
        raise BuildError(f"{root}: manifest entry `files` is empty: nothing can be checked; "
                         + hint)
    for name in files:
        plain_name(root, name, f"files.{name}")
    refs = dict(refs)
    checked: set[str] = set()
    for name, entry in list(refs.items()):
        plain_name(root, name, entry)
        if name not in files:
            raise BuildError(f"{root}: {name} (manifest entry `{entry}`) is not listed in "
                             f"`files` with a size and sha256; " + hint)
        if name.endswith(".onnx"):  # the graph's bytes are checked before it is parsed
            _check(root, files, [name], check_hashes, progress)
            checked.add(name)
            for loc in external_data(root / name):
                where = f"the external data of {name}"
                plain_name(root, loc, where)
                if loc not in files:
                    raise BuildError(f"{root}: {loc} ({where}) is not listed in `files` with a "
                                     f"size and sha256; " + hint)
    _check(root, files, [n for n in files if n not in checked], check_hashes, progress)


def _check(root: Path, files: dict[str, FileEntry], names: list[str], check_hashes: bool,
           progress: bool) -> None:
    hint = rebuild_hint(root)
    for name in names:
        got = (root / name).stat().st_size
        if got != files[name].size:
            raise BuildError(f"{root / name} has {got} bytes, the manifest says "
                             f"{files[name].size}: the file was altered or truncated; " + hint)
    if check_hashes and names:
        got = hash_files(root, names, progress, "checking hashes")
        for name in names:
            if got[name].sha256 != files[name].sha256:
                raise BuildError(f"{root / name} does not match its sha256 in the manifest: the "
                                 f"file was altered or corrupted; " + hint)
