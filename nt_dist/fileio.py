"""Atomic file writes: a file is either its old self or its new self, never half-written.

Every file nt_dist writes that another process or a later run reads (checkpoint counters,
exported models, results, caches, reports, pipeline and audit files) goes through here: written
to a temporary file in the same folder, flushed, then renamed into place (``os.replace`` is
atomic on POSIX file systems). Each gets the mode a plain ``open()`` would give it under the
process's umask (0644 under umask 022), whatever mode the temporary file was made with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0666 less the umask (0644 under umask 022).

    Read at each write, not once at import: a launcher, a test or the user may set the umask
    after nt_dist is imported."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # /proc/self/status (Linux >= 4.7) reads it without changing it; os.umask can only be read
    # by setting it, which for that instant gives files other threads create the mode 0666
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the most private mask for that instant, should another thread create a file
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give every file under ``folder`` :func:`file_mode`: libraries we hand a folder to write
    into (accelerate's ``save_state`` through safetensors) make theirs 0600, which leaves a
    checkpoint unreadable to the group that may read the rest of the run folder."""
    mode = file_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                path.chmod(mode)
            except PermissionError:  # another user's file (a shard written by a rank run as another user): leave it
                pass


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; the file is as readable as any other
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors file written through a temporary file and a rename: never half-written."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())  # safetensors makes its files 0600; ours are as readable as any other
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, remembered for this process while the file is unchanged
    (path, size, mtime, inode): a frozen model is hashed once per process, not once per use."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]
