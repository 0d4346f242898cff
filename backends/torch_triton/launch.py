"""Launch a Triton kernel again without Triton's per-call argument processing.

Why. ``kernel[grid](...)`` runs :meth:`triton.runtime.jit.JITFunction.run` every call: it binds the
arguments through a generated function, specializes each one (``native_specialize_impl``), turns
the specialization and the options into a string key, finds the compiled kernel under it, builds
the launch metadata and only then launches. One FP8 decode call through ``dsa_ref.torch.sparse_mla``
(two launches: the split kernel and its combine) cost ~118 us of host time on the H200 (torch 2.11,
triton 3.6.0); under cProfile, ``JITFunction.run`` was ~100 us of it (cumulative, 40
``native_specialize_impl`` calls among them).

What. :class:`CachedLauncher` wraps one ``@triton.jit`` (or ``@gluon.jit``) kernel. The first call of
a *specialization signature* goes through the plain ``kernel[grid](...)``, which compiles (or finds)
the kernel and returns its ``CompiledKernel``; later calls of the same signature hand the arguments
straight to that kernel's launcher, as the last lines of ``JITFunction.run`` do (triton 3.6.0,
``runtime/jit.py`` lines 743-745)::

    kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
               launch_metadata, launch_enter_hook, launch_exit_hook, *bound_args.values())

``bound_args`` holds every parameter in order, constexprs and defaults included: the launcher's
argument format takes a constexpr as an object and drops it (``backends/nvidia/driver.py``,
``make_launcher``). The launch metadata is only read by the launch hooks, so with none set the
fast path passes None for it and for the hooks (the launcher then calls nothing, as it calls
nothing through an empty chain). The device and stream are Triton's own:
``driver.active.get_current_device()`` and ``driver.active.get_current_stream(device)`` (torch's
current device and raw stream; inside a CUDA-graph capture, the capturing stream).

The signature (what Triton 3.6.0 compiles a kernel apart for), from :func:`argument_key` and the call:

- a tensor: its dtype, and whether its ``data_ptr()`` is a multiple of 16 (``tt.divisibility``);
- an int: the constant 1 (Triton makes it a constexpr), else its type by magnitude (i32 in
  ``[-2**31, 2**31)``, i64 in ``[-2**63, 2**63)``, u64 up to ``2**64 - 1``) and whether it is a
  multiple of 16;
- a float (always fp32), a bool (u1), ``None`` (a constexpr): the type alone;
- the keyword arguments (constexprs and options such as ``num_warps``): names, types and values,
  standing in the key as one :class:`LaunchOptions` object per distinct set (:func:`launch_options`);
- the current device, and the kernel's and the runtime's ``debug`` and instrumentation mode (the
  options ``JITFunction.run`` adds).

That is what Triton's own in-memory cache keys on (the specialization and the raw options), so a
kernel found here is the one ``kernel[grid]`` would launch.

Per call, the key's keyword part is the cost a launch site can move out of the loop: a site whose
keyword arguments follow from a cached plan makes their :class:`LaunchOptions` with the plan and
calls ``launcher.launch(options, grid, *args)``; ``launcher(grid, *args, **kwargs)`` finds the
options of its keyword arguments every call.

A call site that keys its launches itself goes one step further: after a launch, :meth:`CachedLauncher.direct`
hands it the signature's :class:`DirectLaunch`, which it keeps under its own key (built from what it
reads anyway: shapes, strides, dtypes, the plan); a repeated call then launches through
:func:`direct_stream` and the compiled kernel's launcher with no signature key at all. That key is the
site's to get right: it must change whenever one of the above would (see :class:`DirectLaunch`).

Where the plain ``kernel[grid](...)`` runs instead, every call: another Triton release than 3.6
(whose ``run`` this repeats); a kernel that is not a ``JITFunction`` with the stock ``run`` (under
``TRITON_INTERPRET=1`` it is an ``InterpretedFunction``); parameters annotated or marked
``do_not_specialize``; pre-run hooks or launch enter/exit hooks (a profiler such as proton); a
grid that is not a tuple (a callable); an argument of another type than those above (a tensor
subclass, a numpy scalar); positional arguments reaching a constexpr parameter, or a keyword
argument naming a runtime one; unhashable keyword values; a global the kernel reads that has
changed since the compile (Triton raises then).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import triton

#: The Triton release whose ``JITFunction.run`` and launcher arguments the fast path repeats.
FAST_PATH_TRITON_RELEASE = "3.6"

# Codes of an int argument by Triton's specialization (ints, so that no code equals another kind's
# marker; the literals in argument_key are these ranges: i32 [-2**31, 2**31), i64 [-2**63, 2**63), u64).
_INT_CODES = {("i32", ""): 0, ("i32", "D"): 1, ("i64", ""): 2, ("i64", "D"): 3, ("u64", ""): 4, ("u64", "D"): 5}
_ONE = 6  # Triton passes the int 1 as a constexpr
_MISSING = object()
#: Signatures kept a kernel before the cache starts over (a bound; a decode loop uses a handful).
CACHE_LIMIT = 1024


#: The code of each int argument seen (shapes, strides and counts repeat call after call): one dict
#: lookup in place of the range tests. Bounded: a value never seen again only costs its entry.
_INT_CODE_OF: dict[int, int] = {}
INT_CODES_LIMIT = 4096


def _int_code(arg: int) -> int | None:
    """The specialization code of an int (see :data:`_INT_CODES`), or None for one Triton refuses."""
    if -0x80000000 <= arg <= 0x7FFFFFFF:
        code = _ONE if arg == 1 else 0 if arg & 15 else 1
    elif -0x8000000000000000 <= arg <= 0x7FFFFFFFFFFFFFFF:
        code = 2 if arg & 15 else 3
    elif 0 < arg <= 0xFFFFFFFFFFFFFFFF:
        code = 4 if arg & 15 else 5
    else:
        return None  # Triton refuses it; let it say so
    if len(_INT_CODE_OF) >= INT_CODES_LIMIT:
        _INT_CODE_OF.clear()
    _INT_CODE_OF[arg] = code
    return code


def argument_key(args) -> tuple | None:
    """The specialization signature of positional runtime arguments, or None when one has a type the
    fast path does not know (the plain launch then specializes it).

    A tensor gives two entries (its dtype, then whether it is 16-byte aligned); every other argument
    one, never a dtype, so the entries of different argument lists cannot line up alike.
    """
    key = []
    append = key.append
    tensor = torch.Tensor
    codes = _INT_CODE_OF
    for arg in args:
        cls = arg.__class__
        if cls is int:  # exactly int: a bool is u1, not the int 1
            code = codes.get(arg)
            if code is None:
                code = _int_code(arg)
                if code is None:
                    return None
            append(code)
        elif cls is tensor:
            append(arg.dtype)
            append(arg.data_ptr() & 15 == 0)
        elif cls is float:
            append(float)
        elif cls is bool:
            append(bool)
        elif arg is None:
            append(None)
        else:
            return None
    return tuple(key)


def _plain_only_reason(fn) -> str | None:
    """Why ``fn`` always takes the plain launch (None when the fast path may serve it)."""
    from triton.runtime.jit import JITFunction

    if not triton.__version__.startswith(FAST_PATH_TRITON_RELEASE + "."):
        return f"triton {triton.__version__} (the fast path repeats Triton {FAST_PATH_TRITON_RELEASE}'s launch)"
    if not isinstance(fn, JITFunction) or type(fn).run is not JITFunction.run:
        return f"{type(fn).__name__} (the interpreter, or another launch than JITFunction.run)"
    for param in fn.params:
        if param.is_constexpr:
            continue
        if param.annotation or param.do_not_specialize or param.do_not_specialize_on_alignment:
            return f"parameter {param.name} is annotated or not specialized"
    return None


class LaunchOptions:
    """The keyword arguments of a launch (constexprs, and options such as ``num_warps``), fixed:
    ``launcher.launch(options, grid, *args)`` launches as ``launcher(grid, *args, **options.kwargs)``.

    Made by :func:`launch_options`, which hands out one object per distinct set of keyword arguments
    (their names in order, each value's type and the value: what tells launches apart for Triton), so
    the launcher's cache keys on the object itself. A call site that makes its options once (per
    launch plan) then pays nothing per call for its keyword arguments: no dict to build, no tuples of
    names, types and values, and no hashing of the values (a ``tl.dtype`` hashes in Python).
    """

    __slots__ = ("kwargs", "cacheable")

    def __init__(self, kwargs: dict, cacheable: bool):
        self.kwargs = MappingProxyType(dict(kwargs))  # read-only: the cache keys on what it was made with
        #: False when a value is unhashable: such launches always take the plain ``kernel[grid]``.
        self.cacheable = cacheable

    def __repr__(self):
        return f"LaunchOptions({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


_OPTIONS: dict = {}
#: Distinct keyword-argument sets kept before :func:`launch_options` starts over. Options made before
#: then stay valid (the launcher's cache holds them); an equal set made after is a new object, whose
#: first launch is the plain one again.
OPTIONS_LIMIT = 1024


def launch_options(**kwargs) -> LaunchOptions:
    """The :class:`LaunchOptions` of these keyword arguments: the same object for equal ones."""
    content = (tuple(kwargs), tuple(map(type, kwargs.values())), tuple(kwargs.values()))
    try:
        options = _OPTIONS.get(content)
    except TypeError:  # an unhashable value
        return LaunchOptions(kwargs, False)
    if options is None:
        if len(_OPTIONS) >= OPTIONS_LIMIT:
            _OPTIONS.clear()
        options = _OPTIONS[content] = LaunchOptions(kwargs, True)
    return options


class CachedLauncher:
    """``launcher(grid, *args, **kwargs)`` launches ``fn`` as ``fn[grid](*args, **kwargs)`` does, with
    the compiled kernel of a signature seen before launched directly (see the module docstring);
    ``launcher.launch(options, grid, *args)`` does the same with the keyword arguments made once, as
    :class:`LaunchOptions`."""

    def __init__(self, fn):
        self.fn = fn
        self.plain_only = _plain_only_reason(fn)
        self._kernels: dict = {}
        if self.plain_only is None:
            params = fn.params
            constexpr = [p.num for p in params if p.is_constexpr]
            #: Positional arguments beyond this reach a constexpr parameter, which the key would not tell apart.
            self._runtime_prefix = constexpr[0] if constexpr else len(params)
            self._runtime_names = frozenset(p.name for p in params if not p.is_constexpr)
            from triton import knobs
            from triton.runtime.driver import driver
            #: The launch as it was when this launcher was made: a tool that patches it later (a
            #: profiler, a test's stand-in) must see every launch, which only the plain path makes.
            self._class_run, self._own_run = type(fn).run, fn.__dict__.get("run")

            self._knobs, self._driver = knobs, driver

    def __call__(self, grid, *args, **kwargs):
        if self.plain_only is not None:
            return self.fn[grid](*args, **kwargs)
        return self._launch(launch_options(**kwargs), kwargs, grid, args)

    def launch(self, options: LaunchOptions, grid, *args):
        """``self(grid, *args, **options.kwargs)``."""
        if self.plain_only is not None:
            return self.fn[grid](*args, **options.kwargs)
        return self._launch(options, options.kwargs, grid, args)

    def _launch(self, options, kwargs, grid, args):
        """The launch of ``args`` and ``kwargs``, whose options are ``options``; ``kwargs`` is what a
        plain launch is handed (the caller's own keyword arguments)."""
        fn, knobs = self.fn, self._knobs
        runtime = knobs.runtime
        if type(fn).run is not self._class_run or fn.__dict__.get("run") is not self._own_run:
            return fn[grid](*args, **kwargs)  # the launch was patched after this launcher was made
        # Triton 3.6 keeps the launch hooks as chains of callables, usually empty: any callable in one
        # (a profiler's) must see the launch, which only the plain path reports.
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if (fn.pre_run_hooks or grid.__class__ is not tuple or not options.cacheable
                or (enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True))):
            return fn[grid](*args, **kwargs)
        positional = argument_key(args)
        if positional is None:
            return fn[grid](*args, **kwargs)
        active = self._driver.active
        device = active.get_current_device()
        # ``options`` stands for the keyword arguments' names, types and values (launch_options makes
        # one object per distinct set), and hashes as an object: by identity, in C.
        key = (device, positional, options, fn.debug, runtime.debug, knobs.compilation.instrumentation_mode)
        entry = self._kernels.get(key)
        if entry is None:
            return self._first_launch(key, grid, args, kwargs)
        if entry is False:
            return fn[grid](*args, **kwargs)
        kernel, run, function, metadata, tail = entry
        for (name, _), (value, namespace) in fn.used_global_vals.items():
            if namespace.get(name, _MISSING) != value:
                return fn[grid](*args, **kwargs)  # Triton raises: the global changed since the compile
        size = len(grid)
        if size == 3:
            grid_0, grid_1, grid_2 = grid
        else:
            grid_0, grid_1, grid_2 = grid[0], grid[1] if size > 1 else 1, 1
        run(grid_0, grid_1, grid_2, active.get_current_stream(device), function, metadata, None, None, None,
            *args, *tail)
        return kernel

    def _first_launch(self, key, grid, args, kwargs):
        """The plain launch, and what later calls of ``key`` need: the kernel it launched, its launcher,
        function and packed metadata, and the parameters after the positional ones (defaults filled
        in); or False for "plain again"."""
        from triton.compiler import CompiledKernel

        kernel = self.fn[grid](*args, **kwargs)
        entry = False
        if (isinstance(kernel, CompiledKernel) and kernel.function is not None and len(args) <= self._runtime_prefix
                and self._runtime_names.isdisjoint(kwargs)):
            tail = []
            for param in self.fn.params[len(args):]:
                value = kwargs.get(param.name, _MISSING)
                if value is _MISSING:
                    value = param.default
                tail.append(value)
            # The launcher itself (``kernel.run``, a property) is set once its handles are loaded, which
            # the plain launch did.
            entry = (kernel, kernel.run, kernel.function, kernel.packed_metadata, tuple(tail))
        if len(self._kernels) >= CACHE_LIMIT:
            self._kernels.clear()
        self._kernels[key] = entry
        return kernel

    def direct(self, options: LaunchOptions, args) -> DirectLaunch | None:
        """The :class:`DirectLaunch` of the signature of ``launch(options, grid, *args)``, once a launch of it
        has found its compiled kernel; None when that signature takes the plain launch (or was not
        launched yet, or the cache started over since)."""
        if self.plain_only is not None or not options.cacheable:
            return None
        positional = argument_key(args)
        if positional is None:
            return None
        fn, knobs = self.fn, self._knobs
        device = self._driver.active.get_current_device()
        modes = (fn.debug, knobs.runtime.debug, knobs.compilation.instrumentation_mode)
        entry = self._kernels.get((device, positional, options, *modes))
        if not entry:
            return None
        kernel, run, function, metadata, tail = entry
        return DirectLaunch(self, device, modes, kernel, run, function, metadata, tail)


