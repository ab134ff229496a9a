"""The ``static`` backend: hosts someone started with ``cloudgpu host``, listed by URL."""

from __future__ import annotations

import urllib.parse
from typing import Any

from traitlets import List, Unicode

from cloudgpu.errors import CloudGPUError, HostConnectionError
from cloudgpu.host_client import HostClient

from ..backend import HostsBackend, slot_of
from ..scheduler import Slot

__all__ = ["StaticBackend"]


class StaticBackend(HostsBackend):
    """Kernels on a fixed list of hosts; their inventories are read from the hosts."""

    name = "static"
    shared = True

    hosts_urls = List(
        Unicode(),
        help="Host URLs, each with its token: `http://10.0.0.5:8899?token=T`, or without "
        "`?token=` when --StaticBackend.token applies to all. A host that does not answer "
        "when the pool starts joins once it does (only none answering is an error).",
    ).tag(config=True)
    token = Unicode("", help="The host token for hosts listed without one.").tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slots: dict[str, Slot] = {}
        self._absent: set[str] = set()  # listed hosts that have not answered yet

    async def start(self) -> list[Slot]:
        """Read every host's inventory. A host that cannot be reached is offered with no
        GPUs until it answers a heartbeat; it is an error only when none answers."""
        if not self.hosts_urls:
            raise CloudGPUError(
                "The static backend needs hosts: `cloudgpu pool --backend static "
                "--hosts http://HOST:PORT?token=T,...`."
            )
        unreachable: list[str] = []
        for entry in self.hosts_urls:
            url, token = _split_token(entry, self.token)
            try:
                slot = await self.slot_for(url, token)
            except HostConnectionError as e:
                client = HostClient(url, token)
                self.hosts[client.url] = client
                slot = Slot(client.url, {}, down=True, heard_from=False)
                self._absent.add(slot.id)
                unreachable.append(f"{client.url} ({e})")
            self._slots[slot.id] = slot
        if len(unreachable) == len(self._slots):
            raise HostConnectionError(
                f"None of the pool's hosts answers: {'; '.join(unreachable)}. Start them "
                f"(`cloudgpu host`), or check the URLs in --hosts.")
        for text in unreachable:
            self.log.warning("Host %s does not answer: the pool starts without it, and adds "
                             "its GPUs once it answers", text)
        return list(self._slots.values())

    async def heartbeat(self) -> dict[str, dict[str, Any] | None]:
        """Each host's info; a host that answers for the first time joins the pool, after
        the kernels a previous pool left there that no session holds are stopped."""
        answers = await super().heartbeat()
        joined = [slot_id for slot_id in self._absent if answers.get(slot_id) is not None]
        for slot_id in joined:
            try:
                slot = slot_of(slot_id, answers[slot_id] or {})
            except (KeyError, TypeError) as e:
                self.log.warning("Host %s answered without an inventory (%s)", slot_id, e)
                continue
            keep = self.events.kernels() if self.events is not None else set()
            stopped = await self.sweep(keep, [slot_id])
            self._absent.discard(slot_id)
            self._slots[slot_id] = slot
            self.log.warning("Host %s answers: its GPUs join the pool (%s)%s", slot_id,
                             ", ".join(f"{n}x {t}" for t, n in slot.total.items()) or "none",
                             f"; stopped {stopped} kernel(s) left there" if stopped else "")
        if joined and self.events is not None:
            self.events.slots_changed(list(self._slots.values()))
        return answers


def _split_token(entry: str, default_token: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(entry.strip())
    query = urllib.parse.parse_qs(parts.query)
    token = query.get("token", [default_token])[0]
    if not token:
        raise CloudGPUError(f"No token for host {parts.scheme}://{parts.netloc}: add `?token=T`.")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), token
