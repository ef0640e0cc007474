"""bench/kernel_floor.py: its floor model counts what the reference primitives really compute."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from relprop import ops

_PATH = Path(__file__).resolve().parents[1] / "bench" / "kernel_floor.py"
_spec = importlib.util.spec_from_file_location("kernel_floor", _PATH)
kernel_floor = sys.modules["kernel_floor"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_floor)

SPECS = [("conv 3x3", (5, 7, 3, 1, 1, 9)), ("conv 1x1 s2", (6, 4, 1, 2, 0, 8)),
         ("conv 5x5 s2", (3, 4, 5, 2, 2, 11)), ("linear", (13, 6, None, None, None, None))]


@pytest.mark.parametrize("primitive", kernel_floor.PRIMITIVES)
@pytest.mark.parametrize("name,spec", SPECS, ids=[s[0] for s in SPECS])
def test_cost_matches_what_the_reference_computes(name, spec, primitive):
    """FLOPs = torch's FlopCounterMode count of the reference call (the split products as one
    concatenated conv / linear); bytes >= the outputs the call returns, in the layer's dtype."""
    layer = kernel_floor.make_layer(name, spec, 3, torch.device("cpu"), torch.float32)
    call = kernel_floor.prepare(layer, primitive, ops)
    flops, nbytes = kernel_floor.cost(layer, primitive)
    with FlopCounterMode(display=False) as counter:
        out = call()
    assert counter.get_total_flops() == flops
    outs = out if isinstance(out, tuple) else (out,)
    written = sum(t.numel() * t.element_size() for t in outs if t is not None)
    read = layer.x.numel() * 4 if primitive.startswith("split") else 0
    assert nbytes >= written + read
    assert nbytes > 0


def test_quick_run_writes_a_row_per_layer_primitive_and_backend(tmp_path):
    assert kernel_floor.main(["--quick", "--device", "cpu", "--backends", "torch", "--out", str(tmp_path / "floor")]) == 0
    result = json.loads((tmp_path / "floor.json").read_text())
    rows = result["rows"]
    assert len(rows) == len(kernel_floor.QUICK_LAYERS) * len(kernel_floor.PRIMITIVES)
    assert all(r["seconds"] > 0 and r["floor_seconds"] > 0 and r["bound"] in ("compute", "memory") for r in rows)
    assert result["ceilings"]["bandwidth"] > 0 and result["ceilings"]["matmul_ieee"] > 0
    table = (tmp_path / "floor.md").read_text()
    assert table.count("\n| ") == len(rows) + 1      # header + one line per (layer, primitive)


def test_unavailable_backend_is_refused_with_its_reason(tmp_path):
    with pytest.raises(RuntimeError, match="triton.*unavailable"):
        kernel_floor.main(["--quick", "--device", "cpu", "--backends", "triton", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()
