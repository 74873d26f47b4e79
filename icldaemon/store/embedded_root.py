"""The embedded PostgreSQL when icldaemon runs as root: run as a system user, reachable by nobody else.

PostgreSQL refuses to run as root, and pgserver, run as root, makes every directory above the data
directory (and above its own binaries) world-listable and, where the data directory's path is long,
puts the server's socket in a directory of mode 0777; its clusters trust every local connection. This
module runs the same pgserver binaries itself instead, as the system user `SERVICE_USER` with its own
group and no other:

- no permission is changed outside the data directory: a data directory the user cannot reach is
  refused with what to do (root's default, /var/lib/icldaemon, is reachable), and binaries it cannot
  reach are copied next to the data directory once, into a tree only root writes;
- the server listens on no TCP address, and its socket lies in the data directory itself (mode 0700,
  owned by the user), so that only that user and root can connect: local trust is then the socket's
  file permission, and no other local user reaches a superuser;
- a path too long for a Unix socket is refused rather than moved to a shared directory.

Processes share one server as they do under pgserver: each adds its pid to the data directory's list
of users (pgserver's own file, so a server either started can be joined by the other), the last one
to leave stops the server if it started it.
"""

import contextlib
import fcntl
import grp
import importlib.metadata
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from icldaemon.exceptions import DatabaseError

SERVICE_USER = "pgserver"  # the name pgserver itself uses as root: data directories it made keep starting
SOCKET_NAME = ".s.PGSQL.5432"
SOCKET_PATH_LIMIT = 107  # bytes of a Unix socket's path on Linux (sun_path, less its terminating NUL)
COMMAND_TIMEOUT = 120.0  # seconds for initdb, and for the server to start or stop
SEARCH = {"user": stat.S_IXUSR, "group": stat.S_IXGRP, "other": stat.S_IXOTH}

_IN_USE: dict[Path, tuple[str, int]] = {}  # data directory -> (URL, server pid) while this process uses it


def service_user() -> pwd.struct_passwd:
    """The system user that runs the server, created (without a home or a login shell) where missing."""
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
                       check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        raise DatabaseError(f"the embedded PostgreSQL runs as the system user {SERVICE_USER!r} when icldaemon runs "
                            f"as root, and it could not be created ({detail}); create it, set ICLD_DATABASE_URL, "
                            "or run icldaemon as a non-root user") from exc
    return pwd.getpwnam(SERVICE_USER)


