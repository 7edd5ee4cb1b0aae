"""ternet.config: one rule for every TERNET_* variable, one table, and no reads elsewhere."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ternet import config
from ternet.errors import SettingError
from ternet.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
SWITCHES = [s.name for s in config.SETTINGS.values() if s.parse is config.switch]
# A read of a TERNET_ variable: os.environ.get("TERNET_..."), os.environ["TERNET_..."],
# os.getenv("TERNET_..."), "TERNET_..." in os.environ.
READ = (r"""(environ\.get\(|environ\[|getenv\()\s*["']TERNET_"""
        r"""|["']TERNET_\w+["']\s+(not\s+)?in\s+\w*\.?environ""")
# Read by the tests and benchmarks themselves, not by the package.
OUTSIDE_THE_PACKAGE = {"TERNET_HYPOTHESIS", "TERNET_FUZZ_N", "TERNET_PEERS_CACHE"}


@pytest.fixture
def env(monkeypatch):
    for name in [*config.SETTINGS, *config.FORMER]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(env):
    for s in config.SETTINGS.values():
        assert config.get(s.name) == s.default, s.name
        env.setenv(s.name, "")                           # empty is unset
        assert config.get(s.name) == s.default, s.name
        assert s.name.startswith("TERNET_") and s.doc and s.scope in ("runtime", "training")
    assert SWITCHES == ["TERNET_DEBUG", "TERNET_REPLAY", "TERNET_BOUNDSCHECK", "TERNET_NUMBA_CACHE"]
    assert [config.SETTINGS[n].default for n in SWITCHES] == [False, True, False, True]


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_rule(env, name):
    for on in ("1", "true", "yes", "on", "TRUE", " Yes ", "On\n"):
        env.setenv(name, on)
        assert config.get(name) is True, on
    for off in ("0", "false", "no", "off", "FALSE", " No ", "oFF\t"):
        env.setenv(name, off)
        assert config.get(name) is False, off
    env.setenv(name, "   ")                              # blank: the default
    assert config.get(name) is config.SETTINGS[name].default
    for bad in ("2", "-1", "maybe", "enable", "y", "t", "o n"):
        env.setenv(name, bad)
        with pytest.raises(SettingError, match=f"^{name}='{re.escape(bad.strip())}': expected "
                                               "one of 1, true, yes, on \\(on\\) or 0, false"):
            config.get(name)


def test_numbers(env):
    env.setenv("TERNET_NUM_THREADS", " 3 ")
    assert config.get("TERNET_NUM_THREADS") == 3
    for bad in ("0", "-1", "2.0", "abc", "٣"):            # an Arabic-Indic 3 is not ASCII
        env.setenv("TERNET_NUM_THREADS", bad)
        with pytest.raises(SettingError,
                           match=f"^TERNET_NUM_THREADS='{bad}': expected a positive integer$"):
            config.get("TERNET_NUM_THREADS")
    env.setenv("TERNET_REPLAY_CACHE_MB", "0")
    assert config.get("TERNET_REPLAY_CACHE_MB") == 0
    env.setenv("TERNET_REPLAY_CACHE_MB", "1024")
    assert config.get("TERNET_REPLAY_CACHE_MB") == 1024
    for bad in ("-1", "1.5", "1e3", "lots"):
        env.setenv("TERNET_REPLAY_CACHE_MB", bad)
        with pytest.raises(SettingError,
                           match=f"^TERNET_REPLAY_CACHE_MB='{re.escape(bad)}': expected a whole"):
            config.get("TERNET_REPLAY_CACHE_MB")


def test_former_names_are_read_when_the_new_one_is_unset(env):
    """TERNET_FROZEN and TERNET_PLAN_CACHE_MB, the names before replays were called replays."""
    assert config.FORMER == {"TERNET_FROZEN": "TERNET_REPLAY",
                             "TERNET_PLAN_CACHE_MB": "TERNET_REPLAY_CACHE_MB"}
    env.setenv("TERNET_FROZEN", "off")
    env.setenv("TERNET_PLAN_CACHE_MB", "7")
    assert config.get("TERNET_REPLAY") is False and config.get("TERNET_REPLAY_CACHE_MB") == 7
    env.setenv("TERNET_REPLAY", "on")                    # the new name wins
    env.setenv("TERNET_REPLAY_CACHE_MB", " ")            # blank: as unset, the former is read
    assert config.get("TERNET_REPLAY") is True and config.get("TERNET_REPLAY_CACHE_MB") == 7
    env.setenv("TERNET_PLAN_CACHE_MB", "lots")           # an error names the variable read
    with pytest.raises(SettingError, match="^TERNET_PLAN_CACHE_MB='lots': expected a whole"):
        config.get("TERNET_REPLAY_CACHE_MB")


def test_kernel_requests(env):
    for request in cpu.REQUESTS:
        env.setenv("TERNET_KERNELS", f" {request.upper()} ")
        assert config.get("TERNET_KERNELS") == request
    for bad in ("bogus", "avx512", "auto,plain"):
        env.setenv("TERNET_KERNELS", bad)
        with pytest.raises(SettingError, match=f"^TERNET_KERNELS='{bad}': expected one of "
                                               f"{', '.join(cpu.REQUESTS)}$"):
            config.get("TERNET_KERNELS")


def test_paths_and_names_are_taken_as_written(env):
    for name in ("TERNET_MODEL", "TERNET_CACHE_DIR", "TERNET_SHARED_DIR", "TERNET_TRAIN_CACHE",
                 "TERNET_PROXY_DIR", "TERNET_MBV2_TFLITE"):
        env.setenv(name, " /some/where with spaces/ ")
        assert config.get(name) == " /some/where with spaces/ "


def test_every_variable_is_in_the_table():
    """Every TERNET_* name in the package's source is a setting of config.py, and only config.py
    reads one from the environment; the docs name no other."""
    found, reads = set(), []
    for path in sorted((ROOT / "ternet").rglob("*.py")):
        text = path.read_text()
        found |= set(re.findall(r"TERNET_[A-Z0-9_]*[A-Z0-9]", text))
        if path.name != "config.py":
            reads += [f"{path.relative_to(ROOT)}: {line.strip()}" for line in text.splitlines()
                      if re.search(READ, line)]
    assert found - set(config.SETTINGS) - set(config.FORMER) == set()
    assert set(config.SETTINGS) <= found
    assert reads == []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        names = set(re.findall(r"TERNET_[A-Z0-9_]*[A-Z0-9]", doc.read_text()))
        assert names - set(config.SETTINGS) - set(config.FORMER) - OUTSIDE_THE_PACKAGE == set(), \
            doc.name


def test_docs_table_is_the_generated_one():
    assert config.markdown_table() in (ROOT / "docs" / "config.md").read_text()


def test_importing_config_is_cheap():
    code = ("import sys, ternet.config; "
            "print(sorted(m for m in ('numba', 'numpy', 'llvmlite', 'PIL') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_debug_zero_is_off_everywhere(env, capsys):
    """TERNET_DEBUG=0 used to count as on for the replay notes (any non-empty value did)."""
    from ternet.executors import debug_note
    env.setenv("TERNET_DEBUG", "0")
    debug_note("hidden")
    env.setenv("TERNET_DEBUG", "1")
    debug_note("shown")
    assert capsys.readouterr().err == "ternet: shown\n"


def test_replay_switches(env):
    """TERNET_REPLAY=false turns replays off (TERNET_FROZEN used to count as on: only "0" did),
    and TERNET_BOUNDSCHECK=0 leaves them on (any non-empty value used to turn them off)."""
    from ternet import replay
    env.delenv("NUMBA_BOUNDSCHECK", raising=False)
    on = replay.enabled("auto")                          # False only without llvmlite
    for name in ("TERNET_REPLAY", "TERNET_FROZEN"):
        for value, want in (("false", False), ("off", False), ("0", False), ("1", on), ("", on)):
            env.setenv(name, value)
            assert replay.enabled("auto") is want, (name, value)
        env.delenv(name)
    for value, want in (("0", on), ("no", on), ("1", False), ("true", False)):
        env.setenv("TERNET_BOUNDSCHECK", value)
        assert replay.enabled("auto") is want, value
    assert replay.enabled("reference") is False


def test_kernel_module_switches():
    """kernels/_jit.py takes TERNET_NUMBA_CACHE and TERNET_BOUNDSCHECK through config (read when
    it is imported); a bad value stops the import with the setting named."""
    code = "import ternet.kernels._jit as j; print(j._CACHE, j._BOUNDSCHECK)"
    base = {k: v for k, v in os.environ.items() if not k.startswith("TERNET_")}
    out = {}
    for value in ("off", "yes"):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**base, "TERNET_NUMBA_CACHE": value, "TERNET_BOUNDSCHECK": value})
        assert r.returncode == 0, r.stderr
        out[value] = r.stdout.split()
    assert out == {"off": ["False", "None"], "yes": ["True", "True"]}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**base, "TERNET_BOUNDSCHECK": "2"})
    assert r.returncode != 0 and "SettingError: TERNET_BOUNDSCHECK='2'" in r.stderr
