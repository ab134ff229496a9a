"""HTTP clients that share one TLS context.

Building a TLS context loads the CA bundle (~15-25 ms here), and httpx builds one per
client unless given one: a first cell would pay it twice. ``prewarm`` builds it off the
main thread when the extension loads.
"""

from __future__ import annotations

import functools
import ssl
import threading

import httpx

__all__ = ["async_client", "prewarm", "tls_context"]


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """The client's TLS context: certificates are checked, against the system's CAs and,
    when ``ClientConfig.ca_file`` (``CLOUDGPU_CA_FILE``) names one, that file too (a
    private CA, a self-signed host)."""
    from .config import load_client_config

    context = ssl.create_default_context()
    ca_file = load_client_config().ca_file
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def prewarm() -> None:
    """Build the shared TLS context in a background thread."""
    threading.Thread(target=tls_context, name="cloudgpu-tls", daemon=True).start()


#: Times a connection that could not be made in time (or at all) is tried again, at once,
#: before the request fails. A host or pool too busy to accept it (200 sessions asked for at
#: once on one small machine, their kernels all starting: 35 to 57 of them failed so in
#: ``bench/pool_bench.py``) gets a second chance; nothing was sent, so any request may be
#: repeated. A server that is not running still fails at once (refused twice).
CONNECT_RETRIES = 1


def async_client(base_url: str, token: str, timeout: httpx.Timeout) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for ``base_url`` sending ``Authorization: token ...``;
    its ``timeout.connect`` applies to each of its tries to connect."""
    context = tls_context()
    transport = httpx.AsyncHTTPTransport(verify=context, retries=CONNECT_RETRIES)
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"token {token}"},
                             timeout=timeout, transport=transport,
                             verify=context)  # for the transports of proxies from the env
