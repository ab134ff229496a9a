"""The interface every pool backend implements, and how the pool finds one by name.

A backend knows where kernels can run (slots: hosts, Ray nodes) and starts, probes and
stops kernels there. The pool decides *which* slot; the backend does the rest. Backends
are found through the ``cloudgpu.backends`` entry point group, so a package can add one.

Most of the conversation is the pool calling the backend. A backend whose hardware
changes on its own (a cluster: nodes join and leave, other jobs take GPUs) also tells the
pool, through the :class:`BackendEvents` it is connected to: its slots changed, or a
kernel was lost (and why). The pool in turn tells it what waits for hardware
(:meth:`Backend.waiting`), so a cluster can grow for it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from traitlets.config import LoggingConfigurable

from cloudgpu.errors import CloudGPUError, EnvironmentBuildError, HostConnectionError
from cloudgpu.hardware import Catalog, Choice, HardwareSpec
from cloudgpu.host_client import HostClient

from .scheduler import Slot

__all__ = ["Backend", "BackendEvents", "HostsBackend", "Placement", "load_backend",
           "progress_to", "report_progress", "slot_of", "stop_on_host_if_idle"]

ENTRY_POINT_GROUP = "cloudgpu.backends"
HEARTBEAT_TIMEOUT = 5.0
#: Seconds a backend's long poll of a host's environment build waits for news.
ENVIRONMENT_POLL = 20.0

_progress: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "cloudgpu_launch_progress", default=None)


def report_progress(text: str) -> None:
    """Tell whoever waits for the launch under way how it goes (``installing numpy ...``).

    A backend calls this from inside :meth:`Backend.launch`; the pool shows the line as the
    session's ``progress`` while it is ``starting``, and notebooks show it under the cell.
    Outside a launch it does nothing.
    """
    callback = _progress.get()
    if callback is not None:
        callback(text)


def progress_to(callback: Callable[[str], None]) -> contextvars.Token[
        Callable[[str], None] | None]:
    """Send :func:`report_progress` lines of this task (the pool's launch) to ``callback``."""
    return _progress.set(callback)

#: Why a kernel the pool probed is gone, when the backend knows no better.
GONE = "its remote kernel is gone (it died, or its host did)"


@dataclass
class Placement:
    """A kernel a backend started for a session."""

    slot_id: str
    host_url: str
    kernel_id: str
    gpus: list[dict[str, Any]] = field(default_factory=list)
    simulated: bool = False


class BackendEvents(Protocol):
    """What a backend tells the pool between calls (the pool implements this)."""

    def slots_changed(self, slots: list[Slot]) -> None:
        """The backend's slots are now these (each with its ``total`` and ``reserved``):
        a node joined or left, or GPUs were taken or freed outside the pool."""

    def placement_lost(self, placement: Placement, reason: str) -> None:
        """A kernel the backend started is gone, for ``reason`` (said to its user).
        ``placement.kernel_id`` may be empty: its ``host_url`` names it then."""

    def kernels(self) -> set[str]:
        """The kernels the pool's sessions and warm kernels hold now (a sweep keeps them)."""


class Backend(LoggingConfigurable):
    """Where a pool's kernels run."""

    name: ClassVar[str] = ""
    #: True when this backend's hosts serve several people whoever the pool's users are
    #: (a static list of machines): the pool then refuses hosts that do not isolate kernels.
    shared: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.catalog = Catalog.default()
        self.events: BackendEvents | None = None

    def connect(self, catalog: Catalog, events: BackendEvents) -> None:
        """Called by the pool before :meth:`start`: its catalog, and where to report changes."""
        self.catalog = catalog
        self.events = events

    # Traitlets' metaclass rules out abc.ABC here; subclasses must override these four.

    async def start(self) -> list[Slot]:
        """Bring the backend up; return the slots it offers."""
        raise NotImplementedError

    async def launch(self, slot_id: str, choice: Choice, scoped_token: str | None,
                     environment: list[str] | None = None) -> Placement:
        """Start a kernel holding ``choice`` on ``slot_id``, opened by ``scoped_token``, in an
        environment with the pip requirements ``environment`` when given (progress through
        :func:`report_progress`).

        Raises:
            EnvironmentBuildError: the environment cannot be prepared (the installer's message).
        """
        raise NotImplementedError

    async def sweep(self, keep: set[str]) -> int:
        """Stop kernels this pool started but no longer knows (left by a crash); how many."""
        return 0

    async def stop(self, placement: Placement) -> None:
        """Stop that kernel and free its hardware; a kernel already gone is stopped.

        Raises:
            HostConnectionError: its host cannot be reached now; the pool asks again once
                :meth:`heartbeat` finds it answering.
        """
        raise NotImplementedError

    async def stop_if_idle(self, placement: Placement, since: str | None, reason: str) -> bool:
        """Stop that kernel for ``reason`` only if it was not active after ``since`` (the
        ``last_activity`` :meth:`probe` read) and runs nothing now, in one step on its host,
        so that a cell arriving meanwhile either keeps it or never starts in it; whether it
        was stopped. The pool then ends the session with :meth:`stop` as ever.

        This default cannot ask and says True: the pool stops the kernel the plain way.
        """
        return True

    async def probe(self, placement: Placement) -> dict[str, Any] | None:
        """The kernel's Jupyter model (``execution_state``, ``last_activity``); for a kernel
        that ended, what its host remembers of the end (``cloudgpu.state`` ``died`` or
        ``stopped``, ``ended``, ``reason``, ``stopped_for``); None when its host knows nothing
        of it.

        Raises:
            CloudGPUError: its host could not be asked (the heartbeat judges hosts).
        """
        raise NotImplementedError

    async def heartbeat(self) -> dict[str, dict[str, Any] | None]:
        """Each slot's liveness: its host's info (``instance`` changes when it restarts), or
        None when it did not answer. Slots left out are not watched."""
        return {}

    async def metrics(self, placements: list[Placement]) -> dict[str, dict[str, Any]]:
        """Live readings per kernel id (utilization, memory); empty where none can be read."""
        return {}

    async def close(self) -> None:
        """Release what the backend holds."""

    async def lost_reason(self, placement: Placement) -> str:
        """Why a kernel :meth:`probe` found gone is gone, in words for its user."""
        return GONE

    def waiting(self, specs: list[HardwareSpec]) -> None:
        """The requests that wait for hardware now, first in line first (called when this
        changes). A backend that can grow (a cluster's autoscaler) asks for it here."""


class HostsBackend(Backend):
    """A backend whose slots are cloudgpu hosts reached by URL with their host token."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hosts: dict[str, HostClient] = {}

    async def slot_for(self, url: str, token: str, slot_id: str | None = None) -> Slot:
        """Read a host's inventory and offer it as a slot (by default its URL is the slot id)."""
        client = HostClient(url, token)
        info = await client.info()
        slot_id = slot_id or client.url
        old = self.hosts.get(slot_id)
        self.hosts[slot_id] = client
        if old is not None:
            await old.aclose()
        return slot_of(slot_id, info)

    async def launch(self, slot_id: str, choice: Choice, scoped_token: str | None,
                     environment: list[str] | None = None) -> Placement:
        """Start the kernel through the host's ``POST /api/cloudgpu/kernels``; an environment
        is prepared first, its progress reported as it goes."""
        host = self.hosts[slot_id]
        if environment:
            await self._prepare(host, environment)
        model = await host.start_kernel(str(choice), scoped_token=scoped_token,
                                        environment=environment)
        gpus = model.get("cloudgpu", {}).get("gpus", [])
        return Placement(slot_id, host.url, model["id"], gpus,
                         simulated=any(g.get("simulated") for g in gpus))

    async def _prepare(self, host: HostClient, environment: list[str]) -> None:
        """Have the host prepare the environment, reporting its progress, until it is ready.

        Raises:
            EnvironmentBuildError: the host could not prepare it (the installer's message).
        """
        def report(build: dict[str, Any]) -> None:
            # Every line since the last look; a host before `lines` gives its latest only.
            for line in build.get("lines", [build["progress"]] if build["progress"] else []):
                report_progress(f"environment: {line}")

        build = await host.prepare_environment(environment)
        while build["state"] == "preparing":
            report(build)
            build = await host.environment(build["id"], wait=ENVIRONMENT_POLL,
                                           version=build["version"])
        if build["state"] != "ready":
            raise EnvironmentBuildError(build["error"] or "the environment could not be "
                                                          "prepared")
        if build["cached"]:
            report_progress("environment: cached, nothing to install")
        else:
            report(build)

    async def sweep(self, keep: set[str], slot_ids: list[str] | None = None) -> int:
        """Stop every kernel on our hosts (or those of ``slot_ids``) that is not in
        ``keep``; a host that cannot be asked is passed over (it is swept when it joins)."""
        stopped = 0
        for slot_id, host in self.hosts.items():
            if slot_ids is not None and slot_id not in slot_ids:
                continue
            try:
                for kernel in await host.request("GET", "/api/kernels"):
                    if kernel["id"] not in keep:
                        await host.shutdown(kernel["id"])
                        stopped += 1
            except HostConnectionError as e:
                self.log.warning("Could not look for kernels to stop on %s: %s", host.url, e)
        return stopped

    async def stop(self, placement: Placement) -> None:
        """``DELETE /api/kernels/{id}`` on its host (which may no longer have it).

        Raises:
            HostConnectionError: the host cannot be reached.
        """
        host = self.hosts.get(placement.slot_id)
        if host is None:
            return
        try:
            await host.stop_kernel(placement.kernel_id)
        except HostConnectionError:
            raise
        except CloudGPUError as e:  # it answered: asking again would get the same answer
            self.log.warning("Host %s could not stop kernel %s: %s", host.url,
                             placement.kernel_id, e)

    async def stop_if_idle(self, placement: Placement, since: str | None, reason: str) -> bool:
        """``POST /api/cloudgpu/kernels/{id}/stop`` on its host, only if idle since ``since``."""
        host = self.hosts.get(placement.slot_id)
        if host is None:
            return True
        return await stop_on_host_if_idle(host, placement, since, reason, self.log)

    async def probe(self, placement: Placement) -> dict[str, Any] | None:
        """``GET /api/cloudgpu/kernels/{id}``; None when the host knows nothing of it."""
        host = self.hosts.get(placement.slot_id)
        if host is None:
            return None
        return await host.kernel_state(placement.kernel_id)

    async def lost_reason(self, placement: Placement) -> str:
        """A host that answers but knows nothing of the kernel restarted since: it remembers
        every kernel it ran, and how each ended."""
        return "its machine was lost: its host restarted and no longer knows the kernel"

    async def heartbeat(self) -> dict[str, dict[str, Any] | None]:
        """Ask every host for its info at once; ``HEARTBEAT_TIMEOUT`` s each."""
        async def beat(host: HostClient) -> dict[str, Any] | None:
            try:
                return await asyncio.wait_for(host.info(), HEARTBEAT_TIMEOUT)
            except (CloudGPUError, asyncio.TimeoutError):
                return None

        slots = list(self.hosts.items())
        answers = await asyncio.gather(*(beat(host) for _, host in slots))
        return {slot_id: answer for (slot_id, _), answer in zip(slots, answers, strict=True)}

    async def metrics(self, placements: list[Placement]) -> dict[str, dict[str, Any]]:
        """``GET /api/cloudgpu/metrics`` once per host for its kernels among ``placements``.

        A host that cannot answer gives its kernels an ``error`` reading instead.
        """
        by_slot: dict[str, list[str]] = {}
        for placement in placements:
            by_slot.setdefault(placement.slot_id, []).append(placement.kernel_id)
        out: dict[str, dict[str, Any]] = {}
        for slot_id, kernel_ids in by_slot.items():
            host = self.hosts.get(slot_id)
            if host is None:
                continue
            query = "&".join(f"kernel={k}" for k in kernel_ids)
            try:
                found = await host.request("GET", f"/api/cloudgpu/metrics?{query}")
            except CloudGPUError as e:
                self.log.warning("No readings from host %s: %s", host.url, e)
                out.update({k: {"error": f"the host gave no readings: {e}"} for k in kernel_ids})
                continue
            out.update(found["kernels"])
        return out

    async def close(self) -> None:
        """Close the HTTP clients."""
        for client in self.hosts.values():
            await client.aclose()
        self.hosts.clear()


async def stop_on_host_if_idle(host: HostClient, placement: Placement, since: str | None,
                               reason: str, log: Any) -> bool:
    """:meth:`Backend.stop_if_idle` through the kernel's host client; a host that cannot be
    asked now says True (the plain stop follows, as before; the heartbeat judges hosts)."""
    try:
        return await host.stop_if_idle(placement.kernel_id, since, reason)
    except CloudGPUError as e:
        log.info("Could not ask %s to stop kernel %s if idle: %s", host.url,
                 placement.kernel_id, e)
        return True


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name`` in the ``cloudgpu.backends`` group.

    Raises:
        CloudGPUError: naming the backends that are installed.
    """
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise CloudGPUError(
            f"Unknown pool backend `{name}`. Installed: {', '.join(sorted(found)) or 'none'}. "
            f"(Backends register under the `{ENTRY_POINT_GROUP}` entry point group.)"
        )
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise CloudGPUError(f"Pool backend `{name}` ({found[name].value}) is not a Backend.")
    return cls


def slot_of(slot_id: str, info: dict[str, Any]) -> Slot:
    """The slot a host's info (``GET /api/cloudgpu/host``) offers: its GPUs by type, whether
    they are simulated, how it isolates kernels."""
    inventory = info["inventory"]
    total: dict[str, int] = {}
    for gpu in inventory["gpus"]:
        total[gpu["type"]] = total.get(gpu["type"], 0) + 1
    isolation = info.get("isolation") or {}  # absent from hosts before isolation
    return Slot(slot_id, total, simulated=bool(inventory["simulated"]),
                isolation=str(isolation.get("mode", "none")),
                isolated=bool(isolation.get("isolated")))
