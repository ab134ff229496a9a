"""Environments for kernels that ask for packages: virtual environments made with uv, cached.

A session's ``environment`` (pip requirement strings) becomes one virtual environment
under ``Environments.cache_dir``, in a folder named by its key (a hash of the sorted
requirements and of the host's Python, ``cloudgpu.environment.environment_key``), so a
second kernel with the same requirements starts at once. ``uv venv`` makes it from the
host's own Python, and a ``.pth`` file adds the host's site-packages *after* its own: the
kernel still imports ipykernel and the cloudgpu agent from the host, while what the
requirements install comes first. A requirement that cannot be met fails with uv's own
message. A folder is complete once it holds ``cloudgpu-environment.json``; one without it
(a host killed mid-build) is built again. Builds of one key never overlap, also across
hosts sharing the folder (a lock file per key).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import site
import sys
import time
from pathlib import Path
from typing import IO, Any

from traitlets import Unicode, default
from traitlets.config import LoggingConfigurable

from cloudgpu.environment import environment_key
from cloudgpu.errors import EnvironmentBuildError

__all__ = ["MARKER", "EnvironmentBuild", "Environments"]

MARKER = "cloudgpu-environment.json"
"""Written last into an environment's folder: its requirements and how it was made."""
INSTALL_LOG = "install.log"
#: uv lines kept in the log but not worth a notebook's status line.
_QUIET = ("Using ", "Activate with", "Creating virtual environment")
#: Progress lines a build keeps for the clients that ask what came since their last look.
_LINES_KEPT = 200


class EnvironmentBuild:
    """One environment: being prepared, ready, or failed.

    Attributes:
        id: its key (the folder's name).
        requirements: what it installs.
        path: its folder.
        state: ``preparing``, ``ready`` or ``failed``.
        progress: the installer's latest line, for the notebook's status line (every line,
            by the version it came with, in ``to_json(since)``).
        error: the installer's message when it failed.
        cached: True when it was ready before this host was asked (nothing was installed).
        version: bumped at every change, for long polls.
    """

    def __init__(self, key: str, requirements: list[str], path: Path) -> None:
        self.id = key
        self.requirements = list(requirements)
        self.path = path
        self.state = "preparing"
        self.progress = ""
        self.error: str | None = None
        self.cached = False
        self.version = 0
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=_LINES_KEPT)

    @property
    def python(self) -> Path:
        """The environment's interpreter."""
        return self.path / "bin" / "python"

    def update(self, *, progress: str | None = None, state: str | None = None) -> None:
        """Record a change and wake whoever waits for one."""
        self.version += 1
        if progress is not None:
            self.progress = progress
            self._lines.append((self.version, progress))
        if state is not None:
            self.state = state
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self, version: int, timeout: float) -> None:
        """Return once the build changed past ``version``, or after ``timeout`` seconds."""
        if self.version != version:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def ready(self) -> EnvironmentBuild:
        """This build once it is ready.

        Raises:
            EnvironmentBuildError: it failed; the message is the installer's.
        """
        if self.task is not None:
            await asyncio.shield(self.task)
        if self.state != "ready":
            raise EnvironmentBuildError(self.error or "the environment could not be prepared")
        return self

    def to_json(self, since: int = -1) -> dict[str, Any]:
        """As ``/api/cloudgpu/environments/{id}`` shows it; ``lines``: the progress lines
        that came after version ``since`` (a client polling with the version it has
        misses none, however fast uv prints)."""
        return {"id": self.id, "requirements": self.requirements, "state": self.state,
                "progress": self.progress, "error": self.error, "cached": self.cached,
                "path": str(self.path), "version": self.version,
                "lines": [line for version, line in self._lines if version > since]}


