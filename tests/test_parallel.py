"""Row blocks on a thread pool (tinyunet/parallel.py): same results on any number of threads."""
import numpy as np
import pytest

from tinyunet.accel import parallel
from tinyunet.nn import Conv2d, ConvTranspose2d


@pytest.mark.parametrize("length,row_work", [(0, 1), (5, 1), (1000, 10 ** 6), (16384 * 4, 2 ** 10),
                                             (16384 * 4 + 1, 2 ** 10), (135_000, 2304), (7, 2 ** 30)])
def test_row_blocks_cover_the_rows_once_in_order(length, row_work):
    blocks = parallel.row_blocks(length, row_work)
    assert blocks[0][0] == 0 and blocks[-1][1] == length
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(blocks, blocks[1:]))
    sizes = [stop - start for start, stop in blocks]
    if length * row_work < 2 ** 24:
        assert len(blocks) == 1                       # small calls stay whole
    else:
        assert len(blocks) % 4 == 0 or len(blocks) == length
        assert max(sizes) <= 16384 and max(sizes) - min(sizes) <= 1


@pytest.fixture
def threads():
    before = parallel.get_num_threads()
    yield parallel.set_num_threads
    parallel.set_num_threads(before)


def test_map_row_blocks_runs_on_the_pool_and_keeps_order(threads):
    import threading
    threads(2)
    seen = parallel.map_row_blocks(lambda start, stop: (start, stop, threading.current_thread().name),
                                   200_000, 1000)
    assert [s[:2] for s in seen] == parallel.row_blocks(200_000, 1000)
    # the calling thread takes blocks 0, 2, 4, ...; the pool's one worker 1, 3, 5, ...
    names = [name for _, _, name in seen]
    assert set(names[0::2]) == {threading.current_thread().name}
    assert all(name.startswith("tinyunet") for name in names[1::2])
    from threadpoolctl import threadpool_info
    assert all(info["num_threads"] == 1 for info in threadpool_info() if info["user_api"] == "blas")


def test_an_error_in_a_block_is_raised_after_every_block_has_finished(threads):
    import time
    threads(2)
    finished = []

    def fn(start, stop):
        if start == 0:
            raise RuntimeError("block 0 failed")
        time.sleep(0.01)
        finished.append(start)
    with pytest.raises(RuntimeError, match="block 0 failed"):
        parallel.map_row_blocks(fn, 200_000, 1000)
    assert len(finished) == len(parallel.row_blocks(200_000, 1000)) // 2  # the worker's blocks all ran


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError):
        parallel.set_num_threads(0)


def _conv_step(layer, x):
    out = layer.forward(x)
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(x.dtype)
    dx = layer.backward(dout)
    return out.copy(), dx.copy(), layer.weight.grad.copy()


@pytest.mark.parametrize("make", [lambda: Conv2d(16, 24, 3, padding=1), lambda: Conv2d(8, 8, 2, stride=2),
                                  lambda: Conv2d(64, 64, 3, padding=1), lambda: ConvTranspose2d(24, 16, 2, stride=2)],
                         ids=["shifted", "im2row", "winograd", "transposed"])
def test_results_are_bit_identical_on_one_two_and_three_threads(make, threads):
    """Big enough to be split into blocks (the convolutions' weight and input gradients also run
    side by side); the blocks do not depend on the thread count."""
    from tinyunet.backend import seed
    results = []
    for n in (1, 2, 3):
        threads(n)
        seed(0)
        layer = make()
        x = np.random.default_rng(0).standard_normal((4, layer.in_channels, 64, 64)).astype(np.float32)
        assert len(parallel.row_blocks(4 * 66 * 66, 9 * 16 * 24)) > 1
        results.append(_conv_step(layer, x))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_on_a_device_backend_all_rows_are_one_block(fake_cupy, threads):
    threads(2)
    assert parallel.map_row_blocks(lambda start, stop: (start, stop), 200_000, 1000) == [(0, 200_000)]


@pytest.mark.parametrize("shape", [(20000, 40, 30), (64, 2304, 256)], ids=["tall: partial sums", "wide: column blocks"])
def test_transposed_matmul_in_both_splittings(shape, threads):
    """a.T @ b for a tall a (row blocks, partial sums) and a wide one (column blocks, no partial sums),
    big enough to be split, on 1 and 2 threads."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((m, n))
    assert len(parallel.row_blocks(max(m, k), min(m, k) * n)) > 1
    for count in (1, 2):
        threads(count)
        np.testing.assert_allclose(parallel.transposed_matmul(a, b), a.T @ b, rtol=1e-12, atol=1e-10)
        for forced in (True, False):           # either splitting chosen by the caller, whatever the shape
            np.testing.assert_allclose(parallel.transposed_matmul(a, b, partial_sums=forced), a.T @ b,
                                       rtol=1e-12, atol=1e-10)


def _slow_thread_name(start, stop):
    """A block that takes long enough (5 ms) for every thread of a call to get one."""
    import threading
    import time
    time.sleep(0.005)
    return threading.current_thread().name


@pytest.mark.parametrize("count", [2, 3, 4])
def test_run_concurrently_gives_each_task_its_share_of_the_threads(threads, count):
    """Two tasks side by side, each told it has count // 2 threads; both sets of blocks complete."""
    threads(count)

    def task(tag):
        return lambda: (tag, parallel._threads_here(), parallel.map_row_blocks(_slow_thread_name, 200_000, 1000))
    (tag_a, share_a, names_a), (tag_b, share_b, names_b) = parallel.run_concurrently(task("a"), task("b"))
    assert (tag_a, tag_b) == ("a", "b")                          # results in the order of the tasks
    assert share_a == share_b == count // 2
    assert len(names_a) == len(names_b) == len(parallel.row_blocks(200_000, 1000))
    assert all(isinstance(name, str) for name in names_a + names_b)
    # afterwards a call from this thread has every thread again
    assert parallel._threads_here() == count
    assert len(set(parallel.map_row_blocks(_slow_thread_name, 200_000, 1000))) == count


