"""Writing results without losing earlier ones: one mechanism for every command that writes.

- `check_output(path, kind, inputs)`: before any work, an output must not be one of the command's inputs (or hold
  one), must not be a file where a folder is wanted (or the reverse), and its folder must be writable.
- `RunLock`: while a run writes a folder, a second run into the same folder is refused.
- `StagedDir`: a run writes into `<out>.partial` beside `<out>`; only when it has finished is the earlier `<out>`
  replaced (rename aside, rename into place, delete the old one). A crash leaves `<out>` as it was, and the
  `.partial` folder is what `--resume` continues. It holds the `RunLock` from its decision to the swap.
"""

from __future__ import annotations

import json
import math
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


#: a training run's own files: no command writes over them in another run's folder, --overwrite or not
RUN_FILES = ("model.pt", "last.pt", "config.json", "metrics.json")


def _run_folder(d: Path) -> bool:
    """Whether `d` holds a training run (its resume point, or a finished checkpoint with its config)."""
    return (d / "last.pt").is_file() or ((d / "model.pt").is_file() and (d / "config.json").is_file())


def check_output(path: str | Path, kind: str = "file", inputs: tuple = (), overwrite: bool | None = None) -> Path:
    """Validate an output path up front. kind: 'file' or 'dir'. `inputs`: paths the command reads. For a file,
    `overwrite` False refuses an existing file (True replaces it; None: the caller stages and decides itself), and a
    training run's own files (RUN_FILES in a folder holding a run) are refused whatever it says."""
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
        if _same(p, i) or ri == rp or (kind == "dir" and rp in ri.parents) or ri in rp.parents:
            raise QNNError(f"output {p} is, holds or lies inside the input {i}; write the output elsewhere")
    parent = p.resolve().parent
    while not parent.exists():  # the nearest existing folder decides whether the output can be created
        parent = parent.parent
    if not parent.is_dir():
        raise QNNError(f"output {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QNNError(f"output {p}: folder {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise QNNError(f"output {p} is not writable")
    if kind == "file" and overwrite is not None:
        if p.name in RUN_FILES and _run_folder(p.parent):
            raise QNNError(f"output {p} is a file of the training run in {p.parent}; write elsewhere")
        if p.exists() and not overwrite:
            raise QNNError(f"output {p} exists; pass --overwrite to replace it, or choose another path")
    return p


def holds_results(d: Path) -> bool:
    return d.is_dir() and any(d.iterdir())


class RunLock:
    """An exclusive, non-blocking lock on `<parent>/.<name>.lock` for as long as a run writes `<name>` (and its
    `.partial`). The lock goes with the process, even after kill -9; the file is removed on release (and a folder
    made only to hold it), so a command leaves nothing behind, refused or not. A lock file removed by its holder
    while another process opened it is detected (its inode is no longer the path's) and taken again."""

    def __init__(self, out: str | Path):
        out = Path(out)
        self.path = out.parent / f".{out.name}.lock"
        self.out = out
        self.fd = None
        self.made: list[Path] = []

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return self
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.made = missing
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
            try:
                same = os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return self
            os.close(self.fd)  # the holder released and removed it between our open and our lock: take the new one
            self.fd = None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still held: whoever opens the path next makes a fresh file
            except OSError:
                pass
            os.close(self.fd)  # closing releases the flock
            self.fd = None
        for d in self.made:  # folders made only for the lock, if the run left nothing in them
            try:
                d.rmdir()
            except OSError:
                break
        self.made = []


def remove_stale_temps(folder: Path) -> None:
    """Delete the half-written files a killed atomic write left (`.<name>.*.tmp`, `qnn.checkpoint`'s pattern): the
    caller holds the run's lock, so no live writer owns them."""
    for f in folder.glob(".*.tmp"):
        if f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)


class StagedDir:
    """Where a run into `out` writes, and the swap that publishes it. A context manager: it holds the run's lock from
    the decision (is there an earlier result? what does --resume continue?) to the swap, so two runs can neither both
    decide that `out` is free nor publish over each other.

    A new run writes a fresh `<out>.partial` (an earlier `.partial` is removed only with overwrite). With `resume`,
    it continues `<out>.partial` if that holds anything, else `out` in place if `out` is a run that can be resumed
    (holds `marker`), else starts fresh; an `out` holding other results is never replaced without overwrite.
    `work` is the folder to write; `publish()` moves it to `out` (no-op when `work` is `out`).
    """

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False, what: str = "run",
                 marker: str | None = None, inputs: tuple = (), lock: bool = True):
        self.out = check_output(out, "dir", inputs)
        if self.out.name.endswith(PARTIAL):
            raise QNNError(f"output {self.out}: names ending in '{PARTIAL}' are kept for the staging folders of runs")
        self.partial = self.out.with_name(self.out.name + PARTIAL)
        self.old = self.out.with_name(f".{self.out.name}.old")
        self.overwrite, self.resume, self.what, self.marker = overwrite, resume, what, marker
        self.lock = RunLock(self.out) if lock else None
        self.work: Path | None = None
        self.resuming = False
        self.created = False  # whether prepare() made `work` afresh (a failure then removes it again)

    def __enter__(self) -> "StagedDir":
        if self.lock is not None:
            self.lock.__enter__()
        try:
            self._recover()
            self._decide()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, exc_type=None, exc=None, tb=None) -> None:
        try:  # a failure leaves no staging folder this run made and that holds nothing to resume (no marker)
            if exc_type is not None and issubclass(exc_type, Exception) and self.created and self.work == self.partial \
                    and not (self.marker and (self.work / self.marker).is_file()):
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            if self.lock is not None:
                self.lock.__exit__()

    def _recover(self) -> None:
        """Finish a swap a crash interrupted: between its two renames `out` is missing and the earlier result waits
        in `.<out>.old` (put it back; the finished work is still in `.partial` for --resume to publish); after
        them the earlier result is superseded (delete it)."""
        if self.old.exists():
            if self.out.exists():
                shutil.rmtree(self.old, ignore_errors=True)
            else:
                os.replace(self.old, self.out)

    def _decide(self) -> None:
        resume_hint = " or --resume to continue it" if self.marker else ""
        if self.partial.exists() and not self.partial.is_dir():
            raise QNNError(f"{self.partial} is a file; remove it or choose another output")
        if self.resume:
            if holds_results(self.partial):
                self.work = self.partial
            elif self.marker and (self.out / self.marker).is_file():
                self.work = self.out
            elif holds_results(self.out) and not self.overwrite:
                raise QNNError(f"--resume: {self.out} holds results that are not a {self.what} to resume; pass "
                               f"--overwrite to replace them, or choose another output")
            else:
                self.work = self.partial
        else:
            if holds_results(self.out) and not self.overwrite:
                raise QNNError(f"output {self.out} holds an earlier {self.what}; pass --overwrite to replace it (it is "
                               f"replaced only when the new {self.what} has finished){resume_hint}")
            if holds_results(self.partial) and not self.overwrite:
                raise QNNError(f"{self.partial} holds an interrupted {self.what}; pass "
                               f"{'--resume to continue it or ' if self.marker else ''}--overwrite to start again")
            self.work = self.partial
        self.resuming = self.resume and holds_results(self.work)

    def follow(self) -> Path:
        """For a data-parallel rank other than 0: the folder rank 0 prepared (read after a barrier)."""
        self.work = self.partial if self.partial.is_dir() else self.out
        return self.work

    def prepare(self) -> Path:
        """Create the folder to write (call after validation: nothing is touched before)."""
        try:
            if not self.resume and self.partial.exists():
                shutil.rmtree(self.partial)  # an interrupted earlier attempt; `out` itself is untouched
            self.created = not self.work.exists()
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QNNError(f"cannot create {self.work}: {e.strerror}") from None
        return self.work

    def publish(self) -> Path:
        """Replace `out` with the finished work: the earlier `out` is renamed aside, the work renamed into place,
        then the earlier one deleted (a crash in between is repaired by the next run's `_recover`)."""
        remove_stale_temps(self.work)
        if self.work == self.out:
            return self.out
        if self.out.exists():
            os.replace(self.out, self.old)
        os.replace(self.work, self.out)
        shutil.rmtree(self.old, ignore_errors=True)
        self.work = self.out
        return self.out


