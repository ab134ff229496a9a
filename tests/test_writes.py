"""The agent's write tracking (``remote_host/host/writes.py``) on this machine's own kernel."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
from cloudgpu.remote_host.host.writes import PAGE, WriteWatch, edges, open_watch, page_ranges

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def watch() -> WriteWatch:
    found = open_watch()
    if found is None:
        pytest.skip("this kernel offers no asynchronous write-protect tracking (Linux 6.7's "
                    "UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN); the agent fingerprints instead")
    return found


def _ranges(array: np.ndarray) -> list[tuple[int, int]]:
    return page_ranges([(array.ctypes.data, array.nbytes)])


def test_spans_become_the_whole_pages_inside_them_and_their_edges_are_told() -> None:
    assert page_ranges([(PAGE + 5, 10)]) == []  # no whole page in it
    assert page_ranges([(3 * PAGE, PAGE), (PAGE, 2 * PAGE), (9 * PAGE, 0)]) == [
        (PAGE, 4 * PAGE)]  # sorted, touching runs merged, an empty span dropped
    assert page_ranges([(PAGE - 1, 3 * PAGE + 2)]) == [(PAGE, 4 * PAGE)]
    assert page_ranges([(PAGE, 1), (5 * PAGE, PAGE)]) == [(5 * PAGE, 6 * PAGE)]
    assert edges(PAGE - 1, 3 * PAGE + 2) == (1, 1)
    assert edges(PAGE, 2 * PAGE) == (0, 0)
    assert edges(PAGE + 5, 10) == (10, 0)  # all of it, as the head
    assert edges(PAGE - 3, PAGE + 2) == (PAGE + 2, 0)  # straddles a boundary, no whole page
    assert edges(PAGE - 3, PAGE + 3) == (3, 0)


def test_any_write_to_armed_memory_shows_and_a_new_arming_forgets_it(watch: WriteWatch) -> None:
    region = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.frombuffer(region, np.uint8)  # whole pages, as the side channel receives into
    ranges = _ranges(data)
    assert ranges == [(data.ctypes.data, data.ctypes.data + data.nbytes)]
    assert watch.arm(ranges)
    assert not watch.written(ranges)
    _ = data.sum(), data[12345]  # reading is not writing
    assert not watch.written(ranges)
    data[-1] = 1  # the very last byte
    assert watch.written(ranges)
    assert watch.arm(ranges) and not watch.written(ranges)
    with open("/dev/urandom", "rb") as source:  # the kernel writing on this process's behalf
        source.readinto(memoryview(data)[PAGE * 100: PAGE * 100 + 8])
    assert watch.written(ranges)
    watch.disarm(ranges)
    del data
    region.close()


def test_memory_not_armed_or_no_longer_mapped_reads_as_written(watch: WriteWatch) -> None:
    region = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(region, np.uint8)
    ranges = _ranges(array)
    assert watch.written(ranges)  # never armed
    assert watch.arm(ranges)
    assert not watch.written(ranges)
    watch.disarm(ranges)
    assert watch.written(ranges)  # disarmed: nothing says it was not written
    assert watch.arm(ranges)
    del array
    region.close()  # unmapped: whatever comes to be mapped there is new memory
    assert watch.written(ranges)


def test_memory_another_process_or_a_file_can_change_is_never_armed(
        watch: WriteWatch, tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(1 << 20))
    on_file = np.memmap(path, mode="r+")
    assert not watch.arm(_ranges(on_file))
    shared = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    assert not watch.arm(_ranges(np.frombuffer(shared, np.uint8)))
    del on_file


def test_memory_armed_in_pieces_reads_as_one_unwritten_run(watch: WriteWatch) -> None:
    region = mmap.mmap(-1, 32 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(region, np.uint8)
    start = array.ctypes.data
    array[:] = 7  # present pages, then mappings split where arming began and ended
    assert watch.arm([(start + 4 * PAGE, start + 12 * PAGE)])
    assert watch.arm([(start, start + 8 * PAGE)])
    assert not watch.written([(start, start + 12 * PAGE)])
    array[11 * PAGE] = 1
    assert watch.written([(start, start + 12 * PAGE)])
    assert not watch.written([(start, start + 11 * PAGE)])
    watch.disarm([(start, start + 12 * PAGE)])
    del array
    region.close()