@pytest.mark.parametrize("count", [2, 4])
def test_a_thread_whose_task_is_done_takes_blocks_of_the_other_task(threads, count):
    """Task a is done at once; its thread (here, the calling one) must not sit idle while task b
    still has blocks nobody has started."""
    import threading
    threads(count)
    names_b = parallel.run_concurrently(lambda: "a", lambda: parallel.map_row_blocks(_slow_thread_name, 200_000, 1000))[1]
    assert names_b.count(threading.current_thread().name) >= 2
    assert len(names_b) == len(parallel.row_blocks(200_000, 1000))


def test_a_call_that_is_not_helped_runs_on_its_tasks_threads_only(threads):
    import threading
    threads(2)
    names_b = parallel.run_concurrently(
        lambda: "a", lambda: parallel.map_row_blocks(_slow_thread_name, 200_000, 1000, helped=False))[1]
    assert threading.current_thread().name not in names_b and len(set(names_b)) == 1


def test_helped_blocks_give_the_results_of_one_thread(threads):
    """Whichever thread runs a block, each block's result lands in its own place."""
    rows = np.random.default_rng(0).standard_normal((200_000, 3))

    def block_sums(start, stop):
        return rows[start:stop].sum(axis=0)
    threads(1)
    alone = parallel.map_row_blocks(block_sums, len(rows), 1000)
    threads(2)
    slow, helped = parallel.run_concurrently(lambda: parallel.map_row_blocks(_slow_thread_name, 200_000, 1000),
                                             lambda: parallel.map_row_blocks(block_sums, len(rows), 1000))
    assert len(helped) == len(alone) > 1
    for a, b in zip(alone, helped):
        np.testing.assert_array_equal(a, b)


def test_an_error_in_a_helped_block_is_raised_by_its_task_after_its_blocks_finished(threads):
    import time
    threads(2)
    blocks = parallel.row_blocks(200_000, 1000)
    started, running = [], []

    def fn(start, stop):
        started.append(start)
        running.append(start)
        time.sleep(0.005)
        if start == blocks[3][0]:
            raise RuntimeError("block 3 failed")
        running.remove(start)
    with pytest.raises(RuntimeError, match="block 3 failed"):
        parallel.run_concurrently(lambda: None, lambda: parallel.map_row_blocks(fn, 200_000, 1000))
    assert running == [blocks[3][0]]              # no other block still running when the error is raised
    assert len(started) < len(blocks)             # the blocks after the failure were not started
    assert parallel.map_row_blocks(lambda start, stop: start, 200_000, 1000) == [b[0] for b in blocks]


def test_run_concurrently_raises_a_tasks_error_after_both_finished(threads):
    import time
    threads(2)
    finished = []

    def slow():
        time.sleep(0.05)
        finished.append("slow")

    def failing():
        raise RuntimeError("task failed")
    with pytest.raises(RuntimeError, match="task failed"):
        parallel.run_concurrently(failing, slow)
    assert finished == ["slow"]


def _thread_names_of_two_tasks():
    import threading
    return parallel.run_concurrently(lambda: threading.current_thread().name, lambda: threading.current_thread().name)


def test_run_concurrently_on_one_thread_runs_the_tasks_in_order_here(threads):
    import threading
    threads(1)
    assert _thread_names_of_two_tasks() == [threading.current_thread().name] * 2


def test_run_concurrently_on_a_device_runs_the_tasks_in_order_here(threads, fake_cupy):
    import threading
    threads(2)
    assert _thread_names_of_two_tasks() == [threading.current_thread().name] * 2


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("outer", ["map_row_blocks", "run_concurrently", "one block, helped"])
def test_a_block_that_splits_its_own_rows_runs_them_in_its_thread(threads, count, outer):
    """A block function that calls map_row_blocks (or run_concurrently) again: the inner call must
    not wait for pool threads that are all busy running outer blocks (a deadlock); it runs serially
    in the block's thread, with the same results - also where a thread whose task is done would
    take blocks ("one block, helped": the outer call is one block, the first task ends at once and
    its thread looks for blocks to take while the inner ones run, slowly)."""
    import time
    import threading
    threads(count)
    rows = np.arange(200_000.0)

    def inner(start, stop):
        here = threading.current_thread().name
        def name(a, b):
            time.sleep(0.001)
            return threading.current_thread().name
        names = parallel.map_row_blocks(name, stop - start, 2 ** 12)  # several inner blocks
        nested = parallel.run_concurrently(lambda: threading.current_thread().name, lambda: rows[start:stop].sum())
        return set(names) | {nested[0]} == {here}, nested[1]

    def outer_call():
        if outer == "map_row_blocks":
            return parallel.map_row_blocks(inner, len(rows), 2 ** 20)
        if outer == "one block, helped":
            return parallel.run_concurrently(lambda: None, lambda: parallel.map_row_blocks(inner, len(rows), 1))[1]
        return sum(parallel.run_concurrently(lambda: parallel.map_row_blocks(inner, len(rows), 2 ** 20),
                                             lambda: parallel.map_row_blocks(inner, len(rows), 2 ** 20)), [])
    done = []
    worker = threading.Thread(target=lambda: done.append(outer_call()), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert done, "nested map_row_blocks deadlocked"
    assert all(same_thread for same_thread, _ in done[0])
    assert sum(total for _, total in done[0]) == rows.sum() * (2 if outer == "run_concurrently" else 1)
