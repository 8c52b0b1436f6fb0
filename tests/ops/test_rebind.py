"""`mom.ops.triton.rebind`: a library's code rebound to launch its autotuned / heuristic Triton kernels directly.

A small library is built here from source (an autotuned, heuristic kernel, the function launching it, an autograd
Function with a ``custom_fwd`` forward). On CPU: the rebound copy leaves the library alone and passes the kernel
exactly what Triton's autotuner and heuristics pass its JIT function; in Triton's interpreter (a subprocess) both
compute the same. mamba-ssm's own kernels, rebound, are compared on a GPU in tests/ops/test_cuda.py."""

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

triton = pytest.importorskip("triton")
from mom.ops.triton import rebind  # noqa: E402

LIBRARY = textwrap.dedent('''
    import torch
    import triton
    import triton.language as tl

    def zero(names):
        return lambda nargs: [nargs[name].zero_() for name in names]

    @triton.autotune(configs=[triton.Config({"BLOCK": 4}, num_warps=1),
                              triton.Config({"BLOCK": 8}, num_warps=2, pre_hook=zero(["y"]))], key=["n"])
    @triton.heuristics({"EVEN": lambda args: args["n"] % args["BLOCK"] == 0})
    @triton.jit
    def scale_kernel(x, y, n, alpha, SCALE: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr,
                     OFFSET: tl.constexpr = 1):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + i, tl.load(x + i, mask=i < n) * SCALE * alpha + OFFSET + EVEN, mask=i < n)

    def scale(x, alpha):
        y = torch.empty_like(x)
        scale_kernel[lambda META: (triton.cdiv(x.numel(), META["BLOCK"]),)](x, y, x.numel(), alpha, SCALE=2)
        return y

    class ScaleFn(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type="cuda")
        def forward(ctx, x):
            return scale(x, 0.5)

        @staticmethod
        def backward(ctx, g):
            return scale(g.contiguous(), 0.5)

    def scale_fn(x):
        return ScaleFn.apply(x)
''')


