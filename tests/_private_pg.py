"""A private PostgreSQL server a test starts, freezes, restarts and stops itself.

The fault tests need a server they may break without disturbing the shared one:
``initdb`` into a fresh directory, ``pg_ctl`` on a free port of 127.0.0.1. As root
(CI), the server runs as the ``postgres`` user, as PostgreSQL requires.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")


def available() -> bool:
    return (BIN / "initdb").is_file() and (os.geteuid() != 0 or shutil.which("runuser"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="keycap-private-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        command = [str(a) for a in args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self._run(BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres")
        self._ctl("start")

    def _ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            BIN / "pg_ctl",
            action,
            "-D",
            self.data,
            "-w",
            "-m",
            "fast",
            "-o",
            options,
            "-l",
            self.root / "log",
        )

    def restart(self) -> None:
        self._ctl("restart")

    def stop(self) -> None:
        self._run(BIN / "pg_ctl", "stop", "-D", self.data, "-w", "-m", "immediate")

    def _processes(self) -> list[int]:
        """The postmaster and every process below it."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        parents = {postmaster}
        found = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in parents:
                pid = int(stat.parent.name)
                parents.add(pid)
                found.append(pid)
        return found

    def freeze(self) -> None:
        """SIGSTOP the whole server: connections stay open, nothing answers."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        with suppress(OSError, ValueError, IndexError):  # already thawed, or gone
            server.thaw()
        try:
            server.stop()
        finally:
            server.remove()
