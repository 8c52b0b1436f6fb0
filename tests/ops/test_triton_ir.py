"""Every Triton kernel of `mom.ops.triton` compiles to Triton IR for an H100 (sm_90), checked on the CPU.

Triton's interpreter (the other CPU tests of these kernels) runs a kernel's Python without type-checking it as the
compiler does: a kernel that passed it failed its first GPU compile (a variable given tiles of two shapes in the two
arms of an ``if`` on a runtime value: docs/performance.md, twenty-eighth session). Here each kernel is launched
through its module's own wrapper on CPU tensors (bf16 where the model runs it so), with the launcher replaced by
Triton's front end for a CUDA target: the arguments' types, the ``constexpr`` flags the wrapper picks and the
kernel's code go through the same type checks as on a GPU, with nothing run. Needs Triton (not its GPU).
"""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from mom.ops.triton import conv_rows, expert_cols, flatcast, gather, launcher  # noqa: E402
from mom.ops.triton.flatcast import Place  # noqa: E402
from mom.ops.triton.gathered_mm import Tiles, gathered_mm  # noqa: E402
from mom.ops.triton.routed_rows import Blocks, ConvStep, routed_rows_linear  # noqa: E402
from mom.ops.triton.state_update import routed_state_update  # noqa: E402


def _triton_ir(kernel, values: tuple, options: dict | None) -> None:
    """Triton's front end on ``kernel`` with the types of ``values`` (every parameter, in order, as
    `mom.ops.triton.launcher.launch_values` takes them): raises Triton's CompilationError where a GPU's compile
    would."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    signature, constexprs = {}, {}
    for param, value in zip(kernel.params, values, strict=True):
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:  # Triton's own type of an argument: "*bf16", "i32", "i64", "fp32", ...
            signature[param.name] = mangle_type(value)
    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    opts = backend.parse_options(dict(options or {}))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    ASTSource(kernel, signature, constexprs).make_ir(target, opts, backend.get_codegen_implementation(opts),
                                                     backend.get_module_map(), context)


@pytest.fixture
def compiled(monkeypatch) -> list[str]:
    """Launches compile to Triton IR instead of running; -> the names of the kernels compiled."""
    names = []

    def compile_only(kernel, grid, values, options=None):
        _triton_ir(kernel, values, options)
        names.append(kernel.__name__)

    monkeypatch.setattr(launcher, "launch_values", compile_only)
    return names


@pytest.mark.parametrize("window, keep, bias, even, i32", list(itertools.product([True, False], repeat=5)))
def test_conv_rows_compiles(window, keep, bias, even, i32, compiled):
    """The conv from rows: with and without the cache's window (its own programs, a runtime branch), keep, bias,
    whole tiles or not, 32- or 64-bit offsets."""
    b, l, f = 2, (conv_rows.TILE_L if even else 37), (conv_rows.TILE_F if even else 100)
    rows = torch.zeros(b * l, 2 * f, dtype=torch.bfloat16)[:, :f]
    weight, bias_ = torch.zeros(f, 4, dtype=torch.bfloat16), torch.zeros(f, dtype=torch.bfloat16) if bias else None
    keep_ = torch.ones(b * l, dtype=torch.bfloat16) if keep else None
    win = torch.zeros(b, f, 4, dtype=torch.bfloat16) if window else None
    conv_rows._launch(rows, torch.arange(b * l), l, weight, bias_, keep_, win, i32=i32)
    assert compiled == ["conv_rows_kernel"]


@pytest.mark.parametrize("gate", ["none", "in x's layout", "in the output's rows"])
def test_the_layout_gather_compiles(gate, compiled):
    x, index = torch.zeros(64, 300, dtype=torch.bfloat16), torch.arange(300).flip(0)
    out = torch.zeros(300, 64, dtype=torch.bfloat16)
    gate_rows = {"none": None, "in x's layout": x.t(), "in the output's rows": out.clone()}[gate]
    gather._gather_t(x.t(), index, out, gate_rows, gate_at_out=gate == "in the output's rows")
    assert compiled == ["gather_t_kernel"]


@pytest.mark.parametrize("m_x, m_dt", [(3, 3), (1, 3), (3, 1)])
def test_split_x_proj_compiles(m_x, m_dt, compiled):
    b, l, rank, n_state = 2, 70, 48, 16
    x_all = torch.zeros(m_x * (rank + 2 * n_state), b * l, dtype=torch.bfloat16)
    dt = torch.zeros(m_dt * rank, b * l, dtype=torch.bfloat16)
    expert_cols._launch(x_all, m_x, torch.zeros(b * l, dtype=torch.int64), rank, dt,
                        torch.zeros(b, 2 * n_state, l, dtype=torch.bfloat16))
    assert compiled == ["split_x_proj_kernel"]


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_the_flat_cast_compiles(src, compiled):
    """As `flatcast.flat_cast` launches it on CUDA tensors (on CPU tensors it runs PyTorch's ops)."""
    tensors = [torch.zeros(5, 7, dtype=src), torch.zeros(300, dtype=src)]
    places = (Place(0, 35, 35), Place(40, 300, 300))
    table = flatcast._table(tuple(t.data_ptr() for t in tensors), (35, 300), places, torch.device("cpu"))
    launcher.launch(flatcast._kernel(), (1, 2, 1), (table, torch.zeros(340, dtype=torch.bfloat16)),
                    SRC=getattr(triton.language, flatcast._TRITON_DTYPES[src]), BLOCK=flatcast.BLOCK)
    assert compiled == ["flat_cast_kernel"]


@pytest.mark.parametrize("bias, conv", [(True, True), (False, False), (True, False)])
def test_the_decode_steps_routed_rows_compile(bias, conv, compiled):
    n_in, n_out, rows = 64, 96, 3
    x = torch.zeros(rows, n_in, dtype=torch.bfloat16)
    ws = [torch.zeros(n_out, n_in, dtype=torch.bfloat16) for _ in range(3)]
    bs = [torch.zeros(n_out, dtype=torch.bfloat16) for _ in range(3)] if bias else None
    step = ConvStep(torch.zeros(rows, 32, 4, dtype=torch.bfloat16), torch.zeros(32, 4, dtype=torch.bfloat16),
                    None) if conv else None
    routed_rows_linear(x, ws, bs, torch.zeros(rows, dtype=torch.int64), use_kernel=True, blocks=Blocks(16),
                       conv=step)
    assert compiled == ["routed_rows_kernel"]


@pytest.mark.parametrize("z", [True, False])
def test_the_decode_steps_state_update_compiles(z, compiled):
    rows, di, n, r = 3, 64, 16, 48
    routed_state_update(torch.zeros(rows, di, n), torch.zeros(rows, di, dtype=torch.bfloat16),
                        torch.zeros(rows, r, dtype=torch.bfloat16),
                        [torch.zeros(di, r, dtype=torch.bfloat16) for _ in range(3)],
                        [torch.zeros(di, dtype=torch.bfloat16) for _ in range(3)], torch.zeros(rows, dtype=torch.int64),
                        torch.zeros(di, n), torch.zeros(rows, n, dtype=torch.bfloat16),
                        torch.zeros(rows, n, dtype=torch.bfloat16), torch.zeros(di),
                        torch.zeros(rows, di, dtype=torch.bfloat16) if z else None, use_kernel=True)
    assert compiled == ["state_update_kernel"]


@pytest.mark.parametrize("gather_rows, scatter_rows, bias", [(False, False, True), (True, False, False),
                                                             (False, True, True), (True, True, False)])
def test_the_gathered_grouped_gemm_compiles(gather_rows, scatter_rows, bias, compiled):
    n, K, O = 100, 64, 48
    a, w = torch.zeros(n, K, dtype=torch.bfloat16), torch.zeros(3, O, K, dtype=torch.bfloat16).transpose(1, 2)
    perm = torch.arange(n).flip(0)
    gathered_mm(a, w, torch.tensor([30, 60, 100], dtype=torch.int32),
                torch.zeros(3, O, dtype=torch.bfloat16) if bias else None, perm if gather_rows else None,
                perm if scatter_rows else None, tiles=Tiles(m=64, n=64, k=32, group=2, warps=4, stages=3),
                use_kernel=True)
    assert compiled == ["gathered_mm_kernel"]