def library(folder) -> types.ModuleType:
    """A fresh copy of the library, as module ``fakelib.kernels`` (Triton reads a kernel's source from its file)."""
    path = os.path.join(folder, "fakelib_kernels.py")
    with open(path, "w") as f:
        f.write(LIBRARY)
    spec = importlib.util.spec_from_file_location("fakelib.kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tune(module, n: int, config_index: int) -> None:
    """Stand in for Triton's tuning (it times configs on a GPU): the autotuner's cache holds this key's config."""
    kernel = module.scale_kernel
    kernel.cache[(n, str(torch.float32), str(torch.float32))] = kernel.configs[config_index]


def triton_call(module, monkeypatch) -> list:
    """Record what Triton's autotuner and heuristics pass the JIT function, without running it."""
    calls = []
    jit = module.scale_kernel.fn.fn
    monkeypatch.setattr(jit, "run", lambda *args, grid, warmup, **kwargs: calls.append((args, grid, kwargs)))
    return calls


def direct_calls(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(rebind, "launch_values",
                        lambda kernel, grid, values, options: calls.append((kernel, grid, values, options)))
    return calls


def _same(a: tuple, b: tuple) -> bool:
    """Equal argument lists, tensors by shape and dtype (each call allocates its own output)."""
    return len(a) == len(b) and all((u.shape, u.dtype) == (v.shape, v.dtype) if isinstance(u, torch.Tensor) else u == v
                                    for u, v in zip(a, b))


@pytest.mark.parametrize("n, config", [(16, 0), (16, 1), (12, 1)])
def test_a_tuned_key_launches_what_tritons_path_launches(tmp_path, monkeypatch, n, config):
    lib = library(tmp_path)
    tune(lib, n, config)
    x = torch.arange(float(n))
    want, got = triton_call(lib, monkeypatch), direct_calls(monkeypatch)
    lib.scale(x, 0.5)
    fast = rebind.rebound(lib.scale, "fakelib")
    fast(x, 0.5)
    (args, grid, kwargs), (kernel, direct_grid, values, options) = want[0], got[0]
    jit = lib.scale_kernel.fn.fn
    params = inspect.signature(jit.fn).parameters
    bound = inspect.signature(jit.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    assert kernel is jit and values[0] is x and _same(values, tuple(bound.arguments.values()))
    assert options == {k: v for k, v in kwargs.items() if k not in params}
    assert options["num_warps"] == (1, 2)[config] and values[6] == (4, 8)[config] and values[5] == (n % values[6] == 0)
    assert direct_grid == (*grid(bound.arguments), 1, 1)
    assert fast.__globals__["scale_kernel"].best_config is lib.scale_kernel.configs[config]


def test_the_library_is_left_alone_and_callees_are_rebound(tmp_path):
    lib = library(tmp_path)
    fast = rebind.rebound(lib.scale_fn, "fakelib")
    assert isinstance(lib.scale_kernel, triton.runtime.autotuner.Autotuner)
    assert lib.scale_fn.__globals__ is lib.__dict__ and fast.__globals__ is not lib.__dict__
    fn_class = fast.__globals__["ScaleFn"]
    assert issubclass(fn_class, lib.ScaleFn) and fn_class is not lib.ScaleFn
    forward = fn_class.__dict__["forward"].__func__  # custom_fwd's wrapper: its wrapped forward is rebound too
    inner = forward.__wrapped__
    assert inner is not lib.ScaleFn.__dict__["forward"].__func__.__wrapped__
    assert any(c.cell_contents is inner for c in forward.__closure__)
    scale = inner.__globals__["scale"]
    assert scale is not lib.scale and isinstance(scale.__globals__["scale_kernel"], rebind.DirectKernel)
    assert fn_class.__dict__["backward"].__func__.__globals__["scale"] is scale  # one copy per library object
    assert rebind.rebound(len, "fakelib") is len  # not the library's: itself


def test_an_untuned_key_goes_through_tritons_autotuner(tmp_path, monkeypatch):
    lib = library(tmp_path)
    tuned = []

    def autotune(*args, grid, warmup, **kwargs):  # what Triton's autotuner would do: tune, store, launch
        tuned.append(args[2])
        lib.scale_kernel.best_config = lib.scale_kernel.configs[1]
        tune(lib, args[2], 1)

    monkeypatch.setattr(lib.scale_kernel, "run", autotune)
    direct = direct_calls(monkeypatch)
    fast = rebind.rebound(lib.scale, "fakelib")
    fast(torch.zeros(12), 0.5)
    assert tuned == [12] and direct == []
    assert fast.__globals__["scale_kernel"].best_config is lib.scale_kernel.configs[1]
    fast(torch.zeros(12), 0.5)  # tuned now
    assert tuned == [12] and len(direct) == 1


def test_a_configs_pre_hook_runs_before_the_launch(tmp_path, monkeypatch):
    lib = library(tmp_path)
    tune(lib, 16, 1)  # the config whose pre-hook zeroes y
    seen = []
    monkeypatch.setattr(rebind, "launch_values", lambda kernel, grid, values, options: seen.append(values[1].clone()))
    monkeypatch.setattr(torch, "empty_like", lambda x: torch.full_like(x, 7.0))  # y as the launch finds it, unhooked
    rebind.rebound(lib.scale, "fakelib")(torch.ones(16), 0.5)
    assert torch.equal(seen[0], torch.zeros(16))


def test_launched_is_the_copy_made_once_unless_switched_off(monkeypatch):
    """`launched`: what `mom.ops.ssd` calls mamba-ssm's scans through. A stand-in function of mamba-ssm's package."""

    def library_scan(x):
        return x * 2

    library_scan.__module__ = "mamba_ssm.ops.triton.ssd_combined"
    copy = rebind.launched(library_scan)
    assert copy is not library_scan and copy.__code__ is library_scan.__code__ and copy(3) == 6
    assert rebind.launched(library_scan) is copy
    monkeypatch.setenv(rebind.DIRECT_LAUNCH_ENV, "0")
    assert rebind.launched(library_scan) is library_scan


def test_rebound_code_computes_what_the_library_computes_in_the_interpreter(tmp_path):
    script = textwrap.dedent('''
        import torch
        from test_rebind import library, tune
        from mom.ops.triton import rebind
        for n, config in ((16, 0), (16, 1), (12, 1), (13, 0)):
            lib = library(FOLDER)
            tune(lib, n, config)
            x = torch.randn(n, requires_grad=True)
            want = lib.scale_fn(x)
            want.backward(torch.arange(float(n)))
            want_grad, x.grad = x.grad, None
            got = rebind.rebound(lib.scale_fn, "fakelib")(x)
            got.backward(torch.arange(float(n)))
            assert torch.equal(got, want) and torch.equal(x.grad, want_grad), (n, config)
            assert torch.equal(want, x.detach() * 1.0 + 1 + (n % (4, 8)[config] == 0))
        print("ok")
    ''')
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    script = f"FOLDER = {str(tmp_path)!r}\n" + script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
