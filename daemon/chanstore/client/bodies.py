"""The bodies the clients send and read: values go out in their stored form, come back revived.

Values cross HTTP in their stored form, the library's type-marked JSON
(:mod:`chanstore.codec`): the clients write a value as
:func:`chanstore.codec.to_json_shape` makes it and revive what they read with
:func:`chanstore.codec.decode`, so sets, tuples and registered dataclasses keep
their types. :meth:`Client.get_document` and :meth:`Client.set_document` move
the stored JSON document itself, type marks and all (``set_document(..., doc)``
is ``set(..., codec.Document(doc))``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from chanstore import codec
from chanstore.client.errors import ClientError, DamagedValueError
from chanstore.client.versions import Expectation, Versioned, bare_expectation, etag_header

__all__ = [
    "bulk_documents",
    "bulk_etags",
    "bulk_values",
    "bulk_versioned",
    "document_of",
    "json_bytes",
    "revive_document",
    "stored_etag",
    "value_body",
    "value_of",
    "values_body",
    "versioned_of",
]


def json_bytes(document: Any) -> bytes:
    """A request body that is JSON already (key lists); ASCII, NaN refused."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("ascii")


def value_body(value: Any) -> bytes:
    """``value`` as its stored form; :class:`~chanstore.errors.UnstorableValue` if it has none.

    A :class:`chanstore.codec.Document` is sent as the document it holds.
    """
    return codec.encode_bytes(value)


def values_body(values: Mapping[str, Any],
                expect: Mapping[str, Expectation] | None = None) -> bytes:  # fmt: skip
    """A bulk set's body: each value in its stored form, the envelope left as it is,
    and the expectations, when there are any, as ``"expect": {key: etag, "*" or null}``."""
    # The mappings go in as Documents: keys named like a type mark's two halves
    # are keys, not a mark to escape.
    shaped = {key: codec.to_json_shape(value) for key, value in values.items()}
    envelope: dict[str, Any] = {"values": codec.Document(shaped)}
    if expect:
        envelope["expect"] = codec.Document({key: bare_expectation(expected, key)
                                             for key, expected in expect.items()})  # fmt: skip
    return value_body(envelope)


def stored_etag(response: httpx.Response) -> str | None:
    """The ETag of the value a PUT stored: its header, else its body's ``etag``."""
    etag = etag_header(response)
    if etag is not None:
        return etag
    try:
        answer = json.loads(response.content)
    except ValueError:
        return None
    found = answer.get("etag") if isinstance(answer, dict) else None
    return found if isinstance(found, str) else None


def versioned_of(response: httpx.Response) -> Versioned:
    """The value and ETag a successful GET answered."""
    etag = etag_header(response)
    if etag is None:
        raise ClientError("the daemon answered no ETag: it predates versions", response.status_code)
    return Versioned(value_of(response), etag)


def bulk_etags(answer: Any, status: int) -> dict[str, str]:
    """The ``etags`` of a bulk answer, checked to be ``{key: str}``."""
    etags = answer.get("etags") if isinstance(answer, dict) else None
    if not isinstance(etags, dict) or not all(isinstance(tag, str) for tag in etags.values()):
        raise ClientError(f'expected "etags": {{key: etag}} in {answer!r:.200}', status)
    return dict(etags)


def revive_document(document: Any) -> Any:
    """A parsed JSON document with its type marks revived, innermost first as a decoder does."""
    if isinstance(document, dict):
        return codec.revive({key: revive_document(item) for key, item in document.items()})
    if isinstance(document, list):
        return [revive_document(item) for item in document]
    return document


def document_of(response: httpx.Response) -> Any:
    """The JSON document of a successful answer, as it is."""
    try:
        return json.loads(response.content)
    except ValueError as exc:
        raise ClientError(f"the daemon's answer is not JSON: {exc}", response.status_code) from exc


def value_of(response: httpx.Response) -> Any:
    """The value a successful GET answered: its document with type marks revived."""
    try:
        return codec.decode(response.content)
    except ValueError as exc:  # not JSON, or a registered type's mark that does not fit it
        message = f"the daemon's answer is not a value: {exc}"
        raise ClientError(message, response.status_code) from exc


def bulk_values(response: httpx.Response, requested: list[str]) -> dict[str, Any]:
    """The revived ``values`` of a bulk get's answer; DamagedValueError when some
    requested keys hold values that cannot be read."""
    return _bulk_answer(response, requested)[0]


def bulk_versioned(response: httpx.Response, requested: list[str]) -> dict[str, Versioned]:
    """The values of a bulk get's answer with their ETags (its ``etags``)."""
    values, answer = _bulk_answer(response, requested)
    etags = bulk_etags(answer, response.status_code)
    missing = [key for key in values if key not in etags]
    if missing:
        message = f"the daemon answered no ETag for {missing!r:.200}: it predates versions"
        raise ClientError(message, response.status_code)
    return {key: Versioned(value, etags[key]) for key, value in values.items()}


def bulk_documents(response: httpx.Response) -> dict[str, Any]:
    """The ``values`` of a bulk get's answer in their stored form, as they are;
    DamagedValueError when some requested keys hold values that cannot be read."""
    answer = document_of(response)
    values = answer.get("values") if isinstance(answer, dict) else None
    if not isinstance(values, dict):
        message = f'expected {{"values": {{key: value, ...}}}} in {answer!r:.200}'
        raise ClientError(message, response.status_code)
    damaged = answer.get("corrupt")
    if damaged:
        message = f"the stored values of {damaged!r:.300} cannot be read"
        raise DamagedValueError(message, response.status_code, keys=list(damaged), values=values)
    return values


def _bulk_answer(response: httpx.Response, requested: list[str]) -> tuple[dict[str, Any], Any]:
    """The revived ``values`` of a bulk get's answer, and the answer itself."""
    if codec.TYPE_KEY not in requested or codec.VALUE_KEY not in requested:
        answer = value_of(response)
        values = dict(answer["values"])
    else:
        # The answer's "values" object may hold exactly the two keys of a type mark:
        # decoding the whole answer would take it for one. Revive each value alone.
        answer = document_of(response)
        try:
            values = {key: revive_document(document) for key, document in answer["values"].items()}
        except ValueError as exc:
            message = f"the daemon's answer holds a value that is not one: {exc}"
            raise ClientError(message, response.status_code) from exc
    damaged = answer.get("corrupt")
    if damaged:
        message = f"the stored values of {damaged!r:.300} cannot be read"
        raise DamagedValueError(message, response.status_code, keys=list(damaged), values=values)
    return values, answer