class Environments(LoggingConfigurable):
    """The host's environments: prepared on request with uv, cached on disk by key."""

    cache_dir = Unicode(
        help="Where environments are made and kept, one folder per set of requirements "
        "(default: cloudgpu/environments in Jupyter's data folder). Delete a folder to make "
        "its environment again."
    ).tag(config=True)
    uv = Unicode(
        help="The uv executable that makes environments (default: the one the `uv` package "
        "ships). uv reads its own settings from the environment, e.g. UV_INDEX_URL.",
    ).tag(config=True)

    @default("cache_dir")
    def _default_cache_dir(self) -> str:
        from jupyter_core.paths import jupyter_data_dir

        return os.path.join(jupyter_data_dir(), "cloudgpu", "environments")

    @default("uv")
    def _default_uv(self) -> str:
        try:
            from uv import find_uv_bin

            return str(find_uv_bin())
        except (ImportError, FileNotFoundError):
            return shutil.which("uv") or "uv"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.builds: dict[str, EnvironmentBuild] = {}

    def path(self, key: str) -> Path:
        """The folder of the environment ``key``."""
        return Path(self.cache_dir) / key

    def is_ready(self, key: str) -> bool:
        """Whether the environment ``key`` is complete on disk."""
        return (self.path(key) / MARKER).exists()

    def prepare(self, requirements: list[str]) -> EnvironmentBuild:
        """The environment for ``requirements``, its build started unless it is under way or
        done (a failed one is tried again)."""
        key = environment_key(requirements)
        build = self.builds.get(key)
        if build is not None and build.state == "ready" and not build.cached:
            build.cached = True  # made for an earlier request: nothing to install for this one
            build.update(progress=f"using the cached environment {build.id}")
        if build is not None and build.state != "failed":
            return build
        build = EnvironmentBuild(key, requirements, self.path(key))
        self.builds[key] = build
        build.task = asyncio.get_running_loop().create_task(self._build(build))
        return build

    def get(self, key: str) -> EnvironmentBuild | None:
        """A build this host started, or an environment it finds complete on disk."""
        build = self.builds.get(key)
        if build is None and self.is_ready(key):
            build = EnvironmentBuild(key, _read_marker(self.path(key)).get("requirements", []),
                                     self.path(key))
            build.state, build.cached = "ready", True
        return build

    async def _build(self, build: EnvironmentBuild) -> None:
        try:
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            lock = await asyncio.to_thread(_lock, Path(self.cache_dir) / f"{build.id}.lock")
            try:
                await self._make(build)
            finally:
                lock.close()
        except EnvironmentBuildError as e:
            build.error = str(e)
            build.update(state="failed")
            self.log.warning("Environment %s failed: %s", build.id, e)
        except Exception as e:  # OSError and the like: the message still reaches the user
            build.error = f"the environment could not be prepared: {type(e).__name__}: {e}"
            build.update(state="failed")
            self.log.exception("Environment %s failed", build.id)

    async def _make(self, build: EnvironmentBuild) -> None:
        if self.is_ready(build.id):
            build.cached = True
            build.update(progress=f"using the cached environment {build.id}", state="ready")
            self.log.info("Environment %s (%s): cached", build.id, " ".join(build.requirements))
            return
        started = time.monotonic()
        shutil.rmtree(build.path, ignore_errors=True)  # what an interrupted build left
        log: list[str] = []
        build.update(progress="creating a virtual environment with uv ...")
        await self._uv(build, log, "venv", "--python", sys.executable, str(build.path))
        site_packages = _site_packages(build.path)
        (site_packages / "_cloudgpu_host.pth").write_text(_host_sites_pth())
        build.update(progress=f"installing {', '.join(build.requirements)} ...")
        await self._uv(build, log, "pip", "install", "--python", str(build.python), "--",
                       *build.requirements)
        (build.path / INSTALL_LOG).write_text("\n".join(log) + "\n")
        (build.path / MARKER).write_text(json.dumps({
            "requirements": build.requirements, "key": build.id, "python": sys.executable,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }, indent=1))
        seconds = time.monotonic() - started
        build.update(progress=f"environment ready in {seconds:.1f} s", state="ready")
        self.log.info("Environment %s (%s): made in %.1f s", build.id,
                      " ".join(build.requirements), seconds)

    async def _uv(self, build: EnvironmentBuild, log: list[str], *args: str) -> None:
        """Run uv, each line of its output becoming the build's progress.

        Raises:
            EnvironmentBuildError: uv failed; its own message, and the folder removed.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
        env.update(UV_PYTHON_DOWNLOADS="never", NO_COLOR="1", UV_NO_PROGRESS="1")
        try:
            proc = await asyncio.create_subprocess_exec(
                self.uv, *args, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env)
        except OSError as e:
            raise EnvironmentBuildError(
                f"Cannot run uv ({self.uv}) to prepare the environment: {e}. Install it on the "
                f"host (`pip install uv`) or set Environments.uv.") from e
        assert proc.stdout is not None
        output = []
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            log.append(line)
            output.append(line)
            if line.strip() and not line.startswith(_QUIET):
                build.update(progress=line.strip())
        if await proc.wait() != 0:
            shutil.rmtree(build.path, ignore_errors=True)
            said = "\n".join(line for line in output if not line.startswith("Using "))
            raise EnvironmentBuildError(
                f"The remote environment [{', '.join(build.requirements)}] could not be "
                f"prepared; uv {args[0]} said:\n{said.strip()}")


def _lock(path: Path) -> IO[str]:
    handle = open(path, "w")  # closed by the caller, which releases the lock with it
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python*/site-packages"))
    if not found:
        raise EnvironmentBuildError(f"uv made no site-packages folder in {env}.")
    return found[0]


def _host_sites_pth() -> str:
    """A ``.pth`` line that adds the host's site folders (processing their own ``.pth``
    files, so editable installs work) after the environment's."""
    sites = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        sites.append(site.getusersitepackages())
    calls = "; ".join(f"site.addsitedir({p!r})" for p in sites if os.path.isdir(p))
    return f"import site; {calls}\n"


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((path / MARKER).read_text()))
    except (OSError, ValueError):
        return {}
