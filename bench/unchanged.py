"""Unchanged data: re-running a `%%remote` cell whose big input did not change.

The input is an 800 MB float64 array (``--quick``: 80 MB) in the local kernel. The cell
reads it and assigns a small result. First run: the array's contents just changed (one
element set, so its fingerprint differs) and it is sent whole. Second run: nothing
changed, so only its fingerprint should travel. Both are compared with the same kind of
cell that has no inputs at all (it assigns the same small result), measured in the same
run, interleaved with the second runs. Bytes are what ``last_result.sent`` reports (the
frames sent per input; a kept value counts 0, its few bytes of header aside).

Also shown, to explain the gap: how long the local kernel takes to pickle and
fingerprint the array (done on every run to decide whether it changed), and how long the
remote agent takes to do the same when asked to keep its copy.

Target (issue 5): an unchanged input is not sent again, so the second run is within 10%
of a cell with no inputs.
"""

from __future__ import annotations

import statistics
import time

from _util import QUICK, Kernel, Table, host, machine, median_ms, pool

MB = 1_000_000
SIZE_MB = 80 if QUICK else 800
N_FIRST = 2 if QUICK else 3
N_SECOND = 5 if QUICK else 10

CELL_X = "%%remote gpu=cpu\nm = float(x[:1000].sum())"
CELL_NONE = "%%remote gpu=cpu\nm = 0.0"
HASH_LOCAL = ("from cloudgpu.serialize import dumps as _dumps\nimport time as _time\n"
              "_t0 = _time.perf_counter()\n_dumps(x).fingerprint\n"
              "_hash_s = _time.perf_counter() - _t0")
HASH_REMOTE = ("%%remote gpu=cpu\nfrom cloudgpu.serialize import dumps as _dumps\n"
               "import time as _time\n_t0 = _time.perf_counter()\n_dumps(x).fingerprint\n"
               "hash_remote_s = _time.perf_counter() - _t0")


class Run:
    """One timed cell: seconds, bytes sent per input, inputs found stale."""

    def __init__(self, kernel: Kernel, code: str) -> None:
        self.seconds = kernel.run(code)
        result = "get_ipython().magics_manager.registry['RemoteMagics'].last_result"
        self.sent: dict[str, dict[str, int]] = kernel.value(f"{result}.sent")
        self.stale: list[str] = kernel.value(f"{result}.stale")

    @property
    def bytes(self) -> int:
        return sum(v["bytes"] for v in self.sent.values())


def main() -> None:
    print(f"unchanged data on {machine()}{' (quick)' if QUICK else ''}", flush=True)
    started = time.perf_counter()
    size = SIZE_MB * MB
    with host() as (url, token, _), pool([(url, token)]) as (pool_url, pool_token), \
            Kernel({"CLOUDGPU_POOL": pool_url, "CLOUDGPU_TOKEN": pool_token}) as kernel:
        kernel.run("%load_ext cloudgpu\nimport numpy as np")
        kernel.run("%%remote gpu=cpu\npass", timeout=120)  # a warm session
        kernel.run(f"x = np.random.default_rng(0).random({size // 8})")
        first: list[Run] = []
        for k in range(N_FIRST + 1):  # the first of these is the warm-up
            kernel.run(f"x[0] = {k + 1.0}")  # new contents: a new fingerprint
            first.append(Run(kernel, CELL_X))
            if first[-1].sent["x"]["bytes"] < size:
                raise RuntimeError(f"the changed x was not sent whole: {first[-1].sent}")
        second: list[Run] = []
        none: list[Run] = []
        for _ in range(N_SECOND + 1):
            second.append(Run(kernel, CELL_X))
            none.append(Run(kernel, CELL_NONE))
        hash_local = []
        hash_remote = []
        for _ in range(3):
            kernel.run(HASH_LOCAL)
            hash_local.append(float(kernel.value("_hash_s")))
            kernel.run(HASH_REMOTE)
            hash_remote.append(float(kernel.value("hash_remote_s")))
    first, second, none = first[1:], second[1:], none[1:]

    t_first = median_ms([r.seconds for r in first])
    t_second = median_ms([r.seconds for r in second])
    t_none = median_ms([r.seconds for r in none])
    b_first = statistics.median(r.bytes for r in first)
    b_second = max(r.bytes for r in second)
    stale = sorted({n for r in second for n in r.stale})
    resent = [r.sent["x"]["bytes"] for r in second if r.sent["x"]["bytes"]]
    within = t_second <= 1.10 * t_none
    verdict = ("met" if within else
               f"MISSED by {t_second - 1.10 * t_none:,.0f} ms ({t_second / t_none:.2f}x)")

    table = Table(f"Re-running a cell whose {SIZE_MB} MB input did not change")
    table.add("cell with no inputs (baseline)", t_none, None,
              note=f"{statistics.median(r.bytes for r in none):,.0f} bytes of frames sent")
    table.add(f"first run: x ({SIZE_MB} MB) sent whole", t_first, t_none,
              note=f"{b_first:,.0f} bytes of frames sent")
    table.add("second run: x unchanged", t_second, t_none,
              note=f"target <= 1.10x the no-input cell: {verdict}")
    table.add("bytes sent, second run vs first run", b_second, b_first, unit="B",
              note=("x not sent again" if not resent else
                    f"x SENT AGAIN ({resent[0]:,} bytes)")
              + (f"; stale: {', '.join(stale)}" if stale else ""))
    table.add("local kernel: pickle + fingerprint x (every run)", median_ms(hash_local), None,
              note="decides whether x changed")
    table.add("remote agent: pickle + fingerprint x (each `keep`)", median_ms(hash_remote),
              None, note="checks its copy is unchanged before keeping it")
    table.show()
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
