"""Every use of numba's private internals, in one module.

ternet's kernels are ordinary numba dispatchers, but a few things reach below numba's public API:

* the kernels' on-disk cache in the user cache directory (a subclass of numba's FunctionCache);
* the thread count without numba's per-call locking, and whether GNU OpenMP's threads are up
  (a child forked after that must run serial kernels);
* recording a replay (`ternet.record`): tracing the kernels' calls, keeping their object code,
  their native signatures, the JIT's target CPU and features;
* replaying one (`ternet.replay`): numba's C helpers, loaded from its extension modules without
  importing numba.

Each is a small function below whose docstring names the internal it relies on. `self_check`
verifies, once per process, that those internals are what this code expects; where they are
not, replays are off for the process (the numba executor runs every batch, with the same
results) and, with TERNET_DEBUG=1, one note on stderr says why. The kernel cache and the thread
count fall back to numba's public API by themselves.

Importing this module imports nothing from numba: the replay path must not (that is the ~0.6 s
it saves).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
import sys
import threading

TESTED_NUMBA = "0.68"            # the numba minor version these internals were checked against

_HELPERLIB = "_helperlib*.so"                     # numba._helperlib
_NRT_PYTHON = "core/runtime/_nrt_python*.so"      # numba.core.runtime._nrt_python


class NumbaInternalsError(RuntimeError):
    """numba's internals are not what this module expects."""


# ---------------------------------------------------------------------------------- on / off

_OFF: str | None = None          # why replays are off in this process (None: they are not)


def replays_off() -> str | None:
    """Why replays are off in this process, or None."""
    return _OFF


def turn_replays_off(reason: str) -> None:
    """Replays off for the rest of the process; the first reason is noted (TERNET_DEBUG=1)."""
    global _OFF
    if _OFF is not None:
        return
    _OFF = reason
    from . import config
    if config.get("TERNET_DEBUG"):
        numba = sys.modules.get("numba")
        version = getattr(numba, "__version__", None)
        seen = f"; numba {version}, checked with {TESTED_NUMBA}" if version else ""
        print(f"ternet: numba's internals are not what ternet expects ({reason}{seen}): "
              "replays off, the numba executor runs", file=sys.stderr)


def self_check(record: bool = False) -> bool:
    """Are numba's internals what ternet's replays rely on? Checked once per process (cached);
    a failed check turns replays off for the process.

    The replay checks look only at numba's files (they never import numba: a replay must not);
    `record=True` adds the checks of what recording uses, importing numba, which the numba pass
    that precedes a recording imports anyway."""
    problem = _replay_problem() or (_record_problem() if record else None)
    if problem:
        turn_replays_off(problem)
    return _OFF is None


def reset() -> None:
    """Forget the checks' results and turn replays back on (for tests)."""
    global _OFF
    _OFF = None
    _replay_problem.cache_clear()
    _record_problem.cache_clear()
    _package_dir.cache_clear()
    _package_file.cache_clear()


@functools.cache
def _replay_problem() -> str | None:
    """What replaying needs from numba's files, without importing numba: the package, its
    `_version.py` (replays are keyed by it) and the two C extension modules."""
    if _package_dir() is None:
        return "numba is not installed"
    for pattern in ("_version.py", _HELPERLIB, _NRT_PYTHON):
        if _package_file(pattern) is None:
            return f"numba/{pattern} not found"
    return None


