"""The engine thread's inbox (backends/engine_thread.py): capacity, closing, and what late requests are told."""

from __future__ import annotations

import pytest

from backends.engine_thread import Inbox, InboxClosed, Submit
from common.errors import ModelNotLoadedError, ServiceUnavailableError


def test_a_submit_over_capacity_is_a_busy_503_and_retiring_frees_a_place() -> None:
    inbox = Inbox(capacity=1)
    inbox.submit("job-1", "smol")
    with pytest.raises(ServiceUnavailableError) as busy:
        inbox.submit("job-2", "smol")
    assert busy.value.code == "server_busy" and busy.value.headers["Retry-After"] == "1"
    inbox.retire()
    inbox.submit("job-2", "smol")
    assert [m.job for m in inbox.take(wait=False) or []] == ["job-1", "job-2"]


def test_after_a_plain_close_requests_hear_the_model_is_unloading() -> None:
    inbox = Inbox(capacity=4)
    assert inbox.close() is True
    with pytest.raises(InboxClosed):
        inbox.post(Submit("job"))
    with pytest.raises(ModelNotLoadedError) as refused:
        inbox.submit("job", "smol")
    assert "unloading" in refused.value.message and refused.value.code == "model_not_loaded"


def test_after_a_failure_requests_hear_what_failed_and_how_to_recover() -> None:
    inbox = Inbox(capacity=4)
    assert inbox.close(failure="RuntimeError: out of host memory") is True
    assert inbox.close() is False  # a later close keeps the first reason
    with pytest.raises(ServiceUnavailableError) as refused:
        inbox.submit("job", "smol")
    err = refused.value
    assert err.status == 503 and err.code == "engine_failed"
    assert "Model 'smol'" in err.message and "RuntimeError: out of host memory" in err.message
    assert "POST /v1/model/load" in err.message
    assert inbox.take(wait=False) is None
