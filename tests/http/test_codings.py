"""The codings a request body may come in, as the door decides before it reads the body."""

from __future__ import annotations

import pytest

from chanstore.http import codings


@pytest.mark.parametrize(
    ("headers", "length", "status", "named"),
    [
        ([(b"content-encoding", b"gzip")], 10, 415, "'gzip'"),
        ([(b"content-encoding", b"identity, br")], 10, 415, "'br'"),
        ([(b"content-encoding", b"identity"), (b"content-encoding", b"GZIP")], 10, 415, "'gzip'"),
        ([(b"transfer-encoding", b"gzip, chunked")], 0, 400, "'gzip'"),
        ([(b"transfer-encoding", b"chunked"), (b"content-encoding", b"deflate")], 0, 415,
         "'deflate'"),
    ],
)  # fmt: skip
def test_a_coding_not_undone_is_refused_by_name(
    headers: list[tuple[bytes, bytes]], length: int, status: int, named: str
) -> None:
    refused = codings.refusal(headers, length)
    assert refused is not None
    assert (refused.status, refused.code) == (status, "unsupported_encoding")
    assert f"{named} is not supported" in refused.message


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([], 10),
        ([(b"content-encoding", b"identity")], 10),
        ([(b"content-encoding", b"gzip")], 0),  # no body to refuse
        ([(b"transfer-encoding", b"chunked")], 0),
        # No frame: the parser's 400 (RFC 9112 6.3), not a coding to name.
        ([(b"transfer-encoding", b"gzip")], 0),
        ([(b"transfer-encoding", b"chunked, identity")], 0),
    ],
)
def test_what_the_door_reads_or_leaves_to_the_parser_passes(
    headers: list[tuple[bytes, bytes]], length: int
) -> None:
    assert codings.refusal(headers, length) is None