@functools.cache
def _record_problem() -> str | None:
    """What recording uses: each check names the internal it needs."""
    try:
        import inspect

        import numba
        from numba import _dispatcher
        from numba.core import callconv, compiler, funcdesc, types
        from numba.core.codegen import CPUCodeLibrary
        from numba.core.compiler_lock import global_compiler_lock
        from numba.core.dispatcher import Dispatcher
        from numba.core.registry import cpu_target
    except ImportError as e:
        return f"import failed: {e}"

    def hook_params(name):
        hook = CPUCodeLibrary.__dict__.get(name)
        if not isinstance(hook, classmethod):
            return None
        return list(inspect.signature(getattr(CPUCodeLibrary, name)).parameters)

    try:
        cg = cpu_target.target_context.codegen()
        probe = numba.njit(lambda: None)          # a dispatcher; nothing is compiled
        checks = {
            "Dispatcher.__call__ is numba._dispatcher.Dispatcher's":
                issubclass(Dispatcher, _dispatcher.Dispatcher)
                and "__call__" not in Dispatcher.__dict__
                and "__call__" in _dispatcher.Dispatcher.__dict__,
            "dispatcher overloads, targetoptions, typeof_pyval, py_func":
                isinstance(probe.overloads, dict) and isinstance(probe.targetoptions, dict)
                and callable(probe.typeof_pyval) and callable(probe.py_func),
            "CompileResult library, signature, target_context, fndesc":
                {"library", "signature", "target_context", "fndesc"}
                <= set(getattr(compiler.CompileResult, "_fields", ())),
            "FunctionDescriptor.llvm_func_name":
                isinstance(getattr(funcdesc.FunctionDescriptor, "llvm_func_name", None), property),
            "CPUCallConv.get_function_type(restype, argtypes)":
                list(inspect.signature(callconv.CPUCallConv.get_function_type).parameters)
                == ["self", "restype", "argtypes"],
            "numba.core.types Array, Boolean, Integer, Float, BaseTuple, none":
                all(hasattr(types, n) for n in ("Array", "Boolean", "Integer", "Float",
                                                "BaseTuple", "none")),
            "CPUCodeLibrary._object_getbuffer_hook(ll_module), "
            "_object_compiled_hook(ll_module, buf)":
                hook_params("_object_getbuffer_hook") == ["ll_module"]
                and hook_params("_object_compiled_hook") == ["ll_module", "buf"]
                and issubclass(cg._library_class, CPUCodeLibrary),
            "CPUCodeLibrary._get_module_for_linking":
                callable(getattr(CPUCodeLibrary, "_get_module_for_linking", None)),
            "CPUCodeLibrary.__library on its final module":
                "_CPUCodeLibrary__library"
                in CPUCodeLibrary._finalize_final_module.__code__.co_names,
            "codegen _engine.set_object_cache, _tm.emit_object, _tm_features, _get_host_cpu_name":
                callable(cg._engine.set_object_cache) and callable(cg._tm.emit_object)
                and isinstance(cg._tm_features, str) and isinstance(cg._get_host_cpu_name(), str),
            "global_compiler_lock": hasattr(global_compiler_lock, "__enter__"),
        }
    except Exception as e:                        # an attribute gone, a signature changed
        return f"{type(e).__name__}: {e}"
    failed = [what for what, ok in checks.items() if not ok]
    return f"unexpected: {'; '.join(failed)}" if failed else None


# ---------------------------------------------------------------------------------- replaying

@functools.cache
def _package_dir() -> str | None:
    """numba's package directory, found without importing numba."""
    spec = importlib.util.find_spec("numba")
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


@functools.cache
def _package_file(pattern: str) -> str | None:
    """The first file of numba's package matching `pattern`, or None."""
    found = glob.glob(os.path.join(_package_dir() or "", pattern)) if _package_dir() else []
    return found[0] if found else None


def version_stamp() -> str:
    """Size and mtime of numba's `numba/_version.py`, without importing numba: a replay's key
    changes when numba is upgraded."""
    if _package_dir() is None:
        raise NumbaInternalsError("numba is not installed")
    st = os.stat(os.path.join(_package_dir(), "_version.py"))
    return f"numba:{st.st_size}:{st.st_mtime_ns}"


def _bare_extension(name: str, pattern: str):
    """Load one of numba's C extension modules (`name`, file `pattern` in numba's package)
    without running numba/__init__.py."""
    if name in sys.modules:
        return sys.modules[name]
    path = _package_file(pattern)
    if path is None:
        raise NumbaInternalsError(f"numba extension {pattern} not found")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def c_helpers() -> dict[str, int]:
    """The C helpers numba's generated code calls, symbol name -> address, under the names numba
    registers them with LLVM: `numba._helperlib.c_helpers` as `numba_<name>`,
    `numba.core.runtime._nrt_python.c_helpers` as `NRT_<name>` (names with a leading underscore
    as they are). A failure turns replays off for the process and raises NumbaInternalsError."""
    try:
        helper = _bare_extension("numba._helperlib", _HELPERLIB)
        nrt = _bare_extension("numba.core.runtime._nrt_python", _NRT_PYTHON)
        out = {"numba_" + k: v for k, v in helper.c_helpers.items()}
        out.update({(k if k.startswith("_") else "NRT_" + k): v for k, v in nrt.c_helpers.items()})
        if not all(isinstance(v, int) for v in out.values()):
            raise NumbaInternalsError("c_helpers are not addresses")
    except Exception as e:
        reason = f"numba's C helpers: {type(e).__name__}: {e}"
        turn_replays_off(reason)
        raise NumbaInternalsError(reason) from None
    return out


