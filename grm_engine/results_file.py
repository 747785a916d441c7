"""The `score` command's results file: where it may go, what produced it, who writes it, and what it already holds.

  - check_output_path: a directory, a missing or unwritable folder, the --data file itself or a file anywhere in a
    --data directory (read as data) is refused before any model is loaded.
  - FILE.meta.json (the sidecar) records the run that produced FILE: model, meta RM, data, format, the prompt
    template (and the sha256 of its content) and the sampling settings. It is created before the first row,
    atomically and exclusively (a temp file hard-linked into place), and a resume whose run differs is refused,
    naming the differing fields.
  - the sidecar is also the lock: a run holds an exclusive flock on it while it writes, so a second identical
    command fails at once instead of writing every id twice.
  - an existing FILE that is not ours (no sidecar, and not a file of results rows with this run's settings, which
    earlier versions wrote without a sidecar) is refused and left byte for byte as it was.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import tempfile

SIDECAR_SUFFIX = ".meta.json"
SIDECAR_KIND = "grm-engine score results"
SIDECAR_VERSION = 1


class ResultsFileError(Exception):
    """The output path or the existing results file cannot be used; the message says why and what to do."""


def check_output_path(out: str, data: str) -> None:
    """Refuse an --out that cannot be written, or that would destroy or be read as the input data."""
    if os.path.isdir(out):
        raise ResultsFileError(f"--out {out} is a directory; give a file path, e.g. {os.path.join(out, 'results.jsonl')}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ResultsFileError(f"--out {out}: the folder {folder} does not exist; create it first")
    if os.path.exists(out) and not os.path.isfile(out):
        raise ResultsFileError(f"--out {out} exists and is not a regular file")
    try:  # os.access says yes to root on a read-only mount: try it
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".grm-engine-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        raise ResultsFileError(f"--out {out}: cannot write in the folder {folder} ({e.strerror})") from None
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise ResultsFileError(f"--out {out} is not writable")
    if os.path.isfile(data) and os.path.exists(out) and os.path.samefile(data, out):
        raise ResultsFileError(f"--out {out} is the --data file; give another --out")
    # every .json/.jsonl file under a --data folder is read: the results and their sidecar (.meta.json) anywhere
    # in it would be read as data by the next run
    if os.path.isdir(data):
        real_data = os.path.realpath(data)
        if os.path.commonpath([real_data, os.path.realpath(folder)]) == real_data:
            raise ResultsFileError(f"--out {out} is inside the --data folder {data}, where the next run would read "
                                   "it (and its .meta.json) as data; give an --out outside it")


def run_record(args, settings: dict) -> dict:
    """What produced a results file: the inputs (absolute paths) and every option that changes its rows. The
    prompt template is recorded by the hash of its file's content, so a resume under an edited or another
    template file (scores that are not comparable) is refused even when its path is the same."""
    from .templates import resolve_template

    def absolute(path):
        return os.path.abspath(path) if path else None
    return {"model": absolute(args.model), "meta_rm": absolute(args.meta_rm), "data": absolute(args.data),
            "format": args.format, "skip_invalid": args.skip_invalid, "dtype": args.dtype,
            "template_sha256": resolve_template(args.template).sha256, **settings}


def open_results(path: str, run: dict, settings: dict) -> tuple[set[str], int]:
    """Lock the results file for this run and read the ids it already holds -> (done ids, lock fd).

    The lock fd stays open (the lock with it) until the process ends or the caller closes it."""
    sidecar = path + SIDECAR_SUFFIX
    for _ in range(3):  # a retry only when another process replaced a stale sidecar meanwhile
        if not os.path.exists(sidecar):
            if os.path.exists(path):
                _scan_rows(path, settings, legacy=True)  # a file without sidecar: ours only if every row is
                print(f"{path}: no {sidecar}; its rows carry this run's settings (a file from an earlier "
                      f"grm-engine), so it is resumed and the sidecar written", file=sys.stderr)
            _create_sidecar(sidecar, run)
        handle = _lock(sidecar, path)
        try:
            same_file = os.fstat(handle).st_ino == os.stat(sidecar).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # replaced between our open and our lock
            os.close(handle)
            continue
        recorded = _read_sidecar(sidecar, path)
        differences = [f"{key}: {recorded.get(key)!r} in the file, {run.get(key)!r} now"
                       for key in sorted(set(recorded) | set(run)) if recorded.get(key) != run.get(key)]
        if differences and not os.path.exists(path):  # stale: its results file was removed
            os.unlink(sidecar)
            os.close(handle)
            continue
        if differences:
            os.close(handle)
            raise ResultsFileError(f"{path} holds the results of another run ({sidecar}): "
                                   + "; ".join(differences) + "; use the same options to resume, or a new --out")
        try:
            return read_done_ids(path, settings), handle
        except BaseException:
            os.close(handle)
            raise
    raise ResultsFileError(f"{sidecar} keeps changing under this run (another grm-engine score?); give a new --out")


def read_done_ids(path: str, settings: dict) -> set[str]:
    """Ids already in a results file. A trailing partial line (a killed run) is cut off; a line written
    with other settings is an error (resuming would mix two runs)."""
    if not os.path.exists(path):
        return set()
    done, keep, size = _scan_rows(path, settings, legacy=False)
    if keep < size:
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"{path}: dropped a partial last line (an interrupted write)", file=sys.stderr)
    return done


def _scan_rows(path: str, settings: dict, legacy: bool) -> tuple[set[str], int, int]:
    """-> (ids, bytes of whole lines, file size); raises unless every whole line is a results row with these
    settings. legacy (no sidecar): the file must also hold at least one whole row."""
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    not_ours = (f"{path} exists and is not a grm-engine results file (no {path + SIDECAR_SUFFIX}); it was left "
                "untouched: give a new --out")
    done = set()
    for number, line in enumerate(data[:keep].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add(str(row["id"]))
        except (ValueError, KeyError, TypeError):
            if legacy:
                raise ResultsFileError(not_ours) from None
            raise ResultsFileError(f"{path}, line {number}: not a results line; give a new --out or remove the "
                                   "file") from None
        if not isinstance(row, dict) or row.get("settings") != settings:
            raise ResultsFileError(f"{path}, line {number}: written with settings {row.get('settings')}, this "
                                   f"run has {settings}; use the same options to resume or a new --out")
    if legacy and not done:
        raise ResultsFileError(not_ours)
    return done, keep, len(data)


def _create_sidecar(sidecar: str, run: dict) -> None:
    """Write the sidecar whole under a temp name, then link it into place; if another process got there first,
    its sidecar stays (and the lock and the run comparison decide)."""
    folder = os.path.dirname(os.path.abspath(sidecar))
    handle, temp = tempfile.mkstemp(dir=folder, prefix=".grm-engine-meta-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump({"kind": SIDECAR_KIND, "version": SIDECAR_VERSION,
                       "results_file": os.path.basename(sidecar[:-len(SIDECAR_SUFFIX)]), "run": run}, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, sidecar)
        except FileExistsError:
            pass
    finally:
        os.unlink(temp)


def _lock(sidecar: str, path: str) -> int:
    handle = os.open(sidecar, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(handle)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ResultsFileError(f"another grm-engine score is writing {path} (it holds the lock on {sidecar}); "
                                   "wait for it to finish, or give a new --out") from None
        raise
    return handle


def _read_sidecar(sidecar: str, path: str) -> dict:
    try:
        with open(sidecar, encoding="utf-8") as f:
            content = json.load(f)
    except (ValueError, UnicodeDecodeError):
        content = None
    if not isinstance(content, dict) or content.get("kind") != SIDECAR_KIND or not isinstance(content.get("run"), dict):
        raise ResultsFileError(f"{sidecar} exists and is not a grm-engine sidecar; both it and {path} were left "
                               "untouched: give a new --out")
    return content["run"]
