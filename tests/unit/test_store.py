"""The store on a real SQLite file: migrations, owners, cursors, the one-active-run claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import BadRequestError, ConflictError, NotFoundError
from common.store.store import Owner, Store, database_url

ALICE, BOB, ADMIN = Owner.of_key("alice-key"), Owner.of_key("bob-key"), Owner.of_key("admin-key", admin=True)


async def test_owners_cursors_and_claims(tmp_path: Path) -> None:
    store = await Store.open(database_url(None, str(tmp_path / "data")))
    try:
        assert "alice-key" not in ALICE.id and ALICE.id != BOB.id
        thread = await store.add("thread", ALICE, {"metadata": {}})
        assert thread.id.startswith("thread_") and len(thread.id) == len("thread_") + 24
        with pytest.raises(NotFoundError) as exc:
            await store.get("thread", thread.id, BOB, param="thread_id")
        assert exc.value.param == "thread_id"
        assert (await store.get("thread", thread.id, ADMIN, param="thread_id")).owner == ALICE.id
        msgs = [await store.add("msg", ALICE, {"n": i}, parent_id=thread.id) for i in range(5)]
        page = await store.list("msg", ALICE, parent_id=thread.id, limit=2, order="asc")
        assert [r.data["n"] for r in page.items] == [0, 1] and page.has_more
        page = await store.list("msg", ALICE, parent_id=thread.id, limit=2, order="asc", after=page.items[-1].id)
        assert [r.data["n"] for r in page.items] == [2, 3]
        page = await store.list("msg", ALICE, parent_id=thread.id, limit=10, order="desc", after=msgs[2].id)
        assert [r.data["n"] for r in page.items] == [1, 0] and not page.has_more
        with pytest.raises(BadRequestError):
            await store.list("msg", ALICE, parent_id=thread.id, after="msg_nope")
        assert len((await store.list("thread", BOB)).items) == 0
        await store.add("thread", BOB, {})
        assert len((await store.list("thread", ADMIN)).items) == 2
        run = await store.add("run", ALICE, {}, parent_id=thread.id, status="queued", active_on=thread.id)
        with pytest.raises(ConflictError):
            await store.add("run", ALICE, {}, parent_id=thread.id, status="queued", active_on=thread.id)
        run.status = "completed"
        assert not await store.save(run, expect_status=["cancelling"])
        assert await store.save(run, expect_status=["queued"], release=True)
        await store.add("run", ALICE, {}, parent_id=thread.id, status="queued", active_on=thread.id)
        await store.delete("thread", thread.id, ALICE, param="thread_id")
        assert await store.children(thread.id) == []
    finally:
        await store.close()
    again = await Store.open(database_url(None, str(tmp_path / "data")))  # migrations are idempotent
    await again.close()
