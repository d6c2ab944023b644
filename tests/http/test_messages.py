"""Request targets as the door reads them: path and query, whatever form the client sent."""

from __future__ import annotations

import pytest

from chanstore.http.errors import HttpError
from chanstore.http.messages import Request, split_target


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/v1/channels/c/stats/k", b"/v1/channels/c/stats/k", b""),
        (b"/v1/channels/c/stats?limit=5", b"/v1/channels/c/stats", b"limit=5"),
        (b"/healthz?", b"/healthz", b""),
        (b"/a#fragment?not=query", b"/a", b""),
        (b"/a?q=1#fragment", b"/a", b"q=1"),
        (b"http://host/v1/containers", b"/v1/containers", b""),
        (b"HTTPS://host:8470/a/b?c=d", b"/a/b", b"c=d"),
        (b"http://host", b"/", b""),
        (b"http://host?q", b"/", b"q"),
        (b"http://user@host/a", b"/a", b""),
        (b"*", b"*", b""),
        (b"host:8470", b"host:8470", b""),
    ],
)
def test_a_target_is_read_as_its_path_and_query(target: bytes, path: bytes, query: bytes) -> None:
    assert split_target(target) == (path, query)


@pytest.mark.parametrize("target", [b"*", b"host:8470", b"v1/containers"])
def test_a_target_that_is_not_a_path_is_refused_by_name(target: bytes) -> None:
    request = Request("OPTIONS", split_target(target)[0])
    with pytest.raises(HttpError) as refused:
        request.segments  # noqa: B018 - reading them is what refuses
    assert refused.value.status == 400
    assert refused.value.message.startswith(f"the request target {target.decode()!r} is not a path")
