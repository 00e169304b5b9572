"""Media types (RFC 9110 8.3.1): parse one, split an Accept list, write one.

The one parser of Content-Type and Accept values in crgate: STOW-RS reads request and part
Content-Types with it, WADO-RS and QIDO-RS their Accept headers.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.core.errors import InvalidInput

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
JP2 = "image/jp2"
JPHC = "image/jphc"  # HTJ2K codestreams (PS3.18 Table 8.7.3-5)
JHC = "image/jhc"  # what some viewers send for image/jphc
PNG = "image/png"
JPEG = "image/jpeg"

TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def is_token(text: str) -> bool:
    """True for a non-empty RFC 9110 token."""
    return bool(text) and all(c in TOKEN_CHARS for c in text)


def is_media_type(media: str) -> bool:
    """True for ``type/subtype`` with both parts tokens (``*/*`` and ``image/*`` included)."""
    kind, slash, subtype = media.partition("/")
    return bool(slash) and is_token(kind) and is_token(subtype)


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split ``type/subtype; name=value; name="quoted"`` into the lower-cased type and parameters.

    Parameter names are lower-cased; quoted values are unquoted. Raises InvalidInput on syntax
    that cannot be read. The type itself is not checked (see ``is_media_type``).
    """
    media, _, rest = value.partition(";")
    media = media.strip().lower()
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise InvalidInput(f"media type parameter {rest[i:].strip()!r} has no '=value'")
        name = rest[i:eq].strip().lower()
        if not is_token(name):
            raise InvalidInput(f"media type parameter name {name!r} is not a token")
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            if i >= n:
                raise InvalidInput(f"media type parameter {name!r} has an unterminated quote")
            i += 1
            params[name] = "".join(chars)
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            params[name] = rest[i:end].strip()
            i = end
    return media, params


def split_list(header: str) -> list[str]:
    """The comma-separated elements of a header such as Accept; commas in quotes stay."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in header:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def format_media_type(media: str, params: Mapping[str, str]) -> str:
    """``media; name=value...``, each value a token as is or else quoted."""
    return media + "".join(f"; {name}={_value(value)}" for name, value in params.items())


def _value(value: str) -> str:
    if is_token(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