def unsearchable(directory: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory from / down to `directory` (included) that `user` may not enter; None if it may."""
    groups = {user.pw_gid, *(group.gr_gid for group in _groups_of(user.pw_name))}
    for path in [*reversed(directory.parents), directory]:
        mode = path.stat()
        if mode.st_uid == user.pw_uid:
            allowed = mode.st_mode & SEARCH["user"]
        elif mode.st_gid in groups:
            allowed = mode.st_mode & SEARCH["group"]
        else:
            allowed = mode.st_mode & SEARCH["other"]
        if not allowed:
            return path
    return None


def _groups_of(name: str) -> list:
    return [group for group in grp.getgrall() if name in group.gr_mem]


def _install_for(user: pwd.struct_passwd, install: Path, beside: Path) -> Path:
    """pgserver's PostgreSQL tree, or where `user` cannot read it, a copy of it in `beside` (made once).

    The wheel's binaries find their shared libraries at $ORIGIN/../../../pgserver.libs (auditwheel's
    layout), so a copy keeps that layout: <copy>/pgserver/pginstall and <copy>/pgserver.libs.
    """
    libraries = install.parent.parent / f"{install.parent.name}.libs"
    needed = [install / "bin", install / "lib", *([libraries] if libraries.is_dir() else [])]
    if all(unsearchable(path, user) is None for path in needed) and (install / "bin" / "postgres").stat().st_mode \
            & stat.S_IXOTH:
        return install
    copy = beside / f".postgres-{importlib.metadata.version('pgserver')}"
    copied = copy / install.parent.name / install.name
    if not (copied / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix=".postgres-", dir=beside))
        shutil.copytree(install, staging / install.parent.name / install.name, symlinks=True)
        if libraries.is_dir():
            shutil.copytree(libraries, staging / libraries.name, symlinks=True)
        for root, _directories, files in os.walk(staging):
            os.chmod(root, 0o755)
            for name in files:
                path = Path(root) / name
                if not path.is_symlink():
                    path.chmod(0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644)
        staging.rename(copy)
    return copied


def _run_as(user: pwd.struct_passwd, command: list, cwd: Path) -> None:
    # Output to files, not pipes: the server started by pg_ctl inherits them, and a pipe would stay open.
    with tempfile.TemporaryFile("w+") as output:
        try:
            subprocess.run([str(part) for part in command], check=True, stdout=output, stderr=subprocess.STDOUT,
                           user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd=cwd,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
                           timeout=COMMAND_TIMEOUT + 10)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            output.seek(0)
            lines = [line for line in output.read().splitlines() if line.strip()]
            raise DatabaseError(f"{Path(command[0]).name} failed for the embedded PostgreSQL in {cwd} "
                                f"({lines[-1] if lines else exc}); its log is {cwd / 'log'}") from exc


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def refuse_unreachable(pgdata: Path, user: pwd.struct_passwd) -> None:
    blocked = unsearchable(pgdata.parent, user)
    if blocked is not None:
        raise DatabaseError(
            f"the embedded PostgreSQL runs as the system user {user.pw_name!r} when icldaemon runs as root, and "
            f"that user cannot reach {pgdata}: {blocked} is mode {stat.S_IMODE(blocked.stat().st_mode):04o} and "
            "icldaemon changes no permission outside its data directory; set ICLD_DATA_DIR to a directory it can "
            "reach (root's default is /var/lib/icldaemon), set ICLD_DATABASE_URL, or run icldaemon as a non-root "
            "user")
    socket_path = pgdata / SOCKET_NAME
    if len(os.fsencode(socket_path)) > SOCKET_PATH_LIMIT:
        raise DatabaseError(
            f"the embedded PostgreSQL's socket would be {socket_path} ({len(os.fsencode(socket_path))} bytes), longer "
            f"than a Unix socket's path may be ({SOCKET_PATH_LIMIT}); set ICLD_DATA_DIR to a shorter path")


@contextlib.contextmanager
def served_as_root(pgserver, pgdata: Path, handle_list_file: str) -> Iterator[tuple[str, int, bool]]:
    """Start or join the server in `pgdata` as the service user: yields (URL, server pid, started here)."""
    if pgdata in _IN_USE:  # joined again by this process: the outermost use starts and stops it
        yield (*_IN_USE[pgdata], False)
        return
    user = service_user()
    pgdata.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    refuse_unreachable(pgdata, user)
    install = _install_for(user, Path(pgserver.postgres_server.POSTGRES_BIN_PATH).parent, pgdata.parent)
    binaries = install / "bin"
    lock = pgdata.parent / f".{pgdata.name}.lock"
    handles = pgserver.utils.DiskList(pgdata / handle_list_file)
    with _locked(lock):
        pgdata.mkdir(mode=0o700, exist_ok=True)
        os.chown(pgdata, user.pw_uid, user.pw_gid)
        pgdata.chmod(0o700)
        if not (pgdata / "PG_VERSION").exists():
            # local connections only, through the socket in the data directory, which only the user can enter
            _run_as(user, [binaries / "initdb", "-D", pgdata, "--auth-local=trust", "--auth-host=reject",
                           "--encoding=utf8", "-U", "postgres"], pgdata)
        info = pgserver.utils.PostmasterInfo.read_from_pgdata(pgdata)
        started_here = info is None or not info.is_running()
        if started_here:
            handles.put([])  # nobody uses a server that is not running (a killed process stays on the list)
            _run_as(user, [binaries / "pg_ctl", "-D", pgdata, "-w", "-t", int(COMMAND_TIMEOUT), "-l", pgdata / "log",
                           "-o", f"-c listen_addresses='' -c unix_socket_directories='{pgdata}' "
                                 "-c unix_socket_permissions=0700", "start"], pgdata)
            info = pgserver.utils.PostmasterInfo.read_from_pgdata(pgdata)
            if info is None or not info.is_running():
                raise DatabaseError(f"the embedded PostgreSQL in {pgdata} did not start; its log is {pgdata / 'log'}")
        handles.get_and_add(os.getpid())
    _IN_USE[pgdata] = (info.get_uri(), info.pid)
    try:
        yield (*_IN_USE[pgdata], started_here)
    finally:
        del _IN_USE[pgdata]
        with _locked(lock):
            remaining = handles.get_and_remove(os.getpid())
            if started_here and remaining == [os.getpid()]:
                _run_as(user, [binaries / "pg_ctl", "-D", pgdata, "-w", "-t", int(COMMAND_TIMEOUT), "stop"], pgdata)
