"""Sources: folders of documents under the sources root; each subfolder is one partition.

What a source is (``find_sources``, ``scan_source`` and the sensor's fingerprint agree, because they
share ``source_folder_problem`` and ``walk_source``):

- a folder directly under the sources root whose name passes ``source_name_problem``: letters and
  digits of any script, spaces and ``. _ - + ( ) & @ '``, starting with a letter or digit, at most
  128 characters (``my docs`` and ``données`` are sources);
- or a symlink to a folder strictly inside the sources root (an alias); a symlink leading outside the
  root, to the root itself, or nowhere is refused with the reason;
- hidden folders (``.git``) are not sources and are not reported; every other refused entry is.

Scanning a source never reads outside its folder: symlinks that leave it, symlinked folders, device
files, sockets and FIFOs are refused and reported with a reason, never followed or opened. One stray
path never fails the scan: a name that is not valid UTF-8 (reported with ``\\xNN`` escapes), a symlink
loop, a dangling symlink or a folder met twice (bind mount) is reported and skipped.

Two kinds of skip, and why they differ:

- *refused* (the path is not a document: unsupported, too large, outside, not a regular file...):
  a stored document at that path is deleted, as for a deleted file;
- *unreadable* (permissions, I/O error, vanished between listing and reading): nothing is proven
  absent, so the last stored version of everything at or under that path is kept (``SkippedFile.keeps_stored``).
  Only a path missing from a successful listing of its folder counts as deleted (``absent_paths``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embedding_assets.core.formats import SUPPORTED_SUFFIXES

log = logging.getLogger("embedding_pipeline.sources")

MAX_SOURCE_NAME_CHARS = 128
_NAME_PUNCTUATION = frozenset(" ._-+()&@'")


class SourceError(ValueError):
    """A source folder is missing, empty, misnamed, refused or unreadable; the message names the folder and what to do."""


class SourceMissing(SourceError):
    """The source folder does not exist (the only SourceError that ``allow_empty`` turns into an empty source)."""


@dataclass(frozen=True)
class SourceFile:
    """A document file of a source, as listed (not yet read)."""

    relative_path: str  # POSIX path inside the source folder, valid UTF-8
    path: Path  # what to open: the file itself, or a symlink's resolved target inside the source
    size_bytes: int
    mtime_ns: int
    suffix: str


@dataclass(frozen=True)
class SkippedFile:
    """A path that is not indexed this time, with the reason shown to users.

    ``keeps_stored``: the path could not be read (not proven absent), so documents stored at or
    under it keep their last version.
    """

    relative_path: str
    reason: str
    keeps_stored: bool = False


@dataclass
class SourceScan:
    """The result of listing one source: documents to read, and everything skipped with its reason."""

    files: list[SourceFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def unreadable(self) -> list[str]:
        """Relative paths (files or folders) whose stored documents must be kept."""
        return [s.relative_path for s in self.skipped if s.keeps_stored]


@dataclass(frozen=True)
class SourcesListing:
    """The sources found under a root, and the entries refused as sources (escaped name, reason)."""

    sources: list[str]
    refused: list[SkippedFile]


# --------------------------------------------------------------------------- names


def display_name(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by os) shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os gives undecodable bytes as lone surrogates
        return False
    return True


def source_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a source (a folder name and a Dagster partition key), or None."""
    if not name:
        return "the name is empty"
    if not _is_utf8(name):
        return "the folder name is not valid UTF-8; rename it"
    if name.startswith("."):
        return "names starting with '.' are hidden folders, not sources"
    if len(name) > MAX_SOURCE_NAME_CHARS:
        return f"the name is longer than {MAX_SOURCE_NAME_CHARS} characters"
    if "..." in name:
        return "'...' is reserved by Dagster partition keys"
    if not name[0].isalnum():
        return "the name must start with a letter or a digit"
    if name.endswith(" "):
        return "the name must not end with a space"
    for char in name:
        if not (char.isalnum() or char in _NAME_PUNCTUATION or unicodedata.category(char).startswith("M")):
            return f"character {char!r} is not allowed (use letters, digits, spaces and . _ - + ( ) & @ ')"
    return None


def source_dir(root: Path, source: str) -> Path:
    """The folder of ``source`` under ``root``; refuses names that could escape the root or are no partition key."""
    problem = source_name_problem(source)
    if problem:
        raise SourceError(f"source name {display_name(source)!r} is not allowed: {problem} (a folder name under {root})")
    return root / source


# --------------------------------------------------------------------------- the sources root


