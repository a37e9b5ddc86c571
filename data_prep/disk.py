"""Room on disk: a run refused before it starts when its checkpoints will not fit, and a full
disk met anyway reported in one line (which path, how many bytes) instead of a library's
traceback (``torch.save``'s ``basic_ios::clear: iostream error``, PIL's ``OSError``).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .compose import ConfigError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_QUOTA_WORDS = ("no space left", "quota", "insufficientstorage", "entitytoolarge")  # object stores say it in words


class NoRoom(ConfigError):
    """The scratch (or local run) dir has less room than the run's checkpoints need: refused
    before anything started (``Exit.CONFIG``)."""


class DiskFull(RuntimeError):
    """A write met a full disk or a quota; the message is the one line a person needs."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes of the filesystem holding ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_room(path: str | os.PathLike, needed: float, what: str) -> None:
    """Raise :class:`NoRoom` naming ``path``, its free and the ``needed`` bytes when short."""
    free = free_bytes(path)
    if free < needed:
        raise NoRoom(
            f"no room on disk: {path} has {free:,} bytes free, {what} need about {int(needed):,}; free space "
            "there, point output_dir at a larger disk or lower train.keep_checkpoints"
        )


def is_full(exc: BaseException, path: str | os.PathLike | None = None, expected: float = 0) -> bool:
    """Whether ``exc`` (or an exception it came from) is a full disk or a quota: ENOSPC/EDQUOT,
    an object store's quota error, or a failed write where ``path`` has less than ``expected``
    bytes free (``torch.save`` loses the errno: "unexpected pos")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        if any(word in str(seen).lower() for word in _QUOTA_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    if path is not None and "://" not in str(path) and isinstance(exc, (OSError, RuntimeError)):
        try:
            return free_bytes(path) < max(expected, 1 << 20)
        except OSError:
            return False
    return False


def full_message(path: str | os.PathLike, exc: BaseException, expected: float = 0, then: str = "") -> str:
    """One line: where the write failed, why, the free bytes there and the bytes expected."""
    why = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else os.strerror(errno.ENOSPC)
    try:
        free = "an object store's quota" if "://" in str(path) else f"{free_bytes(path):,} bytes free there"
    except OSError:
        free = "free space unknown"
    need = f", it needs about {int(expected):,}" if expected else ""
    return f"disk full: writing {path} failed ({why}): {free}{need}{'; ' + then if then else ''}"


@contextmanager
def reporting_full(
    path: str | os.PathLike, expected: float = 0, then: str = "", cleanup: Callable[[], None] | None = None
) -> Iterator[None]:
    """Writes to ``path`` inside; a full disk or quota met there runs ``cleanup`` and becomes a
    one-line :class:`DiskFull`; any other error passes unchanged."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DiskFull) or not is_full(e, path, expected):
            raise
        if cleanup is not None:
            cleanup()
        raise DiskFull(full_message(path, e, expected, then)) from None


def one_line(exc: BaseException) -> str:
    """The one line of a :class:`DiskFull` that came back wrapped (a Ray task's error carries
    the remote traceback in its text)."""
    lines = [line for line in str(exc).splitlines() if "disk full: " in line]
    return lines[-1][lines[-1].index("disk full: ") :] if lines else str(exc)