class DirectLaunch:
    """One signature's compiled kernel, to be launched by a call site that keeps it under a key of its own.

    ``run(grid_0, grid_1, grid_2, stream, function, metadata, None, None, None, *args, *tail)`` is the
    launch :class:`CachedLauncher` makes for a repeated signature, with ``stream`` from
    :func:`direct_stream` (None there: launch through the launcher instead). Nothing here reads the
    arguments, so the site's key must tell apart every signature Triton compiles apart: each tensor's
    dtype and 16-byte alignment, each int's code (the constant 1, i32/i64/u64, multiple of 16), the type
    of every other argument, and the keyword options (see the module docstring); exact values of the
    ints and strides are one way. The device and the debug and instrumentation modes are checked by
    :func:`direct_stream`.
    """

    __slots__ = ("launcher", "device", "modes", "kernel", "run", "function", "metadata", "tail")

    def __init__(self, launcher, device, modes, kernel, run, function, metadata, tail):
        self.launcher, self.device, self.modes = launcher, device, modes
        self.kernel, self.run, self.function, self.metadata, self.tail = kernel, run, function, metadata, tail


def direct_stream(*launches: DirectLaunch):
    """The current stream (Triton's: inside a CUDA-graph capture, the capturing one) when every launch
    of ``launches`` may go straight to its compiled kernel's launcher now, else None: whatever would
    send :class:`CachedLauncher` to the plain launch (a launch patched since the launcher was made,
    pre-run or launch hooks, a changed global of the kernel, a launcher set to ``plain_only`` since), or
    to another compiled kernel (another current device, debug or instrumentation mode), sends the caller
    back to the launcher."""
    first = launches[0].launcher
    knobs = first._knobs
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if (enter is not None and getattr(enter, "calls", True)) or (leave is not None and getattr(leave, "calls", True)):
        return None
    runtime_debug, instrumentation = runtime.debug, knobs.compilation.instrumentation_mode
    active = first._driver.active
    device = active.get_current_device()
    for direct in launches:
        launcher = direct.launcher
        fn = launcher.fn
        if (launcher.plain_only is not None or type(fn).run is not launcher._class_run
                or fn.__dict__.get("run") is not launcher._own_run or fn.pre_run_hooks or direct.device != device
                or direct.modes != (fn.debug, runtime_debug, instrumentation)):
            return None
        for (name, _), (value, namespace) in fn.used_global_vals.items():
            if namespace.get(name, _MISSING) != value:
                return None
    return active.get_current_stream(device)
