"""What every test file shares: the CPU device set-up, the oracle folder, float32 comparisons, random
kill delays, and the helpers that load the original's state dicts into our cells.

Test files import the plain functions with `from conftest import ...` (pytest puts tests/ on sys.path)."""
import os
import secrets
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")  # as latte_cli does
# Tests are hermetic: no compiled graph is taken from (or left in) ~/.cache between runs;
# tests/test_runtime.py points the cache at its own folders explicitly.
os.environ.setdefault("LATTE_COMPILE_CACHE", "0")
# Nor is the Linear layers' matmul measured (models/dense_select.py; tests/test_dense_select.py checks the
# measuring with fakes): the fused path's sgemm Dense runs wherever libdnnl's sgemm is found.
os.environ.setdefault("LATTE_DENSE", "sgemm")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.runtime import setup_device  # noqa: E402

# Tests run in PyNative mode: most are tiny, and graph compilation would cost more than it saves.
setup_device("CPU", mode="pynative", cpu_threads=1)

ORACLE = ROOT.parent / "shared" / "reference" / "oracle"


# ---------------------------------------------------------------- two workers (`make test`: pytest -n 2)

# Longest files first, so the other worker fills in around them: the demo (one ~200 s module fixture)
# and the msrun runs of test_scale_out (two ranks each, 50-70 s).
FIRST_FILES = ("test_demo", "test_scale_out")


def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on both cores (pytest-xdist, --dist loadfile): a file's tests stay on
    one worker, so its module fixtures (the demo run, the S3 server, test_sampler's graph mode) are built
    once and a module never switches the process-wide MindSpore mode under another's tests. (xdist's
    `loadgroup` does not group under pytest 9: it renames test ids through an attribute pytest 9 no
    longer reads.) Without -n this only orders the files; every test passes in any order."""
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: file order otherwise


@pytest.fixture(scope="session")
def oracle_dir():
    if not ORACLE.is_dir():
        pytest.fail(f"oracle data not found at {ORACLE}: clone with ../shared beside the repo")
    return ORACLE


# ---------------------------------------------------------------- float32 comparisons

F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7: one ulp at 1.0


def assert_f32_close(actual, expected, ulps=64, scale=None, err_msg=""):
    """`actual` is `expected` computed another way in float32: another batch size or thread count
    (BLAS blocks and sums in another order), a fused kernel built with -march=native (FMA or not),
    graph instead of PyNative mode, numpy instead of MindSpore. Such results differ by rounding,
    which grows with the magnitude of the values, so the bound is `ulps` float32 epsilons relative to
    each value plus the same relative to `scale` (default: the largest |expected|), because entries
    near zero carry the rounding of the large terms that cancelled into them. A real bug (another
    noise draw, a wrong term) moves values by far more than 64 ulps. Use exact equality only for
    literally the same computation: same ops, same shapes, same batch, same process."""
    actual = np.asarray(actual.asnumpy() if hasattr(actual, "asnumpy") else actual, np.float64)
    expected = np.asarray(expected.asnumpy() if hasattr(expected, "asnumpy") else expected, np.float64)
    if scale is None:
        scale = float(np.abs(expected).max()) if expected.size else 0.0
    tol = ulps * F32_EPS
    bound = tol * (np.abs(expected) + scale)
    used = float((np.abs(actual - expected) / np.where(bound > 0, bound, 1)).max()) if expected.size else 0.0
    print(f"assert_f32_close: {used:.3g} of the {ulps}-ulp bound used")  # the margin, shown with -s or a failure
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=err_msg)


# ---------------------------------------------------------------- random kill moments

def random_kill_delay(low, high, what="kill"):
    """A uniformly random delay in [low, high) seconds, seeded by LATTE_TEST_SEED when set (to replay
    a failure) and by a fresh seed otherwise; the seed is printed, and pytest shows it with a failure."""
    seed = int(os.environ.get("LATTE_TEST_SEED") or secrets.randbits(32))
    delay = float(np.random.default_rng(seed).uniform(low, high))
    print(f"{what} after {delay:.3f} s (LATTE_TEST_SEED={seed} replays it)")
    return delay


# ---------------------------------------------------------------- state dicts and parameters

def rand(shape, seed=0):
    """A float32 standard-normal tensor, the same for the same shape and seed."""
    from mindspore import Tensor

    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def read_keys(path):
    """keys_*.txt from the oracle: `name<TAB>(d0, d1, ...)` per line -> {name: shape}."""
    keys = {}
    for line in path.read_text().splitlines():
        name, shape = line.split("\t")
        keys[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return keys


def param_shapes(net):
    return {name: tuple(p.shape) for name, p in net.parameters_and_names()}


def load_strict(net, state_dict):
    """Copy a {name: array} dict into the net by exact name: every parameter, nothing extra, same
    shapes (the parameter names ARE the torch state-dict keys)."""
    from mindspore import Tensor

    params = dict(net.parameters_and_names())
    assert set(state_dict) == set(params), set(state_dict) ^ set(params)
    for name, value in state_dict.items():
        assert tuple(value.shape) == tuple(params[name].shape), name
        params[name].set_data(Tensor(np.asarray(value, np.float32)))
    return net