def read_results_json(path: str | Path, what: str = "results file") -> dict:
    """A results file read back (to resume, compare or render): a JSON object whose numbers are all finite, whose
    percentages (`*_pct`, `*acc*`, `asr*`) lie in [0, 100] and whose durations and counts (`*seconds*`, `n_*`) are
    not negative; one line naming the first value that is not."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QNNError(f"{path}: not a readable {what} ({type(e).__name__}); move it away or re-run what made it") \
            from None
    if not isinstance(obj, dict):
        raise QNNError(f"{path}: a {what} must be a JSON object")

    def check(v, where: str, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():  # values keyed by bit-width ({"4": 81.2}) are what their parent's key names
                check(x, f"{where}.{k}", key if str(k).isdigit() else str(k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                check(x, f"{where}[{i}]", key)
        elif isinstance(v, float) and not math.isfinite(v):
            raise QNNError(f"{path}: {where} is {v}; a {what} holds finite numbers only")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            k = key.lower()
            if (k.endswith("_pct") or "acc" in k or k.startswith("asr")) and not 0 <= v <= 100:
                raise QNNError(f"{path}: {where} = {v} is not a percentage in [0, 100]")
            if ("seconds" in k or k.startswith("n_")) and v < 0:
                raise QNNError(f"{path}: {where} = {v} must not be negative")

    check(obj, path.name, "")
    return obj


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
