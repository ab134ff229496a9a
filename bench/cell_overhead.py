"""Cell overhead: an empty `%%remote` cell on a warm session, against what else a user has.

Baselines, measured in the same run: the floor (a direct jupyter_client execute of an
empty cell on a warm local ipykernel) and ipyparallel's `%%px` on one local engine.
Overhead = an empty `%%remote` cell minus an empty local cell, in the same kernel, taken
as the median of the differences over rounds that each run one of every cell (the floor's
too, on its own kernel), so that the slow and fast spells of a shared machine fall on ours
and on the floor alike (timed in blocks of their own, the floor went from 3.6 to 5.3 ms
between runs minutes apart, and the ratio with it).
On the emulated WAN link (50 ms round trip, 1 Gbit/s; see _wan.py) the target is
one round trip + 10 ms; on loopback, 1.5x the floor.
"""

from __future__ import annotations

import _wan
from _util import QUICK, Kernel, Table, host, machine, median_ms, pool, repeat

N = 30 if QUICK else 200
N_WAN = 8 if QUICK else 30


def remote_kernel(pool_url: str, token: str) -> Kernel:
    kernel = Kernel({"CLOUDGPU_POOL": pool_url, "CLOUDGPU_TOKEN": token})
    kernel.run("%load_ext cloudgpu")
    kernel.run("%%remote gpu=cpu\npass")  # start the session: we measure warm cells
    return kernel


def overhead(kernel: Kernel, n: int, floor_kernel: Kernel | None = None
             ) -> dict[str, float]:
    """Medians in ms over ``n`` rounds (after 2 to warm up), each an empty `%%remote`
    cell, an empty local cell in the same kernel and, given ``floor_kernel``, the floor's
    empty cell: ``remote``, ``local``, ``overhead`` (of the differences in each round) and
    ``floor``."""
    times: dict[str, list[float]] = {"remote": [], "local": [], "floor": []}
    for i in range(n + 2):
        took = {"remote": kernel.run("%%remote gpu=cpu\npass"), "local": kernel.run("pass")}
        if floor_kernel is not None:
            took["floor"] = floor_kernel.run("")
        if i >= 2:
            for name, seconds in took.items():
                times[name].append(seconds)
    found = {name: median_ms(seconds) for name, seconds in times.items() if seconds}
    found["overhead"] = median_ms([remote - local for remote, local
                                   in zip(times["remote"], times["local"], strict=True)])
    return found


def ipyparallel_px(n: int) -> float | None:
    """Median `%%px pass` in a local kernel with one local engine, ms (None if missing)."""
    try:
        import ipyparallel  # noqa: F401
    except ImportError:
        return None
    with Kernel() as kernel:
        kernel.run("import ipyparallel as ipp\n"
                   "cluster = ipp.Cluster(n=1, log_level=40)\n"
                   "rc = cluster.start_and_connect_sync()\n"
                   "rc.wait_for_engines(1, timeout=60)\n"
                   "rc[:].activate()", timeout=120)
        try:
            return median_ms(repeat(lambda: kernel.run("%%px\npass"), n))
        finally:
            kernel.run("cluster.stop_cluster_sync()", timeout=60)


def main() -> None:
    print(f"cell overhead on {machine()}{' (quick)' if QUICK else ''}", flush=True)
    table = Table("Cell overhead (empty cell on a warm session)")
    with Kernel() as floor_kernel, host() as (url, token, _), \
            pool([(url, token)]) as (pool_url, pool_token):
        kernel = remote_kernel(pool_url, pool_token)
        found = overhead(kernel, N, floor_kernel)
        kernel.close()
    px = ipyparallel_px(N)
    table.add("empty cell, direct jupyter_client execute (the floor)", found["floor"], None,
              note="in the same rounds as ours")
    table.add("empty `%%remote` cell, loopback", found["remote"], px,
              note="baseline: ipyparallel `%%px`")
    table.add("`%%remote` overhead (minus an empty local cell), loopback", found["overhead"],
              found["floor"], note=f"target <= 1.5x the floor; local empty cell "
                                   f"{found['local']:.2f} ms")
    try:
        with _wan.namespace(rate="1gbit", rtt_ms=50) as link:
            rtt = _wan.measured_rtt(link)
            with host(prefix=link.prefix, ip=link.host_ip) as (url, token, _):
                port = int(url.rsplit(":", 1)[1])
                with _wan.DelayRelay((link.host_ip, port), link.rtt_ms / 2) as relay, \
                        pool([(f"http://127.0.0.1:{relay.port}", token)]) as (pool_url, ptok):
                    kernel = remote_kernel(pool_url, ptok)
                    wan_overhead = overhead(kernel, N_WAN)["overhead"]
                    kernel.close()
        table.add("TCP round trip on the emulated link", rtt, None, note="50 ms configured")
        table.add("`%%remote` overhead, 50 ms link", wan_overhead, rtt + 10,
                  note=f"baseline: 1 RTT + 10 ms; {wan_overhead / rtt:.2f} round trips per cell")
    except _wan.Unavailable as e:
        table.add("`%%remote` overhead, 50 ms link", "skipped", None, note=str(e))
    table.show()


if __name__ == "__main__":
    main()
