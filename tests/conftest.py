"""Shared test set-up: caches in a temporary folder, few threads, seeded randomness."""
import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="sfs_fast_test_cache_")
# ONNX Runtime and inductor write caches; keep them out of the user's home.
os.environ.setdefault("XDG_CACHE_HOME", _CACHE)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread (for tests on tiny tensors, where thread
    hand-offs cost more than they save), restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def calibrate_batchnorm(model, steps=3, batch=4, seed=0):
    """``sfs_fast.models.calibrate_batchnorm`` on ``steps`` batches of seeded random images."""
    from sfs_fast.models import calibrate_batchnorm as calibrate

    gen = torch.Generator().manual_seed(seed)
    return calibrate(model, (torch.rand(batch, 3, 128, 128, generator=gen) for _ in range(steps)))


@pytest.fixture
def calibrated_model():
    """A factory: ``calibrated_model(method, **config)`` -> eval model with realistic BN stats."""
    from sfs_fast import build_model

    def make(method=0, **config):
        return calibrate_batchnorm(build_model(method, **config))

    return make