def source_folder_problem(root: Path, name: str) -> str | None:
    """Why the entry ``name`` directly under ``root`` is not a source folder, or None when it is one.

    Never raises for a problem with the entry itself (a vanished entry is "does not exist").
    """
    problem = source_name_problem(name)
    if problem:
        return problem
    path = root / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode):
        real_root = Path(os.path.realpath(root))
        target = Path(os.path.realpath(path))
        try:
            followed = os.stat(path)
        except OSError as exc:
            return "symlink loop" if exc.errno == errno.ELOOP else f"symlink leads nowhere ({exc.strerror})"
        if target == real_root:
            return "symlink to the sources root itself"
        if not target.is_relative_to(real_root):
            return f"symlink leads outside the sources root (to {display_name(str(target))})"
        info = followed
    if not stat.S_ISDIR(info.st_mode):
        return "a file directly under the sources root belongs to no source: move it into a source folder"
    return None


def find_sources(root: Path) -> SourcesListing:
    """Sources under ``root`` (sorted) and the entries refused as sources, with reasons.

    Hidden entries are neither. A missing root gives an empty listing; an unreadable one raises SourceError.
    """
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return SourcesListing([], [])
    except OSError as exc:
        raise SourceError(f"cannot list the sources root {root} (EMBEDDING_SOURCES_DIR): {exc.strerror}") from exc
    sources, refused = [], []
    for name in sorted(names):
        if name.startswith("."):
            continue
        problem = source_folder_problem(root, name)
        if problem:
            refused.append(SkippedFile(display_name(name), problem))
        else:
            sources.append(name)
    return SourcesListing(sources, refused)


def list_sources(root: Path) -> list[str]:
    """Names of the source folders under ``root`` (sorted); each refused entry is logged as a warning."""
    listing = find_sources(root)
    for entry in listing.refused:
        log.warning("%s/%s is not a source: %s", root, entry.relative_path, entry.reason)
    return listing.sources


# --------------------------------------------------------------------------- walking one source


@dataclass(frozen=True)
class Found:
    """One non-hidden path met by ``walk_source``.

    Exactly one of: ``info`` set (a file candidate: stat with symlinks followed), ``refused`` set
    (not a document), ``read_error`` set (could not be read: keep what is stored under it).
    """

    relative_path: str
    path: Path
    is_symlink: bool = False
    info: os.stat_result | None = None
    refused: str | None = None
    read_error: str | None = None


