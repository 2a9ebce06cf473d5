"""The store outlives processes: Parley restarted on the same SQLite file finds its thread and stored
response; two Parley processes sharing one real PostgreSQL server continue each other's threads (and share
the one-active-run rule and cancels)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL_NAME, free_port, run_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _keys_file(folder: Path, api: str, admin: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "api_tokens.yml").write_text(f'api_key: "{api}"\nadmin_key: "{admin}"\n')


def _sdk(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)


def test_sqlite_store_survives_a_restart(model_dir: Path, tmp_path: Path) -> None:
    api, admin = secrets.token_hex(16), secrets.token_hex(16)
    _keys_file(tmp_path, api, admin)
    with run_server(model_dir, MODEL_NAME, tmp_path) as server:
        sdk = _sdk(server.base_url, api)
        assistant = sdk.beta.assistants.create(model=MODEL_NAME, temperature=0)
        thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "Say hello."}])
        run = sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                    max_completion_tokens=3)
        response = sdk.responses.create(model=MODEL_NAME, input="Say yes.", max_output_tokens=3, temperature=0)
    assert (tmp_path / "data" / "parley.db").is_file()
    with run_server(model_dir, MODEL_NAME, tmp_path) as server:
        sdk = _sdk(server.base_url, api)
        assert sdk.beta.threads.retrieve(thread.id).id == thread.id
        messages = list(sdk.beta.threads.messages.list(thread_id=thread.id, order="asc"))
        assert [m.role for m in messages] == ["user", "assistant"] and messages[1].run_id == run.id
        assert sdk.beta.threads.runs.retrieve(run.id, thread_id=thread.id).status == run.status
        again = sdk.responses.retrieve(response.id)
        assert again.output_text == response.output_text
        follow = sdk.responses.create(model=MODEL_NAME, input="Again.", previous_response_id=response.id,
                                      max_output_tokens=2)
        assert follow.usage.input_tokens > response.usage.input_tokens


def _initdb() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return found[-1] if found else shutil.which("initdb")


@pytest.fixture
def postgres() -> Iterator[str]:
    """A real PostgreSQL server in a temporary folder on a free loopback port; yields its URL."""
    initdb = _initdb()
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (./start.sh test installs it with apt-get)")
    bindir = Path(initdb).parent
    folder = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    port = free_port()
    data = folder / "data"

    def run(*args: str) -> None:
        subprocess.run(list(args), check=True, user=user, cwd=folder, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "parley", "--auth=trust", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        try:
            yield f"postgresql://parley@127.0.0.1:{port}/postgres"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_share_one_postgres_store(model_dir: Path, tmp_path: Path, postgres: str) -> None:
    api, admin = secrets.token_hex(16), secrets.token_hex(16)
    for name in ("one", "two"):
        _keys_file(tmp_path / name, api, admin)
    url = ("--url", postgres)
    with run_server(model_dir, MODEL_NAME, tmp_path / "one", extra_args=url) as one, \
            run_server(model_dir, MODEL_NAME, tmp_path / "two", extra_args=url) as two:
        a, b = _sdk(one.base_url, api), _sdk(two.base_url, api)
        assistant = a.beta.assistants.create(model=MODEL_NAME, temperature=0)
        thread = a.beta.threads.create(messages=[{"role": "user", "content": "Tell me a long story."}])
        # A run generating in process one holds the thread for process two too, and a cancel through
        # process two stops it.
        long = a.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id,
                                          max_completion_tokens=1000)
        with pytest.raises(openai.ConflictError):
            b.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        assert b.beta.threads.runs.cancel(run_id=long.id, thread_id=thread.id).status == "cancelled"
        # The thread made through one continues through two.
        b.beta.threads.messages.create(thread_id=thread.id, role="user", content="Just say hi.")
        run = b.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                  max_completion_tokens=3)
        assert run.status in ("completed", "incomplete")
        roles = [(m.role, m.run_id) for m in a.beta.threads.messages.list(thread_id=thread.id, order="asc")]
        assert roles == [("user", None), ("user", None), ("assistant", run.id)]
        assert a.beta.threads.runs.retrieve(long.id, thread_id=thread.id).status == "cancelled"
        for _ in range(600):  # process one saw the cancel in the store and let its generation go
            if httpx.get(one.base_url + "/health").json()["models"][MODEL_NAME]["slots_active"] == 0:
                break
            time.sleep(0.1)
        assert httpx.get(one.base_url + "/health").json()["models"][MODEL_NAME]["slots_active"] == 0
        response = a.responses.create(model=MODEL_NAME, input="Say yes.", max_output_tokens=2)
        assert b.responses.retrieve(response.id).output_text == response.output_text
