"""Atomic output: write to a temporary name beside the target, rename only when complete, so a failed or
interrupted run never leaves a partial file (or model directory) that looks finished."""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flashmoe.errors import FlashMoeError

#: The file that marks a flashmoe model directory (manifest.MANIFEST; not imported to keep this module light).
_MODEL_MARKER = "flashmoe.json"


def check_writable(target: str | Path) -> None:
    """Raise FlashMoeError, before any work is done, when target cannot be written: its folder is missing,
    it is a directory, or no file may be made beside it (a read-only folder, /sys, a name too long: atomic_path's
    temporary file is made there and removed)."""
    target = Path(target)
    if target.is_dir():
        raise FlashMoeError(f"{target}: is a directory, not a file to write")
    if not target.parent.is_dir():
        raise FlashMoeError(f"{target}: folder {target.parent} does not exist")
    tmp = _tmp_file(target)
    try:
        tmp.touch(exist_ok=False)
        tmp.unlink()
    except OSError as e:
        raise FlashMoeError(f"{target}: cannot write ({e.strerror or e})") from None


def _tmp_file(target: Path) -> Path:
    """The temporary file beside target that atomic_path writes, of this process."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in target's directory; on normal exit rename it to target, else delete it. The
    temporary files of target that killed earlier runs left are removed first (_remove_stale_tmp)."""
    target = Path(target)
    _remove_stale_tmp(target)
    tmp = _tmp_file(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        raise FlashMoeError(f"{target}: cannot write ({e.strerror or e})") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(target: str | Path, data) -> None:
    """Write data as indented JSON to target atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def check_output_dir(dst: str | Path, force: bool, source: str | Path | None = None) -> None:
    """Raise FlashMoeError, before any work is done, unless model directory `dst` may be written.

    dst may be absent; with force it may also be an empty directory or a flashmoe model directory (it holds
    flashmoe.json), which is then replaced. Refused even with force: dst is `source`, contains it or lies
    inside it (the converter would write into the tree it reads), dst is the current directory or contains
    it, dst is a file or a directory holding anything else, since --force would delete what the user meant
    to keep; a file stands where a folder above dst must be; dst's name is too long.
    """
    dst = Path(dst)
    where = dst.resolve()
    if source is not None and Path(source).is_dir() and Path(source).resolve() in where.parents:
        raise FlashMoeError(f"{dst}: is inside the source {source}; choose another output directory")
    try:
        if not dst.exists() and not dst.is_symlink():
            _check_creatable(dst)
            return
    except OSError as e:  # a name too long, a folder that may not be searched or written (/proc, /sys)
        raise FlashMoeError(f"creating {dst}: {e.strerror or e}") from None
    guarded = [(Path.cwd().resolve(), "the current directory")]
    if source is not None:
        guarded.insert(0, (Path(source).resolve(), f"the source {source}"))
    for path, what in guarded:
        if where == path or where in path.parents:
            raise FlashMoeError(f"{dst}: {'is' if where == path else 'contains'} {what}; choose another output "
                                "directory")
    if not force:
        raise FlashMoeError(f"{dst}: already exists (use --force to replace it)")
    if dst.is_symlink() or not dst.is_dir():
        raise FlashMoeError(f"{dst}: is {'a symbolic link' if dst.is_symlink() else 'a file'}; --force replaces "
                            "only an empty directory or a flashmoe model directory")
    if not (dst / _MODEL_MARKER).is_file() and any(dst.iterdir()):
        raise FlashMoeError(f"{dst}: holds files but is not a flashmoe model directory (no {_MODEL_MARKER}); "
                            "--force replaces only an empty directory or a flashmoe model directory")


@contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary directory beside `dst`; on normal exit put it in dst's place, else delete
    it. An existing dst (a directory that check_output_dir allowed) is moved aside and removed only once the
    new one is in place, so dst is always either the old directory or the complete new one.

    An OSError (a full disk above all) becomes one FlashMoeError line naming the file by its final path
    under dst; one while making the directory (in /proc, a name too long) names dst.
    """
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(dst)
        tmp = _new_dir_beside(dst)
    except OSError as e:
        raise FlashMoeError(f"creating {dst}: {e.strerror or e}") from None
    try:
        try:
            yield tmp
            if dst.exists() or dst.is_symlink():
                old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
                os.rename(dst, old)
                try:
                    os.rename(tmp, dst)
                except OSError:
                    os.rename(old, dst)
                    raise
                shutil.rmtree(old)
            else:
                os.rename(tmp, dst)
        except OSError as e:
            what = str(e.filename or tmp).replace(str(tmp), str(dst))
            reason = "disk full (No space left on device)" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise FlashMoeError(f"writing {what}: {reason}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_creatable(dst: Path) -> None:
    """Raise FlashMoeError (or OSError) unless directory dst, which does not exist, can be made: a file stands
    where a folder above it must be, its name leaves no room for the temporary name beside it, or no folder may
    be made where it goes (tried, and removed at once)."""
    folder = next(folder for folder in dst.parents if folder.exists())  # "." or "/" at worst
    if not folder.is_dir():
        raise FlashMoeError(f"{dst}: {folder} is a file, not a folder")
    longest = os.pathconf(folder, "PC_NAME_MAX") - len(_tmp_name(Path(), "X" * 7 + "-" + "X" * 8))
    if len(os.fsencode(dst.name)) > longest:
        raise FlashMoeError(f"{dst}: the name is too long ({len(os.fsencode(dst.name))} bytes; at most {longest} "
                            "here, for the temporary name .NAME.tmp-PID-XXXXXXXX beside it)")
    _new_dir_beside(folder / dst.name).rmdir()


def _tmp_name(dst: Path, token: str) -> str:
    """The name of the temporary directory beside dst that becomes dst: token is `PID-HEX8` (see
    _remove_stale_tmp)."""
    return f".{dst.name}.tmp-{token}"


def _remove_stale_tmp(target: Path) -> None:
    """Remove what a killed earlier run writing target left beside it (SIGKILL, a power cut: the signals
    flashmoe can catch remove their own): atomic_path's file `.NAME.tmp-PID` and atomic_dir's directory
    `.NAME.tmp-PID-HEX8`, where process PID is gone, so a run writing the same target at this moment keeps its
    own. Never `.NAME.old-*`, which may hold the only copy of an earlier model."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)(-[0-9a-f]{{8}})?")
    for path in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        found = pattern.fullmatch(path.name)
        if found is None or path.is_symlink() or _running(int(found[1])):
            continue
        if found[2] is None and path.is_file():
            path.unlink(missing_ok=True)
        elif found[2] is not None and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether process pid exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _new_dir_beside(dst: Path) -> Path:
    """A new empty directory `.NAME.tmp-PID-XXXXXXXX` beside dst, with the mode any directory gets (0o777 less the
    umask): it becomes dst, which others may then read where the umask allows (tempfile.mkdtemp's 0o700 would
    keep the model to its owner)."""
    while True:
        tmp = dst.with_name(_tmp_name(dst, f"{os.getpid()}-{secrets.token_hex(4)}"))
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
