"""Settings: every `TERNET_*` environment variable ternet reads, read here and nowhere else.

Each setting has a name, a default, a parser and a one-line description (`SETTINGS`; the table
in docs/config.md is `markdown_table()`). `get(name)` reads the variable at each call (so a
change between calls counts), parses and validates it, and raises `SettingError` naming the
variable and the value when it is unusable; the CLI reports that as a usage error (exit 2).
Call sites spell the name out (`config.get("TERNET_DEBUG")`), so a search for a variable finds
every user.

One rule for every variable: unset or empty means the default (or, for a renamed setting, its
former name's value: `Setting.former`). Switches are on for 1, true,
yes, on and off for 0, false, no, off (any case, surrounding blanks ignored); any other value
is an error. Numbers and kernel names ignore surrounding blanks too; paths and model names are
taken as written.

The NUMBA_* variables are numba's own (NUMBA_CACHE_DIR, NUMBA_BOUNDSCHECK, NUMBA_NUM_THREADS,
NUMBA_CPU_NAME, ...): numba reads them, and ternet reads them as numba does. Importing this
module imports nothing heavy (no numba, no numpy).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .errors import SettingError
from .kernels.cpu import REQUESTS

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def switch(text: str) -> bool:
    t = text.lower()
    if t in ON or t in OFF:
        return t in ON
    raise ValueError(f"expected one of {', '.join(ON)} (on) or {', '.join(OFF)} (off)")


def positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise ValueError("expected a positive integer")
    return int(text)


def megabytes(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError("expected a whole number of megabytes")
    return int(text)


def kernel_request(text: str) -> str:
    t = text.lower()
    if t not in REQUESTS:
        raise ValueError(f"expected one of {', '.join(REQUESTS)}")
    return t


def verbatim(text: str) -> str:
    """Paths and model names: as written (blanks may be part of a name)."""
    return text


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    parse: Callable[[str], object]
    doc: str
    scope: str = "runtime"        # "runtime" (ternet, ternet.load) or "training" (ternet.train)
    former: str | None = None     # the variable's earlier name, read when this one is unset


SETTINGS = {s.name: s for s in (
    Setting("TERNET_MODEL", None, verbatim,
            "model the CLI runs without --model (bundled name or path); default: the one "
            "`ternet models` marks"),
    Setting("TERNET_NUM_THREADS", 1, positive_int,
            "threads predict runs on when load/--threads gives none"),
    Setting("TERNET_KERNELS", "auto", kernel_request,
            "kernel request when load/--kernels gives none (cpu.REQUESTS)"),
    Setting("TERNET_DEBUG", False, switch,
            "tracebacks, ignored image warnings and replay notes on stderr"),
    Setting("TERNET_CACHE_DIR", None, verbatim,
            "replays go to its frozen/ (default: frozen/ in the user cache directory)"),
    Setting("TERNET_REPLAY_CACHE_MB", 256, megabytes,
            "cap on the stored replays in MB (0 stores none)", former="TERNET_PLAN_CACHE_MB"),
    Setting("TERNET_REPLAY", True, switch, "replays (start-up without numba) on or off",
            former="TERNET_FROZEN"),
    Setting("TERNET_BOUNDSCHECK", False, switch,
            "numba bounds checks in every kernel (turns replays off)"),
    Setting("TERNET_NUMBA_CACHE", True, switch,
            "numba's on-disk cache of compiled kernels on or off"),
    Setting("TERNET_SHARED_DIR", None, verbatim,
            "the project's shared folder; default: ../shared beside the checkout", "training"),
    Setting("TERNET_TRAIN_CACHE", None, verbatim,
            "cache for unpacked training data (default: train/ in the user cache directory)",
            "training"),
    Setting("TERNET_PROXY_DIR", None, verbatim,
            "ImageNet-proxy set directory (the default of --proxy)", "training"),
    Setting("TERNET_MBV2_TFLITE", None, verbatim,
            "int8 MobileNetV2 .tflite (the default of --tflite); default: in the shared folder",
            "training"),
)}


FORMER = {s.former: s.name for s in SETTINGS.values() if s.former}   # earlier name -> setting


def get(name: str):
    """The value of setting `name` now: its default when unset or empty (a renamed setting: its
    former name's value, if that is set), else the parsed value; SettingError naming the
    variable read when the value is unusable."""
    s = SETTINGS[name]
    raw = os.environ.get(name, "")
    text = raw if s.parse is verbatim else raw.strip()
    if not text and s.former:
        name, raw = s.former, os.environ.get(s.former, "")
        text = raw if s.parse is verbatim else raw.strip()
    if not text:
        return s.default
    try:
        return s.parse(text)
    except ValueError as e:
        raise SettingError(f"{name}={text!r}: {e}") from None


def markdown_table() -> str:
    """The settings as the Markdown table in docs/config.md (a test keeps the two equal)."""
    def default(s):
        if isinstance(s.default, bool):
            return "on" if s.default else "off"
        return "unset" if s.default is None else f"`{s.default}`"
    rows = ["| variable | used by | default | meaning |", "|---|---|---|---|"]
    def doc(s):
        return f"{s.doc}; formerly `{s.former}`, still read when this is unset" if s.former else s.doc
    rows += [f"| `{s.name}` | {s.scope} | {default(s)} | {doc(s)} |" for s in SETTINGS.values()]
    return "\n".join(rows)