def _read_error(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "vanished during the scan"
    return f"unreadable: {exc.strerror or exc}"


def walk_source(base: Path) -> Iterator[Found]:
    """Every non-hidden path under ``base`` except folders walked into, depth first.

    Folders are entered only when they are real folders (symlinked folders are reported, never
    followed) not met before (a bind mount of an ancestor would loop forever). A folder that cannot
    be listed is one ``Found`` with ``read_error``. Raises OSError only when ``base`` itself cannot
    be listed.
    """
    seen_folders: set[tuple[int, int]] = set()
    info = os.stat(base)
    seen_folders.add((info.st_dev, info.st_ino))
    pending: list[tuple[Path, str]] = [(base, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            if not prefix:
                raise
            yield Found(prefix[:-1], directory, read_error=_read_error(exc).replace("unreadable", "unreadable folder", 1))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative = prefix + display_name(entry.name)
            path = Path(entry.path)
            if not _is_utf8(entry.name):
                what = "folder name" if entry.is_dir(follow_symlinks=False) else "file name"
                yield Found(relative, path, refused=f"{what} is not valid UTF-8 (shown with \\x escapes): rename it")
                continue
            try:
                is_symlink = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=False)
                if is_dir:
                    folder = entry.stat(follow_symlinks=False)
            except OSError as exc:
                yield Found(relative, path, read_error=_read_error(exc))
                continue
            if is_dir:
                key = (folder.st_dev, folder.st_ino)
                if key in seen_folders:
                    yield Found(relative, path, refused="folder met twice (a bind mount or loop): not walked again")
                else:
                    seen_folders.add(key)
                    pending.append((path, relative + "/"))
                continue
            try:
                info = entry.stat(follow_symlinks=True)
            except OSError as exc:
                if is_symlink and exc.errno == errno.ELOOP:
                    yield Found(relative, path, True, refused="symlink loop")
                elif is_symlink and exc.errno == errno.ENOENT:
                    yield Found(relative, path, True, refused="dangling symlink (its target does not exist)")
                else:
                    yield Found(relative, path, is_symlink, read_error=_read_error(exc))
                continue
            if is_symlink and stat.S_ISDIR(info.st_mode):
                yield Found(relative, path, True, refused="symlinked folder not followed")
                continue
            yield Found(relative, path, is_symlink, info=info)


def metadata_lines(folder: Path) -> list[str]:
    """Sorted ``relative path, size, mtime_ns, mode`` of every file ``walk_source`` meets (no file is
    opened), and ``relative path, reason`` of every path refused or unreadable; what the sensor hashes.

    The mode is in because a chmod that makes a file readable again must look like a change.
    Raises OSError only when ``folder`` itself cannot be listed.
    """
    lines = []
    for found in walk_source(folder):
        if found.info is not None:
            info = found.info
            lines.append(f"{found.relative_path}\x00{info.st_size}\x00{info.st_mtime_ns}\x00{info.st_mode:o}")
        else:
            lines.append(f"{found.relative_path}\x00{found.refused or found.read_error}")
    lines.sort()
    return lines


def scan_source(root: Path, source: str, *, max_file_bytes: int) -> SourceScan:
    """All document files of a source, sorted by relative path, and every path skipped with its reason.

    Raises SourceMissing when the source folder does not exist, SourceError when it is refused
    (bad name, symlink leading outside the root) or cannot be listed. Nothing below the folder
    itself raises: every stray path is one ``SkippedFile``.
    """
    base = source_dir(root, source)
    problem = source_folder_problem(root, source)
    if problem == "does not exist":
        raise SourceMissing(f"source folder {base} does not exist (source {source!r}, EMBEDDING_SOURCES_DIR={root})")
    if problem:
        raise SourceError(f"source folder {base} is refused: {problem} (source {source!r}); nothing was changed")
    real_base = Path(os.path.realpath(base))
    scan = SourceScan()
    try:
        found = list(walk_source(base))
    except OSError as exc:
        raise SourceError(
            f"cannot read the source folder {base}: {exc.strerror or exc}; nothing was changed. "
            "Give the pipeline's user read and execute permission on it."
        ) from exc
    for item in found:
        if item.refused or item.read_error:
            scan.skipped.append(SkippedFile(item.relative_path, item.refused or item.read_error, bool(item.read_error)))
            continue
        path = item.path
        if item.is_symlink:
            path = Path(os.path.realpath(item.path))
            if not path.is_relative_to(real_base):
                scan.skipped.append(SkippedFile(item.relative_path, "symlink points outside the source folder"))
                continue
        reason = _policy_refusal(item.relative_path, item.info, max_file_bytes)
        if reason:
            scan.skipped.append(SkippedFile(item.relative_path, reason))
            continue
        suffix = Path(item.relative_path).suffix.lower()
        scan.files.append(SourceFile(item.relative_path, path, item.info.st_size, item.info.st_mtime_ns, suffix))
    scan.files.sort(key=lambda f: f.relative_path)
    scan.skipped.sort(key=lambda s: s.relative_path)
    return scan


def _policy_refusal(relative_path: str, info: os.stat_result, max_file_bytes: int) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (device, socket or FIFO)"
    suffix = Path(relative_path).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        return f"unsupported file type {suffix or '(none)'}"
    if info.st_size > max_file_bytes:
        return f"larger than the limit ({info.st_size} > {max_file_bytes} bytes)"
    return None


def read_document(file: SourceFile, max_file_bytes: int) -> bytes:
    """The bytes of a listed file, refusing what changed since the listing.

    Opened with O_NOFOLLOW (a path swapped for a symlink after the scan is not followed) and
    O_NONBLOCK (a path swapped for a FIFO does not block); must still be a regular file within the
    size limit. Raises OSError: every failure here is a read error (keep the stored version).
    """
    fd = os.open(file.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "changed into a non-regular file during the scan")
        content = handle.read(max_file_bytes + 1)
    if len(content) > max_file_bytes:
        raise OSError(errno.EFBIG, "grew past the size limit during the scan")
    return content


# --------------------------------------------------------------------------- deletions


def is_under(relative_path: str, folder_or_file: str) -> bool:
    """True when ``relative_path`` is ``folder_or_file`` or lies inside it (path components, not prefixes)."""
    return relative_path == folder_or_file or relative_path.startswith(folder_or_file + "/")


def absent_paths(stored: Iterable[str], seen: set[str], unreadable: Iterable[str]) -> list[str]:
    """Stored paths proven absent: not seen by this scan and not at or under a path that could not be read.

    A path under an unreadable folder or an unreadable file is not proven absent, so it is never
    returned: deleting it would lose the last good version of a document that may still exist.
    """
    kept = set(unreadable)
    return sorted(p for p in stored if p not in seen and not (kept and _at_or_under_any(p, kept)))


def _at_or_under_any(relative_path: str, paths: set[str]) -> bool:
    parts = relative_path.split("/")
    return any("/".join(parts[:n]) in paths for n in range(1, len(parts) + 1))
