"""A library's Python code that launches Triton kernels, rebound to launch them through `mom.ops.triton.launcher`.

mamba-ssm's Mamba-2 scan (``mamba_split_conv1d_scan_combined``: conv, SSD scan and gated norm) launches about twenty
autotuned Triton kernels in a layer's training step (`mom.ops.ssd` calls it rebound). Each launch goes
through Triton's ``Autotuner.run`` (the arguments gathered into dicts, the tuning key, the tuned config) and
``JITFunction.run`` (the arguments bound and specialised, the compiled kernel looked up): host time that left a
Mamba-2 layer bound by the host at (8, 2048, 1024) (docs/performance.md). Every block's add + RMSNorm
(``layer_norm_fn``, `mom.model.modeling.add_norm`) is called rebound too: two autotuned launches per block and step.

`rebound(fn, package)` is a copy of the library function ``fn`` whose global names refer, where the original's refer
to an autotuned or heuristic Triton kernel, to a `DirectKernel` around it, and where they refer to the library's own
functions or autograd Functions, to rebound copies of those (recursively, closures included: ``custom_fwd``
wrappers). The same code calls the same kernels with the same configs; only the launch path changes. The library
itself is left alone: its own callers (a dense mamba-ssm model in the same process) keep Triton's launches.

`launched(fn)` is what callers use: ``fn``'s copy, made once, or ``fn`` itself under ``MOM_DIRECT_LAUNCH=0``.

`DirectKernel` does per call what Triton does for a key it has tuned: the key from the key arguments and the
tensors' dtypes, the config from the autotuner's cache, the config's pre-hook (a buffer zeroed), the heuristics'
values; then `launcher.launch_values`, which calls the JIT once per specialisation and the compiled kernel's
launcher after that. A key not tuned yet, or a kernel of a form it does not know, goes through Triton as before.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from collections.abc import Callable

import torch

from mom.ops.triton.launcher import launch_values

DIRECT_LAUNCH_ENV = "MOM_DIRECT_LAUNCH"  # "0": a library's functions as it ships them (Triton's own launches)


def launched(fn: Callable, package: str = "mamba_ssm") -> Callable:
    """The library function ``fn`` as mom calls it: its rebound copy (`rebound`, made once), or ``fn`` itself under
    ``MOM_DIRECT_LAUNCH=0``."""
    if os.environ.get(DIRECT_LAUNCH_ENV, "1").lower() in ("0", "false", "no"):
        return fn
    return _rebound_once(fn, package)


@functools.cache
def _rebound_once(fn: Callable, package: str) -> Callable:
    return rebound(fn, package)


@functools.cache
def _triton_kinds() -> tuple[type, type, type] | None:
    """Triton's Autotuner, Heuristics and JITFunction classes, or None without Triton (looked up once)."""
    try:
        from triton.runtime.autotuner import Autotuner, Heuristics
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    return Autotuner, Heuristics, JITFunction


class DirectKernel:
    """An autotuned and / or heuristic Triton kernel (``triton.autotune`` / ``triton.heuristics`` over a
    ``triton.jit`` function), called as the library calls it (``kernel[grid](*args, **kwargs)``) and launched through
    `launch_values` once its key is tuned. Other attributes (``configs``, ``best_config`` after a launch) read as the
    wrapped kernel's."""

    def __init__(self, kernel) -> None:
        autotuner_type, heuristics_type, jit_type = _triton_kinds()
        self.kernel = kernel
        self.layers = []  # the decorators, outermost first
        fn = kernel
        while not isinstance(fn, jit_type):
            if not isinstance(fn, (autotuner_type, heuristics_type)):
                raise TypeError(f"DirectKernel: {type(fn).__name__} is not an autotuner, heuristics or JIT function")
            self.layers.append(fn)
            fn = fn.fn
        self.jit = fn
        self._autotuner_type = autotuner_type
        self.names = tuple(fn.arg_names)  # every parameter, in order
        self._params = frozenset(self.names)
        self.defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
                         if p.default is not inspect.Parameter.empty}
        self._config_parts: dict[int, tuple[object, dict, dict]] = {}  # id(config) -> (config, constexprs, options)
        self.best_config = None

    def __getattr__(self, name: str):
        if name == "kernel":  # not set yet (during __init__)
            raise AttributeError(name)
        return getattr(self.kernel, name)

    def __getitem__(self, grid) -> Callable[..., None]:
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args: tuple, kwargs: dict) -> None:
        named = dict(zip(self.names, args))  # every argument by name, in the call's order (Triton's key order)
        named.update(kwargs)
        options = {k: v for k, v in kwargs.items() if k not in self._params}  # num_warps passed by the caller
        for layer in self.layers:
            if isinstance(layer, self._autotuner_type):
                config = self._tuned_config(layer, named)
                if config is None:  # not tuned yet: Triton tunes it (and launches)
                    self.kernel[grid](*args, **kwargs)
                    self.best_config = layer.best_config
                    return
                self.best_config = config
                constexprs, config_options = self._parts(config)
                named.update(constexprs)
                named.update(config_options)  # what a pre-hook or a grid may read, as Triton passes them
                options.update(config_options)
                if config.pre_hook is not None:
                    config.pre_hook(named)
            else:  # heuristics: each value from the arguments and the values before it
                for name, heuristic in layer.values.items():
                    named[name] = heuristic(named)
        defaults = self.defaults
        values = tuple([named[name] if name in named else defaults[name] for name in self.names])
        g = grid(named) if callable(grid) else grid
        launch_values(self.jit, (*g, *(1,) * (3 - len(g))), values, options)

    def _parts(self, config) -> tuple[dict, dict]:
        """A config's kernel parameters (its constexprs) and Triton's options (``num_warps``, ...), split once."""
        known = self._config_parts.get(id(config))
        if known is None:
            every = config.all_kwargs()
            known = self._config_parts[id(config)] = (
                config, {k: v for k, v in every.items() if k in self._params},
                {k: v for k, v in every.items() if k not in self._params})
        return known[1], known[2]

    def _tuned_config(self, autotuner, named: dict):
        """The config Triton's autotuner tuned for these arguments' key (its ``keys`` values, then the dtypes of the
        tensors among the arguments in the call's order), or None if it has not tuned it yet."""
        if len(autotuner.configs) == 1:
            return autotuner.configs[0]
        key = [named[k] for k in autotuner.keys if k in named]
        params = self._params
        key += [str(v.dtype) for k, v in named.items() if type(v) is not int and hasattr(v, "dtype") and k in params]
        return autotuner.cache.get(tuple(key))


