"""The ``static`` backend: hosts someone started with ``cloudgpu host``, listed by URL."""

from __future__ import annotations

import urllib.parse

from traitlets import List, Unicode

from cloudgpu.errors import CloudGPUError

from ..backend import HostsBackend
from ..scheduler import Slot

__all__ = ["StaticBackend"]


class StaticBackend(HostsBackend):
    """Kernels on a fixed list of hosts; their inventories are read from the hosts."""

    name = "static"
    shared = True

    hosts_urls = List(
        Unicode(),
        help="Host URLs, each with its token: `http://10.0.0.5:8899?token=T`, or without "
        "`?token=` when --StaticBackend.token applies to all.",
    ).tag(config=True)
    token = Unicode("", help="The host token for hosts listed without one.").tag(config=True)

    async def start(self) -> list[Slot]:
        """Read every host's inventory; a host that does not answer is an error."""
        if not self.hosts_urls:
            raise CloudGPUError(
                "The static backend needs hosts: `cloudgpu pool --backend static "
                "--hosts http://HOST:PORT?token=T,...`."
            )
        slots = []
        for entry in self.hosts_urls:
            url, token = _split_token(entry, self.token)
            slots.append(await self.slot_for(url, token))
        return slots


def _split_token(entry: str, default_token: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(entry.strip())
    query = urllib.parse.parse_qs(parts.query)
    token = query.get("token", [default_token])[0]
    if not token:
        raise CloudGPUError(f"No token for host {parts.scheme}://{parts.netloc}: add `?token=T`.")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), token
