import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")  # as latte_cli does
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.runtime import setup_device  # noqa: E402

# Tests run in PyNative mode: most are tiny, and graph compilation would cost more than it saves.
setup_device("CPU", mode="pynative", cpu_threads=1)

ORACLE = ROOT.parent / "shared" / "reference" / "oracle"


@pytest.fixture(scope="session")
def oracle_dir():
    if not ORACLE.is_dir():
        pytest.fail(f"oracle data not found at {ORACLE}: clone with ../shared beside the repo")
    return ORACLE
