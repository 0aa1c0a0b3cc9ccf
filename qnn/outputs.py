"""Writing results without losing earlier ones: one mechanism for every command that writes.

- `check_output(path, kind, inputs)`: before any work, an output must not be one of the command's inputs (or hold
  one), must not be a file where a folder is wanted (or the reverse), and its folder must be writable.
- `RunLock`: while a run writes a folder, a second run into the same folder is refused.
- `StagedDir`: a run writes into `<out>.partial` beside `<out>`; only when it has finished is the earlier `<out>`
  replaced (rename aside, rename into place, delete the old one). A crash leaves `<out>` as it was, and the
  `.partial` folder is what `--resume` continues.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qnn.errors import QNNError

PARTIAL = ".partial"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | Path, kind: str = "file", inputs: tuple = ()) -> Path:
    """Validate an output path up front. kind: 'file' or 'dir'. `inputs`: paths the command reads."""
    p = Path(path)
    if not str(path).strip():
        raise QNNError("output path is empty")
    if kind == "dir" and (p.resolve() == Path.cwd().resolve() or p.resolve() in Path.cwd().resolve().parents):
        raise QNNError(f"output {p} is the current folder (or holds it); give a folder of its own")
    if kind == "file" and p.is_dir():
        raise QNNError(f"output {p} is a folder; give a file name")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise QNNError(f"output {p} is a file; give a folder")
    for i in inputs:
        if i is None:
            continue
        i = Path(i)
        ri, rp = i.resolve(), p.resolve()
        if _same(p, i) or ri == rp or (kind == "dir" and rp in ri.parents):
            raise QNNError(f"output {p} is (or holds) the input {i}; write the output elsewhere")
    parent = p.resolve().parent
    while not parent.exists():  # the nearest existing folder decides whether the output can be created
        parent = parent.parent
    if not parent.is_dir():
        raise QNNError(f"output {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QNNError(f"output {p}: folder {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise QNNError(f"output {p} is not writable")
    return p


def holds_results(d: Path) -> bool:
    return d.is_dir() and any(d.iterdir())


class RunLock:
    """An exclusive, non-blocking lock on `<parent>/.<name>.lock` for as long as a run writes `<name>` (and its
    `.partial`). The lock file stays (it is empty); the lock itself goes with the process, even after kill -9."""

    def __init__(self, out: str | Path):
        out = Path(out)
        self.path = out.parent / f".{out.name}.lock"
        self.out = out
        self.fd = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise QNNError(f"cannot write beside {self.out}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise QNNError(f"another run is writing {self.out} (lock {self.path} is held); wait for it or use "
                           f"another output") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class StagedDir:
    """Where a run into `out` writes, and the swap that publishes it.

    mode 'new': fresh staging folder (an earlier `<out>.partial` is removed only with overwrite);
    mode 'resume': continue `<out>.partial` if present, else the finished `out` in place, else start fresh.
    `work` is the folder to write; `publish()` moves it to `out` (no-op when `work` is `out`).
    """

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False,
                 what: str = "run"):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + PARTIAL)
        self.overwrite, self.resume, self.what = overwrite, resume, what
        check_output(self.out, "dir")
        if self.partial.exists() and not self.partial.is_dir():
            raise QNNError(f"{self.partial} is a file; remove it or choose another output")
        if resume:
            self.work = self.partial if self.partial.is_dir() else (self.out if holds_results(self.out) else self.partial)
        else:
            if holds_results(self.out) and not overwrite:
                raise QNNError(f"output {self.out} holds an earlier {what}; pass --overwrite to replace it (it is "
                               f"replaced only when the new {what} has finished) or --resume to continue it")
            if holds_results(self.partial) and not overwrite:
                raise QNNError(f"{self.partial} holds an interrupted {what}; pass --resume to continue it or "
                               f"--overwrite to start again")
            self.work = self.partial
        self.resuming = resume and holds_results(self.work)

    def prepare(self) -> Path:
        """Create the folder to write (call after validation: nothing is touched before)."""
        try:
            if not self.resume and self.partial.exists():
                shutil.rmtree(self.partial)  # an interrupted earlier attempt; `out` itself is untouched
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QNNError(f"cannot create {self.work}: {e.strerror}") from None
        return self.work

    def publish(self) -> Path:
        """Replace `out` with the finished work: the earlier `out` is renamed aside, then deleted."""
        if self.work == self.out:
            return self.out
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
        os.replace(self.work, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.work = self.out
        return self.out
