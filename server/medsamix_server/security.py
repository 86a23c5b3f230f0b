"""Validation of names, paths and archives that come from requests.

Every id, tag and archive member a client sends is hostile until checked here:

* :func:`safe_name` accepts an id or tag only if it is a plain name: letters, digits, ``.``, ``_``, ``-`` (DICOM UIDs
  such as ``1.2.826.0.1`` are fine), not starting with ``.`` or ``-``, no ``..``, no separators, no NUL or control
  characters, at most :data:`MAX_NAME` characters.
* :func:`contained` resolves a path with every symbolic link followed and accepts it only inside its root (so a
  symbolic link placed in the studies folder that points outside is refused, whatever its name).
* :func:`unlinked` is the stricter check for files the server writes or deletes: inside its root and no symbolic
  link on the way at all (MONAI Label copies onto a label path and deletes resolved paths).
* :func:`extract_archive` unpacks a zip or tar file member by member, refusing absolute names, ``..``, links, devices
  and anything that would land outside the target folder, and bounding member count and unpacked bytes.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

MAX_NAME = 128
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class RequestError(ValueError):
    """A request field that is refused; ``status`` is the HTTP status to answer with (400 unless said)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def pacs_failed(e: BaseException) -> RequestError:
    """The answer to a PACS that is down, slow or failing (the proxy's HTTP client, the DICOMweb datastore's):
    502 naming the error type, never its text (it may carry the PACS's address or credentials in a URL)."""
    return RequestError(f"the PACS did not answer: {type(e).__name__}", 502)


def safe_name(value: object, what: str) -> str:
    """``value`` if it is a safe id/tag (see the module docstring), else :class:`RequestError` naming ``what``."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{what}: a non-empty name is required")
    if len(value) > MAX_NAME:
        raise RequestError(f"{what}: longer than {MAX_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise RequestError(f"{what}: control characters (NUL, newline ...) are not allowed")
    if ".." in value or not _NAME.match(value):
        raise RequestError(f"{what} {value!r}: only letters, digits, '.', '_' and '-' are allowed (not first: '.', "
                           "'-'; no '..', no path separators)")
    return value


def contained(path: str | os.PathLike[str], root: str | os.PathLike[str], what: str) -> Path:
    """``path`` with every link resolved, if it lies inside ``root`` (also resolved); else :class:`RequestError`
    (403). A missing path is resolved as far as it exists."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and os.path.commonpath([real_root, real]) != real_root:
        raise RequestError(f"{what} resolves outside its folder; refused", status=403)
    return Path(real)


def unlinked(path: str | os.PathLike[str], root: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it lies inside ``root`` with no symbolic link anywhere between ``root`` and it (the path itself
    included, dangling links too); else :class:`RequestError` (403). For files the server writes or deletes: a
    library that copies onto ``path`` or removes its resolved target would otherwise write or delete whatever a
    link placed in the folder points to."""
    real_root = os.path.realpath(root)
    lexical = os.path.normpath(os.path.join(real_root, os.path.relpath(os.path.abspath(path), os.path.abspath(root))))
    if os.path.commonpath([real_root, lexical]) != real_root or os.path.realpath(path) != lexical:
        raise RequestError(f"{what} is (or lies under) a symbolic link or outside its folder; refused", status=403)
    return Path(lexical)


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str], max_members: int,
                    max_bytes: int) -> list[Path]:
    """Unpack a zip or tar archive into the existing folder ``dest``, member by member.

    Only regular files and folders are written; absolute names, ``..``, links (symbolic or hard), devices and
    FIFOs are refused, as is anything whose resolved target is outside ``dest``. A zip member whose mode has no
    file-type bits (as Python's ``zipfile.writestr`` and Windows tools write them) is a regular file. Nothing is
    kept on refusal: the caller removes ``dest``.

    Returns:
        The files written.

    Raises:
        RequestError: Not an archive, a refused member, more than ``max_members`` members or more than
            ``max_bytes`` unpacked bytes (413); a damaged, encrypted or unsupported member, or two members that
            write one name (400, naming the member, never a server path).
    """
    current = [""]
    try:
        return _extract(archive, dest, max_members, max_bytes, current)
    except RequestError:
        raise
    except (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, tarfile.TarError, zlib.error,
            ValueError, UnicodeError) as e:
        which = f"member {current[0]!r}" if current[0] else "archive"
        raise RequestError(f"the archive cannot be unpacked: {which} is damaged, encrypted, of an unsupported "
                           f"kind or written twice ({type(e).__name__})") from None


def _extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str], max_members: int, max_bytes: int,
             current: list[str]) -> list[Path]:
    dest_real = os.path.realpath(dest)
    written: list[Path] = []
    total = 0

    def target(name: str) -> Path:
        if not name or name.startswith(("/", "\\")) or "\x00" in name or re.match(r"^[A-Za-z]:", name):
            raise RequestError(f"archive member {name!r}: absolute names are not allowed")
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts) or not parts:
            raise RequestError(f"archive member {name!r}: '..' is not allowed")
        out = os.path.realpath(os.path.join(dest_real, *parts))
        if os.path.commonpath([dest_real, out]) != dest_real:
            raise RequestError(f"archive member {name!r} would be written outside the upload folder")
        return Path(out)

    def count(size: int) -> None:
        nonlocal total
        total += size
        if total > max_bytes:
            raise RequestError(f"archive unpacks to more than {max_bytes} bytes", status=413)

    def write(name: str, is_dir: bool, open_member: Callable[[], IO[bytes] | None]) -> None:
        """Create the folder or copy the member (bounded) into a file that must not exist yet."""
        out = target(name)
        if is_dir:
            out.mkdir(parents=True, exist_ok=True)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        src = open_member()
        if src is None:
            raise RequestError(f"archive member {name!r} cannot be read")
        with src, open(out, "xb") as dst:
            _copy_bounded(src, dst, count)
        written.append(out)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
            if len(infos) > max_members:
                raise RequestError(f"archive has {len(infos)} members; at most {max_members} are allowed", 413)
            for info in infos:
                current[0] = info.filename
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise RequestError(f"archive member {info.filename!r}: links and special files are refused")
                write(info.filename, info.is_dir(), lambda info=info: z.open(info))
        return written
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError):
        raise RequestError("the upload is not a zip or tar archive") from None
    with tf:
        n = 0
        for member in tf:
            current[0] = member.name
            n += 1
            if n > max_members:
                raise RequestError(f"archive has more than {max_members} members", 413)
            if not (member.isfile() or member.isdir()):
                raise RequestError(f"archive member {member.name!r}: links and special files are refused")
            write(member.name, member.isdir(), lambda member=member: tf.extractfile(member))
    return written


def _copy_bounded(src, dst, count) -> None:  # type: ignore[no-untyped-def]
    while True:
        chunk = src.read(1 << 20)
        if not chunk:
            return
        count(len(chunk))
        dst.write(chunk)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a file or folder (not following links out of it); missing is fine."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.exists():
        shutil.rmtree(p, ignore_errors=True)


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under ``path`` (links not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total
