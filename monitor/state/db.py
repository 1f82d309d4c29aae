"""Opening an execmon state file: the single-writer lock, the schema and its version, and how
sqlite errors are reported.

A state file is only ever opened by one process for writing. The lock is an `flock` on a
sibling `<real path>.lock` file (symlinks resolved, so that two names of one file share one lock),
so the kernel releases it when the process dies, even on kill -9. The state file and its lock are
created 0600 whatever the umask; sqlite gives the -wal and -shm files the database file's mode.
A file this version cannot read (a newer schema, a corrupt or foreign file) is refused with a
message that says what to do; it is never overwritten.

Corruption is decided only at open (`PRAGMA quick_check` and the schema version): StateError.
After that, every failing statement is a StoreFault (disk full, I/O error, busy, ...), never
"corrupt": the transaction is rolled back and the caller may try again later.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from monitor._version import __version__
from monitor.errors import ExecmonError, StoreFault, UsageError

SCHEMA_VERSION = 2
_PRIVATE = 0o600  # the state file and its lock: results, labels and the schedule are nobody else's

_SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE executions (
    execution_id TEXT PRIMARY KEY,
    tracked_since REAL NOT NULL,
    deadline_at REAL,
    grp TEXT,
    batch TEXT,
    labels_json TEXT NOT NULL DEFAULT '{}',
    schedule_json TEXT,
    last_status_json TEXT,
    polls INTEGER NOT NULL DEFAULT 0,
    terminal_outcome TEXT,
    terminal_at REAL,
    record_json TEXT
);
CREATE INDEX executions_by_batch ON executions (batch) WHERE batch IS NOT NULL;
CREATE INDEX executions_by_outcome ON executions (terminal_outcome, tracked_since, execution_id);
CREATE INDEX executions_by_tracked ON executions (tracked_since, execution_id);
CREATE INDEX executions_by_terminal_at ON executions (terminal_at) WHERE terminal_at IS NOT NULL;
CREATE TABLE batches (
    batch TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    members INTEGER NOT NULL DEFAULT 0,
    terminal INTEGER NOT NULL DEFAULT 0,
    digest_at REAL,
    created_at REAL NOT NULL
);
CREATE INDEX batches_by_digest_at ON batches (digest_at) WHERE digest_at IS NOT NULL;
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    sink TEXT NOT NULL,
    kind TEXT NOT NULL,
    execution_id TEXT,
    record_json TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (event_id, sink)
);
CREATE INDEX outbox_by_sink_state ON outbox (sink, state, next_attempt_at);
CREATE INDEX outbox_by_execution ON outbox (execution_id, state);
CREATE INDEX outbox_by_state ON outbox (state, updated_at);
CREATE TABLE budget (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stamp REAL NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX budget_by_stamp ON budget (stamp);
"""


class StateError(UsageError):
    """The state file cannot be used (in use, newer, corrupt, unreachable). Exit status 2."""


class StateInUse(StateError):
    """Another execmon holds the state file (a daemon may then do the job through its control API)."""


