"""The streaming multipart/related parser and writer (RFC 2046 framing as PS3.18 uses it)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.dicom.mediatype import parse_media_type
from services.core.dicom.multipart import (
    MAX_HEADER_BYTES,
    Event,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
    content_type,
    iter_multipart,
    new_boundary,
)
from services.core.errors import InvalidInput

Parts = list[tuple[dict[str, str], bytes]]


def collect(events: list[Event]) -> Parts:
    parts: Parts = []
    for event in events:
        if isinstance(event, PartStart):
            parts.append((event.headers, b""))
        elif isinstance(event, PartData):
            headers, body = parts[-1]
            parts[-1] = (headers, body + event.data)
        else:
            assert isinstance(event, PartEnd)
    return parts


def parse(body: bytes, boundary: str, chunk: int | None = None) -> Parts:
    parser = MultipartParser(boundary)
    events: list[Event] = []
    step = chunk or len(body) or 1
    for i in range(0, len(body), step):
        events += parser.feed(body[i : i + step])
    parser.close()
    assert parser.complete
    return collect(events)


def build(bodies: list[bytes], boundary: str) -> bytes:
    return b"".join(
        iter_multipart([({"Content-Type": "application/dicom"}, [b]) for b in bodies], boundary)
    )


def test_media_type_parameters_quoted_unquoted_and_case() -> None:
    media, params = parse_media_type(
        'Multipart/Related; TYPE="application/dicom"; boundary=abc-123;start="<a;b>"'
    )
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": "abc-123", "start": "<a;b>"}
    assert parse_media_type('x/y; b="q\\"uote"')[1] == {"b": 'q"uote'}
    assert parse_media_type("application/dicom") == ("application/dicom", {})


@pytest.mark.parametrize("bad", ['a/b; type="x', "a/b; novalue", "a/b; bad name=1"])
def test_unreadable_media_type_is_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        parse_media_type(bad)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "no boundary"),
        ({"boundary": ""}, "1 to 70"),
        ({"boundary": "x" * 71}, "1 to 70"),
        ({"boundary": "a;b<c>"}, "characters"),
        ({"boundary": "ends-in-space "}, "characters"),
    ],
)
def test_boundary_grammar(params: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        boundary_of(params)


def test_boundary_with_allowed_specials_is_accepted() -> None:
    assert boundary_of({"boundary": "0f3cf5c0-70e0'()+_,./:=? x"}) == "0f3cf5c0-70e0'()+_,./:=? x"


def test_round_trip_with_preamble_padding_and_epilogue() -> None:
    boundary = new_boundary()
    body = (
        b"this preamble is ignored\r\n"
        + f"--{boundary}   \r\n".encode()  # transport padding after the delimiter
        + b"Content-Type: application/dicom\r\nX-Folded: a\r\n  b\r\n\r\nfirst\r\n"
        + f"--{boundary}\r\n\r\nno headers\r\n--{boundary}--\r\nepilogue, ignored".encode()
    )
    parts = parse(body, boundary)
    assert parts == [
        ({"content-type": "application/dicom", "x-folded": "a b"}, b"first"),
        ({}, b"no headers"),
    ]


def test_content_that_almost_contains_the_delimiter_is_kept() -> None:
    boundary = "BOUNDARY"
    tricky = b"a\r\n--BOUNDAR\r\n--BOUND\r\n-\r\n--\rBOUNDARY\n--BOUNDARY"
    body = build([tricky, b""], boundary)
    for chunk in (1, 2, 3, 7, None):
        assert [b for _, b in parse(body, boundary, chunk)] == [tricky, b""]


@settings(max_examples=60, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    chunk=st.integers(min_value=1, max_value=97),
)
def test_any_split_of_the_body_gives_the_same_parts(bodies: list[bytes], chunk: int) -> None:
    boundary = "b0undary"
    if any(b"--b0undary" in b for b in bodies):
        return  # a sender picks a boundary its content does not contain
    body = build(bodies, boundary)
    assert [b for _, b in parse(body, boundary, chunk)] == bodies


def test_parts_stream_before_they_end() -> None:
    """A large part is handed out while it arrives, not when it is complete."""
    boundary = new_boundary()
    payload = os.urandom(4 * 1024 * 1024)
    body = build([payload], boundary)
    parser = MultipartParser(boundary)
    delivered = 0
    first_mib = body[: 1024 * 1024]
    for i in range(0, len(first_mib), 65536):
        for event in parser.feed(first_mib[i : i + 65536]):
            if isinstance(event, PartData):
                delivered += len(event.data)
                assert len(event.data) <= 65536 + 64  # never more than a chunk at once
    assert delivered >= 1024 * 1024 - 200  # all but the head and a delimiter's length


def test_missing_closing_delimiter_is_an_error() -> None:
    boundary = "abc"
    body = build([b"one"], boundary)[: -len("--abc--\r\n")]
    parser = MultipartParser(boundary)
    parser.feed(body)
    with pytest.raises(InvalidInput, match="ends inside part 1"):
        parser.close()


def test_body_without_the_boundary_is_an_error() -> None:
    parser = MultipartParser("abc")
    parser.feed(b"--other\r\n\r\nx\r\n--other--\r\n")
    with pytest.raises(InvalidInput, match="does not contain the boundary"):
        parser.close()


def test_boundary_that_only_prefixes_the_real_one_is_an_error() -> None:
    parser = MultipartParser("abc")
    with pytest.raises(InvalidInput, match="does not match"):
        parser.feed(b"--abcdef\r\n\r\nx\r\n--abcdef--\r\n")


def test_malformed_and_oversized_headers_are_errors() -> None:
    with pytest.raises(InvalidInput, match="malformed header"):
        MultipartParser("b").feed(b"--b\r\nno colon here\r\n\r\nx\r\n--b--")
    parser = MultipartParser("b")
    with pytest.raises(InvalidInput, match="exceed"):
        parser.feed(b"--b\r\nX: " + b"y" * (MAX_HEADER_BYTES + 10))


def test_writer_helpers() -> None:
    assert content_type("application/dicom", "xyz") == (
        'multipart/related; type="application/dicom"; boundary=xyz'
    )
    assert content_type("application/octet-stream", "b", transfer_syntax="1.2") == (
        'multipart/related; type="application/octet-stream"; boundary=b; transfer-syntax="1.2"'
    )
    chunks = list(iter_multipart([({"Content-Type": "a/b"}, [b"x", b"y"])], "B"))
    assert b"".join(chunks) == b"--B\r\nContent-Type: a/b\r\n\r\nxy\r\n--B--\r\n"
    assert new_boundary() != new_boundary()
