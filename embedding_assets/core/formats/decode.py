"""Decoding raw bytes to text: BOMs, UTF-16 without a BOM, invalid UTF-8, NUL bytes, binary detection.

Every step is a single pass over the bytes (or over the first 8 KiB), so decoding is linear.
"""

from __future__ import annotations

import re

from embedding_assets.core.formats.base import CleaningError

VERSION = "2"  # 2: UTF-16 without a BOM is detected instead of quarantined as binary

# UTF-32 LE must be tested before UTF-16 LE: its BOM starts with the UTF-16 LE BOM.
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (b"\x00\x00\xfe\xff", "utf-32-be", "decoded as UTF-32 (BOM)"),
    (b"\xff\xfe\x00\x00", "utf-32-le", "decoded as UTF-32 (BOM)"),
    (b"\xef\xbb\xbf", "utf-8", ""),
    (b"\xfe\xff", "utf-16-be", "decoded as UTF-16 (BOM)"),
    (b"\xff\xfe", "utf-16-le", "decoded as UTF-16 (BOM)"),
)

_ALLOWED_CONTROLS = frozenset("\t\n\r\f\v")
_BINARY_SAMPLE_CHARS = 8192
# Text in UTF-16 has a NUL high byte for every ASCII character (spaces, digits, punctuation, Latin
# letters); these bounds tell it from UTF-8 with a stray NUL and from binary formats.
_UTF16_MIN_NUL_SHARE = 0.10
_UTF16_MAX_OTHER_NUL_SHARE = 0.02


def looks_binary(text: str) -> bool:
    """True when the first 8 KiB of decoded text is mostly not text.

    Control characters (NUL included) above 10% mean binary; so does a sample that is
    largely replacement characters plus controls (random bytes decoded as UTF-8).
    """
    sample = text[:_BINARY_SAMPLE_CHARS]
    if not sample:
        return False
    controls = sum(1 for ch in sample if (ch < " " and ch not in _ALLOWED_CONTROLS) or ch == "\x7f")
    replaced = sample.count("\ufffd")
    return controls / len(sample) > 0.10 or (controls + replaced) / len(sample) > 0.30


def _utf16_without_bom(data: bytes) -> str | None:
    """The encoding (``utf-16-le``/``utf-16-be``) when the NUL bytes fall on one parity, else None."""
    sample = data[: 2 * _BINARY_SAMPLE_CHARS]
    half = len(sample) // 2
    if half < 2:
        return None
    even_nuls = sample[0::2].count(0) / half
    odd_nuls = sample[1::2].count(0) / half
    if odd_nuls >= _UTF16_MIN_NUL_SHARE and even_nuls <= _UTF16_MAX_OTHER_NUL_SHARE:
        return "utf-16-le"
    if even_nuls >= _UTF16_MIN_NUL_SHARE and odd_nuls <= _UTF16_MAX_OTHER_NUL_SHARE:
        return "utf-16-be"
    return None


def decode_bytes(data: bytes) -> tuple[str, list[str]]:
    """Decode raw document bytes to text, returning ``(text, warnings)``.

    BOMs (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE) are honoured and stripped. Without a BOM, bytes whose
    NULs fall on every other byte are read as UTF-16 (warning ``"decoded as UTF-16 LE (no BOM)"``);
    otherwise the bytes must be UTF-8, and invalid sequences are replaced with U+FFFD plus the
    warning ``"invalid UTF-8 replaced"``. NUL characters are removed with the warning
    ``"NUL bytes removed"``. Line endings are not touched here.

    Raises:
        CleaningError: the bytes look binary (many control characters or NULs in the first
            8 KiB), or a BOM-declared encoding cannot decode them.
    """
    warnings: list[str] = []
    for bom, encoding, note in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom) :].decode(encoding)
            except UnicodeDecodeError as exc:
                raise CleaningError(f"bytes with a {encoding} BOM do not decode as {encoding}: {exc}") from exc
            if note:
                warnings.append(note)
            wide = encoding.startswith(("utf-16", "utf-32"))
            break
    else:
        wide = False
        text = None
        guessed = _utf16_without_bom(data)
        if guessed is not None:
            try:
                candidate = data[: len(data) - len(data) % 2].decode(guessed)
            except UnicodeDecodeError:
                candidate = None
            # Binary that happens to have NULs on one parity decodes to control characters: not text.
            if candidate is not None and not looks_binary(candidate):
                text = candidate
                warnings.append(f"decoded as {guessed.upper().replace('UTF-16-', 'UTF-16 ')} (no BOM)")
        if text is None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("utf-8", errors="replace")
                warnings.append("invalid UTF-8 replaced")
    # UTF-16/32 text legitimately decodes from bytes full of NULs; judge only byte-oriented decodes.
    if not wide and looks_binary(text):
        raise CleaningError("binary content: too many control characters or NUL bytes in the first 8 KiB")
    if "\x00" in text:
        text = text.replace("\x00", "")
        warnings.append("NUL bytes removed")
    return text, warnings


_DECLARED_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.IGNORECASE)


def decode_html(data: bytes) -> tuple[str, list[str]]:
    """Decode HTML bytes like ``decode_bytes``, honouring a ``<meta charset>`` declared in the first
    4 KiB when the bytes are not UTF-8 (warning ``"decoded as declared <charset>"``)."""
    text, warnings = decode_bytes(data)
    if "invalid UTF-8 replaced" in warnings:
        match = _DECLARED_CHARSET.search(data[:4096])
        declared = match.group(1).decode("ascii").lower() if match else None
        if declared and declared.replace("_", "-") not in ("utf-8", "utf8"):
            try:
                text = data.decode(declared).replace("\x00", "")
            except (LookupError, UnicodeDecodeError):
                return text, warnings
            warnings = [w for w in warnings if w != "invalid UTF-8 replaced"] + [f"decoded as declared {declared}"]
    return text, warnings
