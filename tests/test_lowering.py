"""The lowering (ternet/lowering.py): which nodes fuse, and the arena's liveness sharing."""
import numpy as np
import pytest

from ternet.format import read_model
from ternet.kernels import cpu
from ternet.lowering import arena_views, lower
from tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return read_model(make_tiny_model(tmp_path_factory.mktemp("lw") / "tiny.safetensors"))


def test_plain_kernels_lower_one_step_per_node(tiny):
    program = lower(tiny, "plain")
    assert list(program.names) == [n.name for n in tiny.graph]
    assert [s.op for s in program.steps] == [n.op for n in tiny.graph]


@pytest.mark.skipif(not cpu.has_avx2(), reason="the fused epilogue needs a VNNI/AVX2 kernel")
def test_residual_add_fuses_into_the_projection_before_it(tiny):
    program = lower(tiny, "avx2")
    assert "b1.project+b1.add" in program.names and "b1.add" not in program.names
    fused = program.steps[program.names.index("b1.project+b1.add")]
    assert fused.op == "pointwise+add"
    slot = {n.name: i + 1 for i, n in enumerate(tiny.graph)}
    assert (fused.src, fused.res, fused.dst) == (slot["b1.dw"], slot["b0.project"], slot["b1.add"])


@pytest.mark.parametrize("n", [1, 3])
def test_arena_shares_buffers_and_never_overwrites_a_live_value(tiny, n):
    program = lower(tiny, "plain")
    views = arena_views(program, n)
    graph = program.graph
    bases = {i + 1: views[i + 1].base for i in range(len(graph) - 1)}
    assert len({id(b) for b in bases.values()}) < len(bases)       # buffers are reused
    for i, node in enumerate(graph[:-1]):      # no value still to be read shares node i's buffer
        for j, other in enumerate(graph[:i]):
            if program.last_use.get(other.name, -1) >= i:
                assert bases[i + 1] is not bases[j + 1], (node.name, other.name)
    assert views[program.scratch_slot].dtype == np.uint8
