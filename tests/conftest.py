"""Test configuration: one Hypothesis profile for the whole suite, chosen by environment."""
import os

from hypothesis import HealthCheck, settings

# deadline=None: the first example of a kernel test pays for JIT compilation.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("quick", max_examples=10, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("TERNET_HYPOTHESIS", "ci"))

# Replays (ternet.replay) go to a per-session directory, never the user's cache; subprocess
# tests inherit it through the environment.
if "TERNET_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["TERNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="ternet-test-cache-")
