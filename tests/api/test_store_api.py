"""The store's rules through the HTTP API, in-process with the real model: owners (another key gets 404,
the admin key sees all), bad ids naming their field, thread caps, oversized threads, truncation."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import MODEL_NAME, make_config, wait_loaded


class Client:
    def __init__(self, http: TestClient, key: str) -> None:
        self.http, self.headers = http, {"Authorization": f"Bearer {key}"}

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.http.post(path, json=body or {}, headers=self.headers)

    def get(self, path: str) -> Any:
        return self.http.get(path, headers=self.headers)

    def run_to_end(self, thread_id: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.post(f"/v1/threads/{thread_id}/runs", body)
        assert r.status_code == 200, r.text
        run = r.json()
        for _ in range(6000):
            run = self.get(f"/v1/threads/{thread_id}/runs/{run['id']}").json()
            if run["status"] not in ("queued", "in_progress"):
                return run
            time.sleep(0.05)
        raise AssertionError(f"run still {run['status']}")


@pytest.fixture(scope="module")
def clients(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Client, Client]]:
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("store_api")
    alice, bob, admin = (secrets.token_hex(16) for _ in range(3))
    (tmp / "api_tokens.yml").write_text(f'api_key: ["{alice}", "{bob}"]\nadmin_key: "{admin}"\n')
    config = make_config(tmp, model_dir, model={"max_seq_len": 512}, store={"max_thread_messages": 6})
    with TestClient(create_app(config)) as http:
        wait_loaded(http)
        yield Client(http, alice), Client(http, bob), Client(http, admin)


def _error(r: Any, status: int, param: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err


def test_objects_belong_to_their_key(clients: tuple[Client, Client, Client]) -> None:
    alice, bob, admin = clients
    assistant = alice.post("/v1/assistants", {"model": MODEL_NAME}).json()
    thread = alice.post("/v1/threads", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    conv = alice.post("/v1/conversations").json()
    _error(bob.get(f"/v1/assistants/{assistant['id']}"), 404, "assistant_id")
    _error(bob.get(f"/v1/threads/{thread['id']}"), 404, "thread_id")
    _error(bob.get(f"/v1/threads/{thread['id']}/messages"), 404, "thread_id")
    _error(bob.post(f"/v1/threads/{thread['id']}/messages", {"role": "user", "content": "x"}), 404, "thread_id")
    _error(bob.get(f"/v1/conversations/{conv['id']}/items"), 404, "conversation_id")
    _error(bob.post(f"/v1/threads/{thread['id']}/runs", {"assistant_id": assistant["id"]}), 404, "thread_id")
    bobs_thread = bob.post("/v1/threads").json()
    _error(bob.post(f"/v1/threads/{bobs_thread['id']}/runs", {"assistant_id": assistant["id"]}), 404,
           "assistant_id")
    response = alice.post("/v1/responses", {"input": "Hi", "max_output_tokens": 1}).json()
    _error(bob.get(f"/v1/responses/{response['id']}"), 404, "response_id")
    _error(bob.post("/v1/responses", {"input": "Hi", "previous_response_id": response["id"]}), 400,
           "previous_response_id")
    _error(bob.post("/v1/responses", {"input": "Hi", "conversation": conv["id"]}), 404, "conversation")
    assert bob.http.delete(f"/v1/threads/{thread['id']}", headers=bob.headers).status_code == 404
    assert assistant["id"] not in [a["id"] for a in bob.get("/v1/assistants?limit=100").json()["data"]]
    # The admin key lists and reads every key's objects.
    listed = [t["id"] for t in admin.get("/v1/assistants?limit=100").json()["data"]]
    assert assistant["id"] in listed
    assert admin.get(f"/v1/threads/{thread['id']}").json()["id"] == thread["id"]
    assert alice.get(f"/v1/threads/{thread['id']}").json()["id"] == thread["id"]
    # What the admin adds to alice's thread, alice reads; bob still does not.
    note = admin.post(f"/v1/threads/{thread['id']}/messages", {"role": "user", "content": "From admin"}).json()
    assert alice.get(f"/v1/threads/{thread['id']}/messages/{note['id']}").json()["id"] == note["id"]
    _error(bob.get(f"/v1/threads/{thread['id']}/messages/{note['id']}"), 404, "thread_id")


def test_unknown_ids_and_bad_fields_name_the_field(clients: tuple[Client, Client, Client]) -> None:
    alice, _, _ = clients
    thread = alice.post("/v1/threads").json()
    _error(alice.get("/v1/threads/thread_nope"), 404, "thread_id")
    _error(alice.post(f"/v1/threads/{thread['id']}/runs", {"assistant_id": "asst_nope"}), 404, "assistant_id")
    _error(alice.get(f"/v1/threads/{thread['id']}/runs/run_nope"), 404, "run_id")
    _error(alice.get(f"/v1/threads/{thread['id']}/messages/msg_nope"), 404, "message_id")
    _error(alice.get("/v1/assistants?after=asst_nope"), 400, "after")
    _error(alice.get("/v1/assistants?limit=1000"), 400, "limit")
    _error(alice.post("/v1/responses", {"input": [{"type": "message", "role": "robot", "content": "x"}]}), 400,
           "input[0].role")
    _error(alice.post("/v1/responses", {"input": "x", "tools": [{"type": "web_search"}]}), 400, "tools[0].type")
    _error(alice.post("/v1/conversations/conv_nope/items", {"items": [{"role": "user", "content": "x"}]}), 404,
           "conversation_id")
    assistant = alice.post("/v1/assistants", {"model": MODEL_NAME, "tools": [{"type": "code_interpreter"}]}).json()
    _error(alice.post(f"/v1/threads/{thread['id']}/runs", {"assistant_id": assistant["id"]}), 400, "tools[0].type")
    # A refused run leaves nothing behind: the thread is free and holds no run.
    assert alice.get(f"/v1/threads/{thread['id']}/runs").json()["data"] == []


def test_thread_caps_and_truncation(clients: tuple[Client, Client, Client]) -> None:
    alice, _, _ = clients
    assistant = alice.post("/v1/assistants", {"model": MODEL_NAME, "temperature": 0}).json()
    # store.max_thread_messages is 6 here.
    full = alice.post("/v1/threads", {"messages": [{"role": "user", "content": "x"}] * 6}).json()
    _error(alice.post(f"/v1/threads/{full['id']}/messages", {"role": "user", "content": "y"}), 400, "thread_id")
    # One message longer than the whole context: an oversized thread is refused, naming the thread.
    huge = alice.post("/v1/threads", {"messages": [{"role": "user", "content": "word " * 700}]}).json()
    err = _error(alice.post(f"/v1/threads/{huge['id']}/runs", {"assistant_id": assistant["id"]}), 400, "thread_id")
    assert err["code"] == "context_length_exceeded"
    # Four messages of ~150 tokens do not fit a 512-token context together: auto truncation drops the oldest.
    long = [{"role": "user", "content": f"Story {i}: " + "the cat sat on the mat " * 25} for i in range(4)]
    thread = alice.post("/v1/threads", {"messages": long}).json()
    auto = alice.run_to_end(thread["id"], {"assistant_id": assistant["id"], "max_completion_tokens": 2})
    assert auto["status"] in ("completed", "incomplete"), auto
    assert auto["usage"]["prompt_tokens"] <= 512 - 2
    last = alice.run_to_end(thread["id"], {"assistant_id": assistant["id"], "max_completion_tokens": 2,
                                           "truncation_strategy": {"type": "last_messages", "last_messages": 1}})
    assert last["truncation_strategy"] == {"type": "last_messages", "last_messages": 1}
    assert last["usage"]["prompt_tokens"] < auto["usage"]["prompt_tokens"]
