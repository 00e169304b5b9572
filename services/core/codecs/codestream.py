"""Reading (and, for one field, writing) the main header of a JPEG 2000 / HTJ2K codestream
(ISO/IEC 15444-1 Annex A; 15444-15 for the HT block coder flag).

Used to check what an encoder wrote (precision, signedness, progression order, decomposition
levels, TLM, tile-parts) and to set the precision the codestream declares to Bits Stored
(:func:`with_precision`; see :mod:`services.core.codecs.htj2k` for why that is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.errors import CodecError

SOC = 0xFF4F
SIZ = 0xFF51
COD = 0xFF52
TLM = 0xFF55
SOT = 0xFF90
EOC = 0xFFD9
PROGRESSIONS = ("LRCP", "RLCP", "RPCL", "PCRL", "CPRL")
_HT_BLOCK_STYLE = 0x40  # SPcod code-block style bit 6: HT code-blocks (15444-15 A.4)


@dataclass(frozen=True)
class MainHeader:
    """What the main header of one codestream says."""

    columns: int
    rows: int
    precision: tuple[int, ...]
    """Bits per component (Ssiz + 1)."""
    signed: tuple[bool, ...]
    progression: str
    decompositions: int
    layers: int
    multiple_component_transform: bool
    reversible: bool
    """5/3 wavelet (reversible) rather than 9/7."""
    high_throughput: bool
    """HT code-blocks (JPEG 2000 Part 15)."""
    tlm: bool
    """A TLM marker segment (tile-part lengths) in the main header."""
    tile_parts: int
    """SOT markers found walking the tile-parts by their lengths."""

    @property
    def smallest_resolution(self) -> tuple[int, int]:
        """(columns, rows) of resolution level 0, the image after every decomposition."""
        scale = 1 << self.decompositions
        return -(-self.columns // scale), -(-self.rows // scale)


def _u16(data: bytes | bytearray, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 2], "big")


def _segments(codestream: bytes | bytearray) -> list[tuple[int, int, int]]:
    """(marker, position, segment length) of each main-header marker segment."""
    if _u16(codestream, 0) != SOC:
        raise CodecError("not a JPEG 2000 codestream (no SOC marker)")
    found: list[tuple[int, int, int]] = []
    pos = 2
    while pos + 4 <= len(codestream):
        marker = _u16(codestream, pos)
        if marker == SOT:
            found.append((marker, pos, 0))
            return found
        if marker >> 8 != 0xFF:
            raise CodecError(f"corrupt codestream main header at byte {pos}")
        length = _u16(codestream, pos + 2)
        found.append((marker, pos, length))
        pos += 2 + length
    raise CodecError("truncated codestream: no tile-part after the main header")


def read_main_header(codestream: bytes | bytearray) -> MainHeader:
    """Parse SIZ, COD and TLM of the main header and count the tile-parts."""
    segments = _segments(codestream)
    by_marker = {marker: pos for marker, pos, _ in segments}
    if SIZ not in by_marker or COD not in by_marker:
        raise CodecError("codestream main header lacks SIZ or COD")
    siz = by_marker[SIZ]
    columns = int.from_bytes(codestream[siz + 6 : siz + 10], "big")
    rows = int.from_bytes(codestream[siz + 10 : siz + 14], "big")
    x0 = int.from_bytes(codestream[siz + 14 : siz + 18], "big")
    y0 = int.from_bytes(codestream[siz + 18 : siz + 22], "big")
    components = _u16(codestream, siz + 38)
    ssiz = [codestream[siz + 40 + 3 * k] for k in range(components)]
    cod = by_marker[COD]
    progression = codestream[cod + 5]
    return MainHeader(
        columns=columns - x0,
        rows=rows - y0,
        precision=tuple((s & 0x7F) + 1 for s in ssiz),
        signed=tuple(bool(s & 0x80) for s in ssiz),
        progression=PROGRESSIONS[progression] if progression < 5 else f"unknown {progression}",
        layers=_u16(codestream, cod + 6),
        multiple_component_transform=bool(codestream[cod + 8]),
        decompositions=codestream[cod + 9],
        high_throughput=bool(codestream[cod + 12] & _HT_BLOCK_STYLE),
        reversible=codestream[cod + 13] == 1,
        tlm=TLM in by_marker,
        tile_parts=_count_tile_parts(codestream, segments[-1][1]),
    )


def _count_tile_parts(codestream: bytes | bytearray, pos: int) -> int:
    count = 0
    while pos + 12 <= len(codestream) and _u16(codestream, pos) == SOT:
        count += 1
        psot = int.from_bytes(codestream[pos + 6 : pos + 10], "big")
        if psot == 0:  # the last tile-part runs to EOC
            break
        pos += psot
    return count


def with_precision(codestream: bytes, bits: int, signed: bool) -> bytes:
    """The codestream with every component's precision (Ssiz) set to ``bits``/``signed``.

    Only the declared precision changes; the caller makes sure the coded data means the same
    under it (see :mod:`services.core.codecs.htj2k`).
    """
    if not 1 <= bits <= 38:
        raise CodecError(f"precision {bits} outside JPEG 2000's 1..38 bits")
    data = bytearray(codestream)
    siz = next((pos for marker, pos, _ in _segments(data) if marker == SIZ), None)
    if siz is None:
        raise CodecError("codestream main header lacks SIZ")
    for k in range(_u16(data, siz + 38)):
        data[siz + 40 + 3 * k] = (bits - 1) | (0x80 if signed else 0)
    return bytes(data)