# ---------------------------------------------------------------------------------- recording

_KEEP_LOCK = threading.Lock()
_KEEP_DEPTH = 0


def _keeping_hook(getbuffer):
    """numba's getbuffer object cache hook, also keeping the object code it hands to the JIT on
    the code library (as `_ternet_object`, where `object_code` finds it)."""
    def hook(ll_module):
        buf = getbuffer(ll_module)
        if buf:
            lib = getattr(ll_module, "_CPUCodeLibrary__library", None)
            if lib is not None:
                lib._ternet_object = buf
        return buf
    hook.ternet_keeps_object_code = True
    return hook


@contextlib.contextmanager
def keeping_object_code():
    """While active (in any thread), every kernel numba loads from its on-disk cache keeps its
    object code, so that a recording need not compile it again (numba hands the code to the JIT
    and drops it). Outside, numba's own hooks are in place: importing ternet patches nothing.

    Relies on numba's JIT codegen (`cpu_target.target_context.codegen()`), its `_engine`'s
    llvmlite object cache callbacks (set by numba to `CPUCodeLibrary._object_compiled_hook` and
    `_object_getbuffer_hook`) and the `__library` numba stores on each final LLVM module. The
    callbacks are swapped under numba's compiler lock: no compilation is under way meanwhile."""
    global _KEEP_DEPTH
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.registry import cpu_target
    cg = cpu_target.target_context.codegen()
    lib_class = cg._library_class
    with _KEEP_LOCK:
        if _KEEP_DEPTH == 0:
            with global_compiler_lock:
                cg._engine.set_object_cache(lib_class._object_compiled_hook,
                                            _keeping_hook(lib_class._object_getbuffer_hook))
        _KEEP_DEPTH += 1
    try:
        yield
    finally:
        with _KEEP_LOCK:
            _KEEP_DEPTH -= 1
            if _KEEP_DEPTH == 0:
                with global_compiler_lock:
                    cg._engine.set_object_cache(lib_class._object_compiled_hook,
                                                lib_class._object_getbuffer_hook)


def getbuffer_hook():
    """The getbuffer callback numba's JIT engine calls now (llvmlite `ExecutionEngine.
    _object_cache_getbuffer`; for tests)."""
    from numba.core.registry import cpu_target
    return cpu_target.target_context.codegen()._engine._ee._object_cache_getbuffer


_TRACE_LOCK = threading.Lock()


def trace_calls(fn) -> list:
    """Run fn() and return [(dispatcher, args, kwargs)] for every call of a jitted function from
    Python made by this thread (calls from other threads pass through untouched).

    Patches `numba.core.dispatcher.Dispatcher.__call__` (otherwise inherited from the C type
    `numba._dispatcher.Dispatcher`) for the duration."""
    from numba import _dispatcher
    from numba.core.dispatcher import Dispatcher
    base_call = _dispatcher.Dispatcher.__call__
    calls, me = [], threading.get_ident()

    def traced(self, *args, **kw):
        if threading.get_ident() == me:
            calls.append((self, args, kw))
        return base_call(self, *args, **kw)

    with _TRACE_LOCK:
        Dispatcher.__call__ = traced
        try:
            fn()
        finally:
            del Dispatcher.__call__
    return calls


def compiled_overload(disp, args) -> tuple[tuple, object]:
    """(the numba types of `args`, the compiled overload of dispatcher `disp` for exactly those
    types or None): `Dispatcher.typeof_pyval` and `Dispatcher.overloads`."""
    sig = tuple(disp.typeof_pyval(a) for a in args)
    return sig, disp.overloads.get(sig)