def rebound(fn: Callable, package: str) -> Callable:
    """A copy of ``fn`` (a function or an autograd Function class of ``package``) launching the Triton kernels it
    reaches through `DirectKernel`s; ``fn`` itself where Triton is not installed."""
    if _triton_kinds() is None:
        return fn
    return _Rebinder(package).rebind(fn)


class _Rebinder:
    """One rebinding: each library object copied once (shared callees, recursion), one copy of each module's
    globals shared by the functions copied from it."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.copies: dict[int, tuple[object, object]] = {}  # id(original) -> (original, copy): originals kept alive
        self.namespaces: dict[int, dict] = {}

    def rebind(self, obj):
        known = self.copies.get(id(obj))
        if known is not None:
            return known[1]
        autotuner_type, heuristics_type, _ = _triton_kinds()
        if isinstance(obj, (autotuner_type, heuristics_type)):
            try:
                copy = DirectKernel(obj)
            except TypeError:  # a form this does not know: Triton launches it
                copy = obj
        elif isinstance(obj, types.FunctionType) and self._ours(obj):
            copy = self._function(obj)
        elif isinstance(obj, type) and issubclass(obj, torch.autograd.Function) and self._ours(obj):
            copy = self._function_class(obj)
        else:
            copy = obj
        self.copies[id(obj)] = (obj, copy)
        return copy

    def _ours(self, obj) -> bool:
        module = getattr(obj, "__module__", None) or ""
        return module == self.package or module.startswith(self.package + ".")

    def _function(self, fn: types.FunctionType) -> types.FunctionType:
        namespace = self.namespaces.get(id(fn.__globals__))
        if namespace is None:
            namespace = self.namespaces[id(fn.__globals__)] = dict(fn.__globals__)
        closure = None
        if fn.__closure__ is not None:
            closure = tuple(types.CellType() for _ in fn.__closure__)
        copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
        self.copies[id(fn)] = (fn, copy)  # before its callees: a recursive call finds it
        copy.__kwdefaults__, copy.__qualname__, copy.__module__ = fn.__kwdefaults__, fn.__qualname__, fn.__module__
        copy.__dict__.update(fn.__dict__)
        if "__wrapped__" in fn.__dict__:
            copy.__wrapped__ = self.rebind(fn.__wrapped__)
        for name in _global_names(fn.__code__):
            if name in fn.__globals__:
                namespace[name] = self.rebind(fn.__globals__[name])
        for old, new in zip(fn.__closure__ or (), closure or ()):
            try:
                new.cell_contents = self.rebind(old.cell_contents)
            except ValueError:  # an empty cell (a name not bound yet where the function was made)
                pass
        return copy

    def _function_class(self, cls: type) -> type:
        body = {"__module__": __name__, "__doc__": cls.__doc__}
        for name, attr in vars(cls).items():
            if isinstance(attr, staticmethod) and isinstance(attr.__func__, types.FunctionType):
                body[name] = staticmethod(self.rebind(attr.__func__))
        return type(cls.__name__, (cls,), body)


def _global_names(code: types.CodeType) -> set[str]:
    """The names a code object and the code nested in it (lambdas, inner functions) may read as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names
