"""The pool's durable ledger: every session and what it cost, in SQLite (WAL).

Each state change is its own committed transaction, so a pool killed with SIGKILL
loses nothing it had acknowledged; on restart, running sessions are reconciled
with their hosts (see ``Pool.reconcile``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["Ledger", "SessionRecord"]

ACTIVE_STATES = ("queued", "starting", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    hardware TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    last_seen REAL,
    gpu_type TEXT,
    count INTEGER,
    rate_per_hour REAL,
    host_id TEXT,
    host_url TEXT,
    kernel_id TEXT,
    token TEXT,
    gpus TEXT,
    simulated INTEGER DEFAULT 0,
    max_cost REAL,
    idle_timeout REAL,
    notebook TEXT,
    stop_reason TEXT,
    warnings TEXT,
    environment TEXT,
    error TEXT,
    hold_until REAL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user, created);
CREATE INDEX IF NOT EXISTS sessions_state ON sessions (state);
"""

#: Columns added since the first ledger, with their types: a ledger without them gets them.
_ADDED_COLUMNS = {"environment": "TEXT", "error": "TEXT", "hold_until": "REAL"}


@dataclass
class SessionRecord:
    """One session as the ledger keeps it.

    ``started``/``ended`` bound the billed time; ``rate_per_hour`` is fixed when the
    hardware is granted (count x the catalog price then). ``environment`` holds the pip
    requirements the kernel runs with; ``error`` names the cloudgpu error class of a
    session that failed to start (``EnvironmentBuildError``), for clients to raise.
    ``hold_until`` is set on a hold (``Pool.hold``): a warm kernel kept for a first cell,
    billed from its claim (``started`` stays unset until then). It is cleared by the claim,
    so a record that ends with it still set was never used, and never cost anything.
    """

    id: str
    user: str
    hardware: str
    state: str
    created: float
    started: float | None = None
    ended: float | None = None
    last_seen: float | None = None
    gpu_type: str | None = None
    count: int | None = None
    rate_per_hour: float | None = None
    host_id: str | None = None
    host_url: str | None = None
    kernel_id: str | None = None
    token: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    simulated: bool = False
    max_cost: float | None = None
    idle_timeout: float | None = None
    notebook: str | None = None
    stop_reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)
    error: str | None = None
    hold_until: float | None = None

    def cost(self, now: float | None = None, since: float | None = None) -> float:
        """Dollars billed so far (or between ``since`` and now)."""
        if self.started is None or not self.rate_per_hour:
            return 0.0
        end = self.ended if self.ended is not None else (now or time.time())
        start = max(self.started, since) if since is not None else self.started
        return max(end - start, 0.0) / 3600 * self.rate_per_hour

    @property
    def active(self) -> bool:
        """Queued, starting or running."""
        return self.state in ACTIVE_STATES

    @property
    def unclaimed_hold(self) -> bool:
        """A hold no cell took (yet): not the user's session, and never billed."""
        return self.hold_until is not None


_COLUMNS = [f.name for f in fields(SessionRecord)]
_JSON = {"gpus", "warnings", "environment"}


class Ledger:
    """SQLite storage of sessions; WAL journal, one transaction per change."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (not a power cut); FULL survives both.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a ledger written by an older pool lacks (its rows keep their data)."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(sessions)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE sessions ADD COLUMN {column} {kind}")

    def save(self, record: SessionRecord) -> None:
        """Insert or replace one session, committed before returning."""
        row = asdict(record)
        values = [json.dumps(row[c]) if c in _JSON else row[c] for c in _COLUMNS]
        self.db.execute(
            f"INSERT OR REPLACE INTO sessions ({', '.join(_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_COLUMNS))})",
            values,
        )

    def _records(self, where: str, args: tuple[Any, ...] = ()) -> list[SessionRecord]:
        cursor = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM sessions {where} ORDER BY created", args
        )
        out = []
        for row in cursor.fetchall():
            data = dict(zip(_COLUMNS, row, strict=True))
            for c in _JSON:
                data[c] = json.loads(data[c]) if data[c] else []
            data["simulated"] = bool(data["simulated"])
            out.append(SessionRecord(**data))
        return out

    def get(self, session_id: str) -> SessionRecord | None:
        """One session by id."""
        found = self._records("WHERE id = ?", (session_id,))
        return found[0] if found else None

    def active(self) -> list[SessionRecord]:
        """Every queued, starting or running session, oldest first."""
        return self._records(f"WHERE state IN {ACTIVE_STATES!r}")

    def for_user(self, user: str, since: float = 0.0) -> list[SessionRecord]:
        """A user's sessions that were active at or after ``since``."""
        return self._records("WHERE user = ? AND (ended IS NULL OR ended >= ?)", (user, since))

    def touch(self, session_ids: list[str], now: float) -> None:
        """Record that these running sessions were seen alive at ``now``."""
        self.db.executemany("UPDATE sessions SET last_seen = ? WHERE id = ?",
                            [(now, i) for i in session_ids])

    def close(self) -> None:
        """Close the database."""
        self.db.close()
