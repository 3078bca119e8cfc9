"""The one place that picks the device, execution mode and CPU threads.

Every command calls `setup_device` once, before any network is built, so that the same config key
means the same thing in `ingest`, `train` and `sample`.
"""
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs drown the progress bars otherwise
# Only effective when this module is imported before MindSpore (latte_cli sets it first too): the
# main thread otherwise busy-waits on the op queue, taking a core.
os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")

import mindspore as ms

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")

_configured = None


def setup_device(device_target="CPU", mode="graph", cpu_threads=1, seed=None, reuse_memory=False):
    """Select the device and mode. `cpu_threads=N`: N threads compute in all, MindSpore's ops and
    ours (set_mindspore_cpu_threads). 1 is the default: a Latte-S/2 training step took 8-15 % fewer
    CPU-seconds on one computing thread than on MindSpore's two-thread pool (three runs, 2-vCPU host
    shared with other work); pass 0 to leave MindSpore's own choice. In graph
    mode compiled graphs are cached on disk (see enable_compile_cache; LATTE_COMPILE_CACHE=0: off).
    `reuse_memory`: graphs plan their buffers' reuse (MindSpore's SOMAS, memory optimize level O1),
    for the first call of a process only: Latte-S/2 sampling measured 24 MB less peak RSS, same step
    and compile CPU time (the sampler sets it; training's memory is left as it was measured).
    Every graph compile is followed by returning the heap it freed to the OS (see
    _release_heap_after_compiles), before the graph's first run allocates its activations, and the
    clean library pages the import and each compile mapped are dropped from the resident set
    (drop_clean_library_pages; LATTE_DROP_LIBRARY_PAGES=0 keeps them)."""
    global _configured
    if device_target not in DEVICE_TARGETS:
        raise ValueError(f"device_target {device_target!r} is not one of {', '.join(DEVICE_TARGETS)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    key = (device_target, mode, cpu_threads)
    if _configured is None:
        ms.set_device(device_target)
        if device_target == "CPU" and cpu_threads:
            set_mindspore_cpu_threads(int(cpu_threads))
        if device_target == "CPU":
            from models import cpu_kernels  # the banded VAE convs split over the same thread count
            cpu_kernels.set_threads(cpu_threads)
        _configured = key
        if reuse_memory:
            try:
                ms.runtime.set_memory(optimize_level="O1")
            except RuntimeError:
                pass  # the process set its memory already; keep that
        enable_compile_cache(device_target, mode, cpu_threads)
        _release_heap_after_compiles()
        drop_clean_library_pages()  # what `import mindspore` mapped and never runs again (below)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if seed is not None:
        ms.set_seed(int(seed))
    return key


def set_mindspore_cpu_threads(threads):
    """Make MindSpore's CPU ops compute on `threads` threads in all. MindSpore's thread pool (2.10,
    runtime ComputeThreadNums) has A actor threads and T threads in all, and an op that splits
    (oneDNN's MatMul/BatchMatMul, elementwise ops at T > 2) runs its parts on the actor AND the kernel
    threads. From op_tuning.threads_num(N) alone it builds A = max(1, floor(0.18 N)) and
    T = max(N, A + 1): threads_num(1) gives the same pool as threads_num(2), one actor thread and one
    kernel thread, and a 2048^2 MatMul at "one thread" measured 1.91 CPU-s per wall second, both
    threads in oneDNN's brgemm. With the dispatch (inter-op) count D configured it builds A = D and
    T = D + N instead, so D = 1 and N = 0 is a pool of one actor thread and no kernel thread, where
    every op runs where it is launched, on one thread (1.01 CPU-s per wall second). threads_num
    rejects 0, so the runtime's own setter is called. At N >= 2 threads_num(N) already gives N
    computing threads (A + kernel threads = N). The first setting of a process stays: MindSpore
    fixes it once (later calls leave it, as threads_num's RuntimeError would)."""
    try:
        from mindspore._c_expression import RuntimeConf  # private: the public setter rejects 0
        conf = RuntimeConf.get_instance()
    except (ImportError, AttributeError):  # another MindSpore: its own threads_num, as before 2.10's fix here
        try:
            ms.device_context.cpu.op_tuning.threads_num(threads)
        except RuntimeError:
            pass  # already fixed by an earlier call in this process; keep the first setting
        return
    if conf.is_op_threads_num_configured():
        return
    if threads == 1:
        if not conf.is_dispatch_threads_num_configured():
            conf.set_dispatch_threads_num(1)
        conf.set_op_threads_num(0)
    else:
        ms.device_context.cpu.op_tuning.threads_num(threads)


def device_target():
    """The device selected by `setup_device` (CPU when nothing has been set yet)."""
    return _configured[0] if _configured else "CPU"


# ---------------------------------------------------------------- compile cache
# A graph takes 20-70 s to compile on CPU, every run. MindSpore can save compiled graphs
# (MS_COMPILER_CACHE_ENABLE/PATH; the set_context keys are deprecated in 2.10) but its own check is
# weak: it hashes only the Python files the entry script imports statically (latte_cli imports the
# subcommands dynamically, so none of models/), and it loads graphs by their compile order alone. It
# measured: a graph compiled for a (2, 8) input was loaded and run for a (3, 8) input, returning (2, 8).
# The path is read once, at the first compile of the process. So the folder is keyed by everything
# that can change a graph (see compile_cache_key), and a guard records the ordered input signatures
# of the graphs compiled into a folder and switches the cache off for the rest of a process whose
# sequence departs from it.

_cache_guard = None  # _CompileGuard of this process, or None when the cache is off


def _source_hash():
    """sha256 over the project's packages (Python and C++ sources) and the entry script: any code
    change, in models/ or in whatever builds the networks, compiles afresh."""
    project = Path(__file__).resolve().parent.parent
    paths = [p for package in ("models", "cache_store", "ingest", "trainer", "sampler")
             for p in sorted((project / package).glob("*.py")) + sorted((project / package).glob("*.cc"))]
    paths += [project / "latte_cli.py", Path(sys.argv[0]).resolve()]
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            digest.update(str(path.relative_to(project) if path.is_relative_to(project) else path).encode()
                          + b"\0" + path.read_bytes())
    return digest.hexdigest()


# flags whose value names where results go and never changes a graph: a run into a new folder reuses
# the graphs of the same command into another
_OUTPUT_FLAGS = ("--output_folder",)


def _run_hash(argv):
    """The command line (less the output folder) and the contents of the config files it names:
    graphs follow the config."""
    argv = [a for i, a in enumerate(argv)
            if not (a.split("=", 1)[0] in _OUTPUT_FLAGS or (i and argv[i - 1] in _OUTPUT_FLAGS))]
    digest = hashlib.sha256("\0".join(argv).encode())
    for arg in argv:
        path = Path(arg.split("=", 1)[-1])
        if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def compile_cache_key(device_target, mode, cpu_threads, argv=None):
    """A short hash of what a cached graph depends on: the ISA key, MindSpore's and Python's versions,
    the sources of models/, LATTE_CONV, LATTE_DENSE, device, mode, threads and the command line with its config
    files. The measured convolution choices (a graph keeps the conv it was compiled with) are checked
    per graph by _CompileGuard instead: hashing the choice file here would miss once more on every
    run that measures a new shape."""
    from models.cpu_features import isa_key
    parts = [isa_key(), ms.__version__, sys.version, _source_hash(),
             os.environ.get("LATTE_CONV", "auto"), os.environ.get("LATTE_DENSE", "auto"), device_target, mode, str(cpu_threads),
             _run_hash(list(sys.argv if argv is None else argv))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def compile_cache_root():
    """The folder for compile caches, or None when LATTE_COMPILE_CACHE=0 switches them off."""
    setting = os.environ.get("LATTE_COMPILE_CACHE", "")
    if setting == "0":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "latte" / "compile"


def _signature(obj, args):
    """Name of the compiled cell/function and the shapes and dtypes of its tensor arguments."""
    def walk(a):
        if isinstance(a, (ms.Tensor, ms.Parameter)):
            return f"{tuple(a.shape)}:{a.dtype}"
        if isinstance(a, (tuple, list)):
            return "(" + ",".join(walk(x) for x in a) + ")"
        return type(a).__name__ if not isinstance(a, (int, float, bool, str)) else repr(a)
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    if isinstance(obj, ms.nn.Cell):
        name += "#" + _cell_digest(obj)
    return f"{name}{walk(args)}"


def _cell_digest(cell):
    """What a Cell's graph depends on besides its arguments: its parameters' names, shapes and dtypes
    (their values are bound at load) and its constant tensors, values included (they are folded into
    the graph). Two networks of other widths can take the same inputs."""
    digest = hashlib.sha256()
    for key, param in cell.parameters_and_names():
        digest.update(f"{key}{tuple(param.shape)}{param.dtype};".encode())
    for prefix, sub in cell.cells_and_names():
        # which cells and operators it is built of: the per-machine choices (dense_select's sgemm
        # cells and Custom ops vs MatMul) take the same inputs and parameters, so without this a
        # cache written under one choice would be loaded under the other
        digest.update(f"{prefix}:{type(sub).__qualname__};".encode())
        for attr, value in sorted(vars(sub).items()):
            if isinstance(value, ms.ops.Primitive):
                func = getattr(value, "func", "")
                digest.update(f"{prefix}.{attr}={value.name}:{str(func).rsplit(':', 1)[-1]};".encode())
            if isinstance(value, ms.Tensor) and not isinstance(value, ms.Parameter):
                digest.update(f"{prefix}.{attr}{tuple(value.shape)}{value.dtype};".encode())
                digest.update(value.asnumpy().tobytes())
    return digest.hexdigest()[:12]


class _CompileGuard:
    """Records the distinct graph signatures in compile order, each with the convolution choices its
    compile made, into `signatures_rank<R>.json` (a writing run: the folder was new) or checks them
    against it (a reading run: same graph, and each recorded choice still what conv_select gives);
    on the first departure it sets MS_COMPILER_CACHE_ENABLE=0, so that no later graph of this
    process is loaded by position."""

    def __init__(self, folder):
        self.file = folder / f"signatures_rank{os.environ.get('RANK_ID', '0')}.json"
        try:
            self.expected = json.loads(self.file.read_text())
            assert all({"graph", "convs"} <= set(entry) for entry in self.expected)
        except (OSError, ValueError, TypeError, AssertionError):
            self.expected = None
            # graphs MindSpore saved without a manifest (a run killed before writing it) would be
            # loaded by position unchecked: start the folder afresh
            for stale in folder.glob("rank_*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.seen = []
        self.diverged = False

    def stop(self):
        self.diverged = True
        os.environ["MS_COMPILER_CACHE_ENABLE"] = "0"

    def check(self, sig):
        """Before a compile: True when `sig` is a new graph of a writing run (record() follows)."""
        if self.diverged or sig in [entry["graph"] for entry in self.seen]:
            return False
        self.seen.append({"graph": sig, "convs": []})
        if self.expected is None:
            return True
        n = len(self.seen)
        if n > len(self.expected) or self.expected[n - 1]["graph"] != sig or not self._convs_hold(n - 1):
            self.stop()
            print(f"note: compiled graphs differ from those cached in {self.file.parent}; "
                  "compiling the rest of this run afresh", file=sys.stderr)
        return False

    def _convs_hold(self, index):
        from models import conv_select
        return all(conv_select.choose(c, h, w, o, measure_missing=False) == choice
                   for c, h, w, o, choice in self.expected[index]["convs"])

    def record(self, convs):
        """After a writing run's compile: the conv choices it made, then the manifest (atomically)."""
        self.seen[-1]["convs"] = sorted(set(convs))
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.seen, indent=1))
        os.replace(tmp, self.file)


def _release_heap_after_compiles():
    """After each new graph compile, hand the heap it freed back to the OS (glibc malloc_trim),
    between the compile and the graph's first run. Without it the compile's freed working memory
    stays resident in holes of the heap and the first run's activations land beside it: the
    Latte-S/2-width training step at depth 2 peaked at 1153 MB, 1084 MB with the trim (VmHWM,
    LATTE_COMPILE_CACHE=0); on a compile-cache hit there is little to return. A jit call whose
    phase was compiled before, and a Cell graph already compiled, do not trim again."""
    from mindspore.graph import api

    def wrap(cls, is_new):
        original = cls.compile
        if getattr(original, "_latte_releases_heap", False):
            return
        seen = set()

        def compile(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if is_new(result, seen):
                release_freed_heap()
                drop_clean_library_pages()  # and the compiler's code, which the graph's runs do not use
            return result
        compile._latte_releases_heap = True
        compile._latte_guarded = getattr(original, "_latte_guarded", False)
        cls.compile = compile

    def new_phase(phase, seen):
        fresh = phase not in seen
        seen.add(phase)
        return fresh

    wrap(api._JitExecutor, new_phase)
    # _CellGraphExecutor.compile returns (phase, whether it compiled now)
    wrap(api._CellGraphExecutor, lambda result, seen: isinstance(result, tuple) and bool(result[-1]))


def heap_released_after_compiles():
    """True once setup_device installed the trim after every new graph compile (above)."""
    from mindspore.graph import api
    return bool(getattr(api._CellGraphExecutor.compile, "_latte_releases_heap", False))


def _install_compile_hooks():
    from mindspore.graph import api

    def wrap(cls, guard):
        original = cls.compile
        if getattr(original, "_latte_guarded", False):
            return

        def compile(self, first, *args, **kwargs):
            if _cache_guard is None or not guard(self, first, args):
                return original(self, first, *args, **kwargs)
            from models import conv_select
            before = len(conv_select.resolved)
            result = original(self, first, *args, **kwargs)
            _cache_guard.record(tuple(x) for x in conv_select.resolved[before:])
            return result
        compile._latte_guarded = True
        compile._latte_releases_heap = getattr(original, "_latte_releases_heap", False)
        cls.compile = compile

    def cell_graph(executor, obj, args):
        return _cache_guard.check(_signature(obj, args))

    def jit_function(executor, method, args):
        # MindSpore binds a reloaded graph's weights only for an ms.jit method of a Cell, from the
        # Cell's parameters_dict (set_weights_values). A cached ms.jit function outside a Cell that
        # closes over parameters ran to loss NaN at its first step, measured (the training step
        # before trainer/step.py made it StepGraphs' methods). So the first such compile ends
        # caching for the rest of the process, before it is saved.
        if isinstance(executor.obj, ms.nn.Cell):
            return _cache_guard.check(_signature(executor.obj, args) + "." + str(method))
        _cache_guard.stop()
        return False

    wrap(api._CellGraphExecutor, cell_graph)
    wrap(api._JitExecutor, jit_function)


CACHE_MAX_AGE_DAYS = 30  # folders unused this long are deleted (each new command line makes one)


def prune_compile_cache(root, keep, max_age_days=CACHE_MAX_AGE_DAYS):
    """Delete the key folders under `root` not used for `max_age_days`, except `keep`. Folders are
    small (graphs without weights, 10 KB-1 MB) but every new command line or code change adds one."""
    cutoff = time.time() - max_age_days * 86400
    for folder in root.iterdir():
        try:
            if folder.is_dir() and folder.name != keep.name and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # another process pruned it first


def enable_compile_cache(device_target, mode, cpu_threads, argv=None):
    """Point MindSpore's compile cache at this run's keyed folder (or leave it off). Returns the folder."""
    global _cache_guard
    root = compile_cache_root()
    if root is None or mode != "graph":
        return None
    if not Path(sys.argv[0]).is_file():
        return None  # `python -c` / stdin: MindSpore's cache reads the entry script and fails without one
    folder = root / compile_cache_key(device_target, mode, cpu_threads, argv)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)  # its age is since its last use
        prune_compile_cache(root, keep=folder)
    except OSError as exc:
        print(f"note: no compile cache ({exc}); set LATTE_COMPILE_CACHE=DIR or 0", file=sys.stderr)
        return None
    _cache_guard = _CompileGuard(folder)
    _install_compile_hooks()
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = str(folder)
    return folder


# ---------------------------------------------------------------- resident library pages
# `import mindspore` maps ~240-340 MB of its shared libraries' pages into the process (its static
# initialisers and the kernel's fault-around read whole 64 KB windows of code), and most of that code
# never runs again: measured, a Latte-S/2 compile and its steps touch 60 MB of the 166 MB dropped
# below. Resident, those pages count in the process's RSS and peak (VmHWM) until the kernel needs the
# memory. They are clean copies of the files (no process wrote them), so dropping them from this
# process's page tables loses nothing: the page cache keeps them, and a page used again is mapped again
# from it (a minor fault, or a read from disk if the kernel evicted it meanwhile).

_MADV_DONTNEED = 4


def _clean_library_mappings():
    """(start, end) of the file-backed private mappings that hold no written page: never writable
    (code, read-only data), no anonymous (copy-on-write) page and no dirty page, per /proc/self/smaps."""
    found, current = [], None
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        head = line.split(None, 6)
        if head and "-" in head[0] and not head[0].endswith(":"):
            if current and current["clean"]:
                found.append(current["range"])
            perms, name = head[1], head[5] if len(head) > 5 else ""
            start, end = (int(x, 16) for x in head[0].split("-"))
            current = {"range": (start, end), "clean": name.startswith("/") and perms[1] == "-" and perms[3] == "p"}
        elif current and current["clean"] and head[0] in ("Anonymous:", "Private_Dirty:", "Shared_Dirty:"):
            current["clean"] = head[1] == "0"
    if current and current["clean"]:
        found.append(current["range"])
    return found


def drop_clean_library_pages():
    """Unmap the resident pages of the clean file-backed mappings (see above) from this process, so that
    only the library code it runs from here on counts in its resident set; MB of RSS it dropped. A
    no-op (0) off Linux, or with LATTE_DROP_LIBRARY_PAGES=0 (to measure with them resident)."""
    if os.environ.get("LATTE_DROP_LIBRARY_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return 0.0
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = rss_split()["RssFile"]
    for start, end in _clean_library_mappings():
        # MADV_DONTNEED on a private file mapping without written pages: later reads map the file's
        # page again, the same bytes. (MADV_PAGEOUT measured no effect: the pages are shared.)
        libc.madvise(start, end - start, _MADV_DONTNEED)
    return max(0.0, before - rss_split()["RssFile"])


def rss_split():
    """This process's resident set by kind, MB: VmRSS = RssAnon (heap, tensors, graphs) + RssFile
    (mapped files: libraries, weight files) + RssShmem; VmHWM is the peak of VmRSS."""
    out = {"VmHWM": 0.0, "VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0, "RssShmem": 0.0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def release_freed_heap():
    """Hand the heap pages of freed allocations back to the OS (glibc `malloc_trim`); True if it ran.

    A graph compile frees ~50 MB of working memory (Latte-S/2, measured) that glibc keeps resident in
    holes of its heap, under the activations of every call after it; called after every new compile
    (_release_heap_after_compiles) and by `sampler.release_network`. A no-op off glibc."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
            _libc = _libc if _libc and hasattr(_libc, "malloc_trim") else False
        except OSError:
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True


_libc = None  # the C library once looked up, False where it has no malloc_trim
