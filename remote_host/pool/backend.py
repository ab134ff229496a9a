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

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from traitlets.config import LoggingConfigurable

from cloudgpu.errors import CloudGPUError
from cloudgpu.hardware import Catalog, Choice, HardwareSpec
from cloudgpu.host_client import HostClient

from .scheduler import Slot

__all__ = ["Backend", "BackendEvents", "HostsBackend", "Placement", "load_backend"]

ENTRY_POINT_GROUP = "cloudgpu.backends"

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


class Backend(LoggingConfigurable):
    """Where a pool's kernels run."""

    name: ClassVar[str] = ""

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

    async def launch(self, slot_id: str, choice: Choice, scoped_token: str | None) -> Placement:
        """Start a kernel holding ``choice`` on ``slot_id``, opened by ``scoped_token``."""
        raise NotImplementedError

    async def sweep(self, keep: set[str]) -> int:
        """Stop kernels this pool started but no longer knows (left by a crash); how many."""
        return 0

    async def stop(self, placement: Placement) -> None:
        """Stop that kernel and free its hardware."""
        raise NotImplementedError

    async def probe(self, placement: Placement) -> dict[str, Any] | None:
        """The kernel's Jupyter model (``execution_state``, ``last_activity``), None if gone."""
        raise NotImplementedError

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
        inventory = info["inventory"]
        total: dict[str, int] = {}
        for gpu in inventory["gpus"]:
            total[gpu["type"]] = total.get(gpu["type"], 0) + 1
        slot_id = slot_id or client.url
        old = self.hosts.get(slot_id)
        self.hosts[slot_id] = client
        if old is not None:
            await old.aclose()
        return Slot(slot_id, total, simulated=bool(inventory["simulated"]))

    async def launch(self, slot_id: str, choice: Choice, scoped_token: str | None) -> Placement:
        """Start the kernel through the host's ``POST /api/cloudgpu/kernels``."""
        host = self.hosts[slot_id]
        model = await host.start_kernel(str(choice), scoped_token=scoped_token)
        gpus = model.get("cloudgpu", {}).get("gpus", [])
        return Placement(slot_id, host.url, model["id"], gpus,
                         simulated=any(g.get("simulated") for g in gpus))

    async def sweep(self, keep: set[str]) -> int:
        """Stop every kernel on our hosts that is not in ``keep``."""
        stopped = 0
        for host in self.hosts.values():
            for kernel in await host.request("GET", "/api/kernels"):
                if kernel["id"] not in keep:
                    await host.shutdown(kernel["id"])
                    stopped += 1
        return stopped

    async def stop(self, placement: Placement) -> None:
        """``DELETE /api/kernels/{id}`` on its host."""
        host = self.hosts.get(placement.slot_id)
        if host is not None:
            await host.shutdown(placement.kernel_id)

    async def probe(self, placement: Placement) -> dict[str, Any] | None:
        """``GET /api/kernels/{id}``; None when the host no longer has it or is gone."""
        host = self.hosts.get(placement.slot_id)
        if host is None:
            return None
        try:
            return await host.kernel(placement.kernel_id)
        except CloudGPUError:
            return None

    async def close(self) -> None:
        """Close the HTTP clients."""
        for client in self.hosts.values():
            await client.aclose()
        self.hosts.clear()


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
