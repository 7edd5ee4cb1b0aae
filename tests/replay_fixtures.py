"""Fixtures shared by the replay tests (test_replay.py, test_numba_internals.py): a private
replay store, the tiny model with three images and their reference logits, the stored replays."""
import numpy as np
import pytest

from ternet.format import read_model
from ternet.reference import run_reference
from tiny_model import make_tiny_model

# the settings that choose or size replays, old names included: each test starts from defaults
_SETTINGS = ("TERNET_REPLAY", "TERNET_FROZEN", "TERNET_REPLAY_CACHE_MB", "TERNET_PLAN_CACHE_MB",
             "TERNET_DEBUG")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """The replay store of this test (TERNET_CACHE_DIR under tmp_path)."""
    monkeypatch.setenv("TERNET_CACHE_DIR", str(tmp_path / "cache"))
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache" / "frozen"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model path, uint8 images [3, 33, 33, 3], reference logits)."""
    path = make_tiny_model(tmp_path_factory.mktemp("replay") / "tiny.safetensors")
    x = np.random.default_rng(5).integers(0, 256, (3, 33, 33, 3), dtype=np.uint8)
    return path, x, run_reference(read_model(path), x)


def stored(cache):
    """The replays stored in `cache`, as their metadata files, sorted."""
    return sorted(cache.glob("*.json")) if cache.exists() else []
