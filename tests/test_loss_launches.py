"""Few launches per slab and few GEMM calls, counted as a GPU would run the losses (docs/loss.md, "Slab size").

bench/loss_launches.py runs the custom ops' implementations on fake CUDA tensors at B = N = 32,768
(shapes only: no data, no GPU), Triton launches counted at the kernels' launch path and skipped, torch
ops counted by a dispatch mode. The same code makes the docs/loss.md table. At commit e4d546b (slabs of
D/8 rows, column statistics merged by torch ops per slab, a float32 [N, D] text-gradient accumulator)
this counts 2,048 GEMM calls and 15,889 launches for CLIP at D=512 and these tests fail.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lift_fast.kernels import chunking

pytest.importorskip("triton")

BATCH = 32768
LAUNCHES_PER_SLAB = 4


def load_counter():
    path = Path(__file__).resolve().parent.parent / "bench" / "loss_launches.py"
    spec = importlib.util.spec_from_file_location("loss_launches", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COUNTER = load_counter()


@pytest.mark.parametrize("dim", [384, 4096])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_few_gemm_calls_at_32k(loss, dim):
    """At most 64 GEMM calls for one forward + backward with text gradients, whatever D."""
    counts = COUNTER.count_loss(loss, BATCH, dim, text_grad=True)
    assert counts["gemm"] <= 64, counts
    assert counts["forward"]["triton"] >= 1, "the Triton path was not taken"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_at_most_four_launches_per_slab(loss):
    """Twice the slabs (half the budget) adds at most 4 launches per added slab in the forward, and in
    each pass of the backward (the row pass for d image, the column pass for d text)."""
    default_rows = chunking.slab_rows(BATCH, BATCH)
    assert default_rows >= chunking.MIN_SLAB_ROWS and default_rows % chunking.ROW_MULTIPLE == 0
    per_pass = {}
    for budget_rows in (default_rows, default_rows // 4):
        slab_bytes = budget_rows * BATCH * chunking.BYTES_PER_SIMILARITY
        assert chunking.slab_rows(BATCH, BATCH, slab_bytes) == budget_rows
        counts = COUNTER.count_loss(loss, BATCH, 512, text_grad=True, slab_bytes=slab_bytes)
        per_pass[BATCH // budget_rows] = (counts["forward"]["launches"], counts["backward"]["launches"],
                                          counts["forward"]["triton"])
    (few, (forward, backward, kernels)), (more, (forward2, backward2, kernels2)) = sorted(per_pass.items())
    added = more - few
    assert kernels2 > kernels, per_pass  # the smaller budget did make more slabs
    assert (forward2 - forward) / added <= LAUNCHES_PER_SLAB, per_pass
    assert (backward2 - backward) / (2 * added) <= LAUNCHES_PER_SLAB, per_pass  # row slabs and column slabs


def test_the_counter_sees_triton_launches_and_torch_ops():
    """The counts can fail: a forward at tiny slabs counts its Triton launches and its GEMMs per slab."""
    counts = COUNTER.count_loss("clip", 4096, 64, text_grad=False)
    rows = chunking.slab_rows(4096, 4096)
    assert rows == 4096  # one slab: the budget holds 65k rows of 4096
    assert counts["forward"]["kernels"] == {"_clip_stats_kernel": 1, "_clip_rows_kernel": 1}
    assert counts["forward"]["gemm"] == 1 and counts["backward"]["gemm"] == 2
    assert counts["backward"]["kernels"] == {"_clip_grad_kernel": 1}


def test_docs_table_comes_from_the_counter():
    """docs/loss.md's table is the counter's markdown (python bench/loss_launches.py)."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "loss.md").read_text()
    rows = COUNTER.table(batches=(32768,), dims=(512,))
    line = COUNTER.markdown(rows).splitlines()[-1]
    assert line in docs


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_memory_beyond_the_slabs_is_at_most_1_2x_inputs_and_gradients(loss):
    """bf16, B = N = 32,768, D = 1,024, text gradients: the inputs and everything the loss allocates
    besides its slabs (gradients, statistics, buffers) stay within 1.2x the inputs and gradients, and
    the slabs within the default budget. At e4d546b the float32 [N, D] text-gradient accumulator and its
    bf16 copy made this 1.5x."""
    peak = COUNTER.memory(loss, BATCH, 1024, text_grad=True)
    inputs = peak["inputs_and_grads"] / 2
    assert inputs + peak["other"] <= 1.2 * peak["inputs_and_grads"], peak
    assert peak["slab"] <= chunking.DEFAULT_SLAB_BYTES, peak
