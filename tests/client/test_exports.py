"""The client's error names: importable where the README shows them, one class per
concept shared with the server side."""

from __future__ import annotations

import disagg.client
from disagg import errors


def test_the_client_exports_the_names_the_readme_shows():
    for name in ("Client", "AsyncClient", "InvalidRequest", "RequestRejected"):
        assert name in disagg.client.__all__
    for name in ("ServerUnavailable", "RequestFailed", "Completion", "StreamChunk"):
        assert name in disagg.client.__all__
    for name in disagg.client.__all__:
        assert hasattr(disagg.client, name), name


def test_each_error_concept_has_one_class():
    assert disagg.client.InvalidRequest is errors.InvalidRequestError
    assert disagg.client.RequestRejected is errors.RequestRejectedError
    assert disagg.client.ServerUnavailable is errors.ServerUnavailable
    assert disagg.client.RequestFailed is errors.RequestFailed


def test_a_server_side_rejection_is_caught_as_the_clients():
    exc = errors.RequestRejectedError("queue_full", "client 'a' already has 2 in flight")
    assert isinstance(exc, disagg.client.RequestRejected)
    assert (exc.reason, exc.message) == ("queue_full", "client 'a' already has 2 in flight")
    auth = errors.AuthenticationError("unknown key")
    assert isinstance(auth, disagg.client.RequestRejected)
    assert (auth.reason, auth.message) == ("unauthorized", "unknown key")
    bad = errors.InvalidRequestError("prompt", "is empty")
    assert isinstance(bad, disagg.client.InvalidRequest) and isinstance(bad, ValueError)
    assert (bad.field, bad.reason) == ("prompt", "is empty")