class FileLock:
    """An exclusive `flock` on `<state>.lock` holding the owner's pid (for the error message).

    A clean close leaves a mark there instead: the state file's inode, size, mtime and ctime once
    sqlite had closed it. The next owner that finds the file as marked knows that nothing changed
    it since: it was checked when it was opened and only sqlite wrote it, so it is not read whole
    again (quick_check reads every page: seconds for a big file). After a crash there is no mark.
    """

    def __init__(self, state_path: Path) -> None:
        real = state_path.resolve()  # a symlink to the file (or to its directory) takes the same lock
        self.path = real.with_name(real.name + ".lock")
        self.state = real
        self._fd: int | None = None
        self._found = ""  # what the previous owner left in the lock file

    def acquire(self, state_path: Path) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _PRIVATE)
        except OSError as exc:
            raise StateError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        with contextlib.suppress(OSError):  # whatever the umask; a lock file someone else owns stays as it is
            os.fchmod(fd, _PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            who = f" (pid {owner})" if owner else ""
            raise StateInUse(
                f"state file {state_path} is in use by another execmon{who}; stop it first, "
                "or give this one another state file"
            ) from None
        self._found = _read_text(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def unchanged_since_clean_close(self) -> bool:
        """The state file is exactly as the last owner left it when it closed cleanly."""
        return self._found.startswith(_CLEAN) and self._found == _clean_mark(self.state)

    def release(self, *, clean: bool = False) -> None:
        """Drop the lock; `clean`: sqlite closed the file after work that met no fault, mark it."""
        if self._fd is not None:
            mark = _clean_mark(self.state) if clean else None
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                if mark:
                    os.pwrite(self._fd, mark.encode(), 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


_CLEAN = "closed "


def _clean_mark(state: Path) -> str | None:
    """What tells a changed file without reading it; None while a -wal file holds more of it."""
    try:
        if state.with_name(state.name + "-wal").exists():
            return None
        st = state.stat()
    except OSError:
        return None
    return f"{_CLEAN}{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n"


def _read_text(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("ascii", "replace")
    except OSError:
        return ""


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# Result codes (extended ones start with these) that mean "you may not open this file" at start.
_NO_ACCESS = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")
# The machine failing under a good file (disk full, I/O error, busy): a fault, even at start.
_TRANSIENT = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED")


def connect(path: Path | None, *, read_only: bool, checked: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal, file checked
    (`checked=True`: unchanged since an earlier check, see FileLock; its schema is still checked).

    `path=None` gives a private in-memory database with the same schema (nothing to check).
    """
    if path is None:
        conn = _sqlite_connect(":memory:", None, uri=False)
        conn.row_factory = sqlite3.Row
        _create(conn)
        return conn
    if not path.parent.is_dir():
        raise StateError(f"cannot open state file {path}: directory {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise StateError(f"state file {path} is not a regular file")
    if read_only:
        conn = _sqlite_connect(f"{path.resolve().as_uri()}?mode=ro", path, uri=True)
    else:
        real = path.resolve()  # the file the lock is named after
        _create_private(real, path)
        conn = _sqlite_connect(str(real), path, uri=False)
    conn.row_factory = sqlite3.Row
    try:
        if not read_only:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        _check_or_create_schema(conn, path, read_only=read_only)
        if not checked:
            _check_integrity(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _open_error(path, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private(real: Path, path: Path) -> None:
    """Create a new state file 0600 before sqlite does (sqlite would use the umask, and gives the
    -wal and -shm files the database file's mode). An existing file keeps its mode."""
    try:
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _PRIVATE)
    except FileExistsError:
        return
    except OSError as exc:
        raise StateError(f"cannot create state file {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, _PRIVATE)  # whatever the umask
    finally:
        os.close(fd)


def _sqlite_connect(target: str, path: Path | None, *, uri: bool) -> sqlite3.Connection:
    try:
        # Autocommit (isolation_level=None): the store opens every transaction itself. Used by one
        # caller at a time, but not always on the thread that opened it (opened before the loop runs).
        return sqlite3.connect(target, isolation_level=None, check_same_thread=False, uri=uri)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open {_describe(path)}: {exc}") from None


def _describe(path: Path | None) -> str:
    return "the in-memory state" if path is None else f"state file {path}"


def _open_error(path: Path, exc: sqlite3.DatabaseError) -> ExecmonError:
    """At start: a file we may not open or cannot read is refused; a machine fault stays a fault."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_NO_ACCESS):
        return StateError(f"cannot open state file {path}: {exc}")
    if name.startswith(_TRANSIENT):
        return _fault(path, exc)
    return _unreadable(path, exc)


def _unreadable(path: Path, reason: object) -> StateError:
    return StateError(
        f"state file {path} is not a usable execmon state file ({reason}); it was left untouched: "
        "move it aside or give another state file"
    )


def _fault(path: Path | None, exc: sqlite3.Error | OSError) -> StoreFault:
    """The store failed under a good file: name the file and the cause (with sqlite's code name)."""
    if isinstance(exc, OSError):
        return StoreFault(f"{_describe(path)}: {exc.strerror or exc}")
    name = getattr(exc, "sqlite_errorname", None)
    return StoreFault(f"{_describe(path)}: {exc}" + (f" ({name})" if name else ""))


# 1 -> 2, bounded state: every request path and the pruning find their rows through an index
# (lists in their order, an execution's outbox rows, rows by state and age, ended executions by age).
_INDEXES_V2 = (
    "DROP INDEX executions_by_outcome",
    "CREATE INDEX executions_by_outcome ON executions (terminal_outcome, tracked_since, execution_id)",
    "CREATE INDEX executions_by_tracked ON executions (tracked_since, execution_id)",
    "CREATE INDEX executions_by_terminal_at ON executions (terminal_at) WHERE terminal_at IS NOT NULL",
    "CREATE INDEX batches_by_digest_at ON batches (digest_at) WHERE digest_at IS NOT NULL",
    "CREATE INDEX outbox_by_execution ON outbox (execution_id, state)",
    "CREATE INDEX outbox_by_state ON outbox (state, updated_at)",
)

# From each schema version to the next, applied in order at open, in one transaction with the
# version bump (`_SCHEMA` above is always the newest, for new files).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 1 -> 2: a group digest per batch (each use of a group name), no longer one per name.
    2: (
        "ALTER TABLE executions ADD COLUMN batch TEXT",
        "UPDATE executions SET batch = 'legacy:' || grp WHERE grp IS NOT NULL",
        "CREATE TABLE batches (batch TEXT PRIMARY KEY, name TEXT NOT NULL, members INTEGER NOT NULL DEFAULT 0,"
        " terminal INTEGER NOT NULL DEFAULT 0, digest_at REAL, created_at REAL NOT NULL)",
        "INSERT INTO batches (batch, name, members, terminal, digest_at, created_at)"
        " SELECT 'legacy:' || name, name, members, terminal, digest_at, 0 FROM groups",
        "DROP TABLE groups",
        "DROP INDEX IF EXISTS executions_by_group",
        "CREATE INDEX executions_by_batch ON executions (batch) WHERE batch IS NOT NULL",
        *_INDEXES_V2,  # after the batches table
    ),
}


def _migrate(conn: sqlite3.Connection, path: Path, version: int, *, read_only: bool) -> None:
    """Bring a file written by an older execmon up to SCHEMA_VERSION (never a read-only opener)."""
    if read_only:
        raise StateError(
            f"state file {path} has schema {version} (an older execmon); start `execmon run` or a watch "
            "with it once to upgrade it, then try again"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _check_or_create_schema(conn: sqlite3.Connection, path: Path, *, read_only: bool) -> None:
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        if read_only:
            raise StateError(f"state file {path} is empty: nothing has been tracked with it yet")
        _create(conn)
        return
    if "meta" not in tables:
        raise StateError(f"{path} is an SQLite file but not an execmon state file; give another state file")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row and str(row[0]).isdigit() else None
    if version is None:
        raise StateError(f"state file {path} has no schema version; move it aside or give another state file")
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state file {path} was written by a newer execmon (schema {version}; this execmon {__version__} "
            f"reads up to {SCHEMA_VERSION}); upgrade execmon or give another state file"
        )
    if version < SCHEMA_VERSION:
        _migrate(conn, path, version, read_only=read_only)


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """The only place that calls a file corrupt: later errors are faults, never corruption."""
    problems = [" ".join(str(row[0]).split()) for row in conn.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:  # a damaged page may also raise SQLITE_CORRUPT here: refused the same way
        raise _unreadable(path, "damaged: " + "; ".join(problems))


def _create(conn: sqlite3.Connection) -> None:
    """Create the schema and the meta rows in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("schema_version", str(SCHEMA_VERSION)), ("created_by", f"execmon {__version__}")],
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # sqlite may have rolled back already
            conn.execute("ROLLBACK")
        raise


class Connection:
    """The one connection of a Store: short explicit transactions; any sqlite failure is a StoreFault.

    Everything runs on the event loop, one call at a time, so there is no lock. IntegrityError and
    ProgrammingError are bugs in the caller and pass through unchanged.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path | None) -> None:
        self.conn = conn
        self.path = path
        self.faulted = False  # any fault so far: the file is read whole at the next open
        self._durable = True

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE .. COMMIT, rolled back on any error so nothing is half-written.

        `durable=False` (bookkeeping) skips the fsync of this commit: WAL keeps it safe against a
        killed process (our crash model), and the next durable commit syncs it too.
        """
        with self._faults():
            self._begin(durable)
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._faults():
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self.conn.close()

    def _begin(self, durable: bool) -> None:
        self._rollback()  # a ROLLBACK that failed last time must not block this transaction
        if durable != self._durable:
            self.conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        self.conn.execute("BEGIN IMMEDIATE")

    def _rollback(self) -> None:
        if self.conn.in_transaction:  # after FULL, IOERR or BUSY sqlite may have rolled back itself
            with contextlib.suppress(sqlite3.Error):  # then sqlite rolls back when it can
                self.conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise  # a bug in the caller, not the store failing
        except (sqlite3.DatabaseError, OSError) as exc:
            self.faulted = True
            raise _fault(self.path, exc) from exc
