"""Shared test set-up: hypothesis profiles and deterministic seeds."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs derandomized so a property test cannot pass on one run and fail on the next.
settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_feature_cache(tmp_path_factory):
    """Feature nets trained by evaluations (sampling/features.py) go to a folder of this test
    run (the scripts run as subprocesses inherit it), not the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models (as fast, and no thread-pool stalls on a
    busy machine); the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
