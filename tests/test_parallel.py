"""nncore.parallel: a minibatch split over threads gives the gradients of the whole minibatch."""
import threading

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from nncore import parallel
from nncore.gradcheck import check_model_gradients
from test_gradcheck import KINKED, MODELS, SMOOTH, _kinked, _model_and_data
from worker.threads import keep_freed_memory, use_threads

CONV_MODELS = [name for name, (cfg, _) in MODELS.items() if cfg.get("arch") in ("conv1d", "conv2d")]


@pytest.fixture
def threads(monkeypatch):
    """Two threads, and chunks as small as 2 rows of any conv work (the test models are tiny)."""
    monkeypatch.setattr(parallel, "MIN_ROWS", 2)
    monkeypatch.setattr(parallel, "MIN_MACS", 1)
    parallel.set_threads(2)
    yield
    parallel.set_threads(1)


def test_chunks_split_rows_evenly_and_only_with_enough_work(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_ROWS", 8)
    monkeypatch.setattr(parallel, "MIN_MACS", 1000)
    parallel.set_threads(3)
    try:
        assert parallel.chunks(64, 100) == [slice(0, 21), slice(21, 42), slice(42, 64)]
        assert parallel.chunks(17, 1000) == [slice(0, 8), slice(8, 17)]  # two chunks of at least 8 rows
        assert parallel.chunks(7, 100) == [slice(0, 7)]
        assert parallel.chunks(64, 40) == [slice(0, 32), slice(32, 64)]  # 2,560 multiply-adds: 2 chunks of 1,000+
        assert parallel.chunks(64, 20) == [slice(0, 64)]
        assert parallel.chunks(64, 0) == [slice(0, 64)]  # an MLP: BLAS's own threads serve it
    finally:
        parallel.set_threads(1)
    assert parallel.chunks(64, 100) == [slice(0, 64)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_threads_refuses_what_is_not_a_positive_integer(bad):
    with pytest.raises(ValueError, match="threads"):
        parallel.set_threads(bad)


def test_run_keeps_order_uses_the_threads_and_raises_what_a_chunk_raised(threads):
    names = parallel.run(lambda i: (i, threading.current_thread().name), [0, 1])
    assert [i for i, _ in names] == [0, 1]
    assert names[0][1].startswith("nncore") and names[1][1] == threading.current_thread().name

    def fail(i):
        if i == 0:
            raise ArithmeticError("chunk 0")
        return i
    with pytest.raises(ArithmeticError, match="chunk 0"):
        parallel.run(fail, [0, 1])


def test_blas_runs_one_thread_inside_the_chunks_and_gets_its_threads_back_after():
    use_threads(2)
    try:
        blas = ThreadpoolController().select(user_api="blas")
        inside = parallel.run(lambda _: [lib["num_threads"] for lib in blas.info()], [0, 1])
        assert inside == [[1] * len(blas.info())] * 2
        assert all(lib["num_threads"] == 2 for lib in blas.info())
    finally:
        use_threads(1)


@pytest.mark.parametrize("name", CONV_MODELS)
def test_a_chunked_conv_model_matches_finite_differences(name, threads):
    cfg, input_shape = MODELS[name]
    model, x, y = _model_and_data(cfg, input_shape, seed=1)
    assert len(parallel.chunks(len(x), model._conv_macs)) == 2
    errors = check_model_gradients(model, x, y, 0.1)
    assert max(errors.values()) < (KINKED if _kinked(cfg) else SMOOTH), errors


@pytest.mark.parametrize("name", CONV_MODELS)
def test_chunked_loss_gradients_and_batchnorm_statistics_equal_the_whole_minibatch(name, monkeypatch):
    cfg, input_shape = MODELS[name]
    results = []
    for threads in (1, 2):
        model, x, y = _model_and_data(cfg, input_shape, seed=2)
        model = model.astype(np.float64)  # equal up to the order of float64 sums
        monkeypatch.setattr(parallel, "MIN_ROWS", 2)
        monkeypatch.setattr(parallel, "MIN_MACS", 1)
        parallel.set_threads(threads)
        try:
            masks = model.sample_dropout_masks(len(x), np.random.default_rng(3))
            loss, grads = model.loss(x, y, reg=0.05, dropout_masks=masks or None)
            results.append((loss, grads, {k: b.copy() for k, b in model.buffers.items()},
                            model.scores(x), model.activations(x)))
        finally:
            parallel.set_threads(1)
    (loss1, grads1, buffers1, scores1, acts1), (loss2, grads2, buffers2, scores2, acts2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-12)
    for d1, d2 in ((grads1, grads2), (buffers1, buffers2), (acts1, acts2)):
        assert d1.keys() == d2.keys()
        for k in d1:
            np.testing.assert_allclose(d2[k], d1[k], rtol=1e-10, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(scores2, scores1, rtol=1e-10, atol=1e-12)


def test_keep_freed_memory_takes_on_glibc():
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True
