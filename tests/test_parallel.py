"""Row blocks on a thread pool (tinyunet/parallel.py): same results on any number of threads."""
import numpy as np
import pytest

from tinyunet import parallel
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
                                  lambda: ConvTranspose2d(24, 16, 2, stride=2)])
def test_results_are_bit_identical_on_one_and_two_threads(make, threads):
    """Big enough to be split into blocks; the blocks do not depend on the thread count."""
    from tinyunet.backend import seed
    results = []
    for n in (1, 2):
        threads(n)
        seed(0)
        layer = make()
        x = np.random.default_rng(0).standard_normal((4, layer.in_channels, 64, 64)).astype(np.float32)
        assert len(parallel.row_blocks(4 * 66 * 66, 9 * 16 * 24)) > 1
        results.append(_conv_step(layer, x))
    for a, b in zip(*results):
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