def runs_parallel(disp) -> bool:
    """Was dispatcher `disp` made with parallel=True? (`Dispatcher.targetoptions`.)"""
    return bool(disp.targetoptions.get("parallel"))


def object_code(cres) -> bytes:
    """The object code of a compiled overload `cres`, all its callees linked in: the code
    library's `_compiled_object` (a fresh compile), else what `keeping_object_code` kept, else
    (loaded from numba's cache outside it: numba dropped the object) emitted again by numba's
    target machine (`library._codegen._tm.emit_object`) from the IR numba keeps for linking the
    library into others (`library._get_module_for_linking()`: the same optimized IR, its
    functions weak instead of global)."""
    lib = cres.library
    obj = getattr(lib, "_compiled_object", None) or getattr(lib, "_ternet_object", None)
    if obj:
        return bytes(obj)
    return bytes(lib._codegen._tm.emit_object(lib._get_module_for_linking()))


def native_signature(cres, sig) -> tuple[list, str]:
    """(LLVM argument types, symbol name) of a compiled overload's native function: numba's
    calling convention (`target_context.call_conv.get_function_type`: a return-value pointer,
    an exception pointer, then the flattened arguments) and `fndesc.llvm_func_name`."""
    fnty = cres.target_context.call_conv.get_function_type(cres.signature.return_type, sig)
    return list(fnty.args), cres.fndesc.llvm_func_name


def numba_types():
    """`numba.core.types`: the argument types of a recorded call."""
    from numba.core import types
    return types


def host_target() -> tuple[str, str]:
    """(CPU name, features) numba's JIT compiles for: its codegen's `_get_host_cpu_name()` and
    `_tm_features` (the replay's target machine must match them)."""
    from numba.core.registry import cpu_target
    cg = cpu_target.target_context.codegen()
    return cg._get_host_cpu_name(), cg._tm_features


# ---------------------------------------------------------------------------------- kernels

def num_threads_getter():
    """numba's thread-local thread count reader (`numba.np.ufunc.parallel._get_num_threads`, a
    ctypes function) once the threading layer is up, else None (use numba.get_num_threads)."""
    from numba.np.ufunc import parallel
    if not getattr(parallel, "_is_initialized", False):
        return None
    return getattr(parallel, "_get_num_threads", None)


def omp_started() -> bool:
    """Has numba started GNU OpenMP's threads in this process? (`numba.np.ufunc.parallel.
    _is_initialized` and `_threading_layer == "omp"`.)"""
    from numba.np.ufunc import parallel
    return (getattr(parallel, "_is_initialized", False)
            and getattr(parallel, "_threading_layer", None) == "omp")


def user_dir_cache_class(cache_path):
    """numba's FunctionCache with a locator that puts a kernel's cache in
    `cache_path(subpath)`, where subpath is numba's own per-source-directory name; None if
    numba's classes are not found (their names changed across versions; 0.59:
    `_UserProvidedCacheLocator`).

    Relies on `numba.core.caching`: `UserProvidedCacheLocator` (its `_cache_path`,
    `get_suitable_cache_subpath`, `from_function`), `CompileResultCacheImpl._locator_classes`,
    `FunctionCache._impl_class`."""
    from numba.core import caching
    base = (getattr(caching, "UserProvidedCacheLocator", None)
            or getattr(caching, "_UserProvidedCacheLocator", None))
    impl = getattr(caching, "CompileResultCacheImpl", None)
    cache = getattr(caching, "FunctionCache", None)
    if base is None or impl is None or cache is None:
        return None

    class Locator(base):
        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            self._cache_path = cache_path(self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            return super(base, cls).from_function(py_func, py_file)   # skips base's CACHE_DIR test

    class Impl(impl):
        _locator_classes = [Locator]

    class Cache(cache):
        _impl_class = Impl

    return Cache


def set_cache(disp, cache_class) -> None:
    """Give dispatcher `disp` a cache object of `cache_class` (numba's `Dispatcher._cache`).
    RuntimeError if numba finds no usable cache directory."""
    disp._cache = cache_class(disp.py_func)
