"""The Pallas kernels against their plain-JAX references, run in the Pallas interpreters on CPU.

TPU kernels run under the TPU interpreter (pltpu.InterpretParams, which checks DMAs and
semaphores like the hardware; detect_races on a few cases), GPU kernels under interpret=True.
The variant grid (causal x window x GQA x segments x head_dim x alignment x dtype) has 576
points; the tests take a pairwise-covering selection of it (every pair of levels of any two
factors appears in some case), checked by `test_selection_is_pairwise_covering`.

Tolerances, as relative Frobenius error ||kernel - ref|| / ||ref|| against a float32
reference on the same (possibly bf16-rounded) inputs:
  float32: 2e-5 (observed ~1e-7: the kernels reorder float32 sums, nothing more);
  bfloat16: 2e-2 (probabilities and outputs are rounded to bf16, ~2**-8 each, as in HF).
A wrong mask, a skipped live block or a wrong GQA mapping gives errors of order 1.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import BlockSizes, decode_attention, decode_reference, flash_attention, mha_reference
from pallas_kernels.common import MaskInfo
from pallas_kernels.reference import reference_mask

TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}
# On a GPU machine (benchmarks/gpu_check.sh) the GPU kernels are compiled, not interpreted, and
# the TPU-interpreter tests are skipped.
ON_GPU = jax.default_backend() == "gpu"
GPU_INTERPRET = not ON_GPU
tpu_interpreter = pytest.mark.skipif(ON_GPU, reason="TPU interpreter tests run on CPU")

FACTORS = {
    "causal": (True, False),
    "window": (None, "smaller", "equal", "larger"),
    "group": (1, 4, 8),
    "segments": (False, True),
    "head_dim": (64, 96, 128),
    "aligned": (True, False),
    "dtype": ("float32", "bfloat16"),
}
# Per backend: the block sizes the tests use and sequence lengths that are / are not multiples.
BACKENDS = {
    "tpu": dict(blocks=BlockSizes(128, 128, 128, 128), aligned=256, unaligned=200),
    "gpu": dict(blocks=BlockSizes(32, 32, 32, 16), aligned=128, unaligned=100),
}


def pairwise(factors: dict[str, tuple]) -> list[dict]:
    """A small set of cases covering every pair of levels of every two factors (greedy, deterministic)."""
    names = list(factors)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2)
                 for x in factors[a] for y in factors[b]}
    candidates = [dict(zip(names, values, strict=True)) for values in itertools.product(*factors.values())]
    pairs_of = {id(c): {((a, c[a]), (b, c[b])) for a, b in itertools.combinations(names, 2)} for c in candidates}
    cases = []
    while uncovered:
        best = max(candidates, key=lambda c: len(pairs_of[id(c)] & uncovered))
        uncovered = uncovered - pairs_of[id(best)]
        cases.append(best)
    return cases


CASES = pairwise(FACTORS)


def case_id(case: dict) -> str:
    return "-".join([("causal" if case["causal"] else "full"), f"w{case['window']}", f"g{case['group']}",
                     "seg" if case["segments"] else "noseg", f"d{case['head_dim']}",
                     "aligned" if case["aligned"] else "ragged", case["dtype"]])


def make_inputs(case: dict, seq: int, seed: int = 0):
    group, d, dtype = case["group"], case["head_dim"], jnp.dtype(case["dtype"])
    kv = 2 if group * 2 <= 8 else 1
    b, h = 2, group * kv
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, seq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, seq, kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, seq, kv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, seq, h, d), jnp.float32).astype(dtype)
    segments = None
    if case["segments"]:
        # Row 0: three documents then padding (id 0); row 1: two documents. Not monotonic on purpose.
        edges0, edges1 = [seq // 5, seq // 2, seq - seq // 7], [seq // 3]
        row0 = np.searchsorted(edges0, np.arange(seq), side="right") + 1
        row0[row0 == 4] = 0
        row1 = np.searchsorted(edges1, np.arange(seq), side="right") + 1
        segments = jnp.asarray(np.stack([row0, row1]), jnp.int32)
    window = {None: None, "smaller": max(seq // 3, 17), "equal": seq, "larger": seq + 77}[case["window"]]
    return q, k, v, do, segments, window


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@functools.partial(jax.jit, static_argnames=("causal", "window", "backend", "blocks", "interpret"))
def _kernel_and_reference(q, k, v, do, segments, *, causal, window, backend, blocks, interpret):
    kw = dict(q_segment_ids=segments, causal=causal, sliding_window=window)
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks, backend=backend,
                                                       interpret=interpret, **kw), q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference on GPUs
        ref, ref_vjp = jax.vjp(lambda q, k, v: mha_reference(q, k, v, **kw), *f32[:3])
        ref_grads = ref_vjp(f32[3])
    return (out, *vjp(do)), (ref, *ref_grads)


def check_flash(case: dict, backend: str, interpret) -> None:
    setup = BACKENDS[backend]
    seq = setup["aligned"] if case["aligned"] else setup["unaligned"]
    q, k, v, do, segments, window = make_inputs(case, seq)
    got, want = _kernel_and_reference(q, k, v, do, segments, causal=case["causal"], window=window, backend=backend,
                                      blocks=setup["blocks"], interpret=interpret)
    tol = TOLERANCE[case["dtype"]]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == q.dtype, name
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# Pairs do not cover every combination: add the one with no mask at all (the kernels take a
# separate, mask-free path there).
UNMASKED = dict(causal=False, window=None, group=4, segments=False, head_dim=64, aligned=True, dtype="float32")


def test_selection_is_pairwise_covering():
    assert len(CASES) < 20  # the point: far fewer than the 576 of the full product
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(case[a], case[b]) for case in CASES}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)


@tpu_interpreter
@pytest.mark.parametrize("case", [*CASES, UNMASKED], ids=case_id)
def test_tpu_flash_matches_reference(case):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter_state

    # Every third case also runs the race detector (DMA / semaphore races in the kernels).
    detect = case in CASES and CASES.index(case) % 3 == 0
    check_flash(case, "tpu", pltpu.InterpretParams(detect_races=detect))
    if detect:
        assert not tpu_interpreter_state.races.races_found


@pytest.mark.parametrize("case", [*CASES, UNMASKED], ids=case_id)
def test_gpu_flash_matches_reference(case):
    check_flash(case, "gpu", GPU_INTERPRET)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_query_offset_against_longer_cache(backend):
    """Prefill into a KV cache: T queries at per-row offsets against S > T keys (keys past the
    queries masked by causality), as generate's prefill calls it."""
    setup = BACKENDS[backend]
    b, t, s, h, kv, d = 2, 40, setup["aligned"], 4, 2, 64
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(key, (b, s, kv, d)) for key in ks[1:])
    offset = jnp.array([0, s - t - 3], jnp.int32)
    if backend == "tpu" and ON_GPU:
        pytest.skip("TPU interpreter tests run on CPU")
    out = flash_attention(q, k, v, q_offset=offset, sliding_window=29, block_sizes=setup["blocks"], backend=backend,
                          interpret=GPU_INTERPRET if backend == "gpu" else True)
    with jax.default_matmul_precision("highest"):
        ref = mha_reference(q, k, v, q_offset=offset, sliding_window=29)
    assert rel_err(out, ref) < TOLERANCE["float32"]


# ------------------------------------------------------------------------------ block skipping
@pytest.mark.parametrize("causal,window,offset", [(True, None, 0), (True, 100, 0), (False, 100, 0),
                                                  (True, 300, 37), (False, None, 5), (True, 1, 130)])
def test_block_ranges_are_exactly_the_live_blocks(causal, window, offset):
    """The kernels visit only tiles [lo, hi] from MaskInfo; those must be exactly the tiles
    with some visible element (fewer would drop keys, more would waste work)."""
    t, s, bq, bk = 300, 460, 64, 32
    info = MaskInfo(q_len=t, kv_len=s, q_len_padded=320, kv_len_padded=480, block_q=bq, block_k=bk, causal=causal,
                    window=window, has_segments=False)
    mask = np.zeros((320, 480), bool)
    mask[:t, :s] = np.asarray(reference_mask(t, s, q_offset=jnp.array([offset]), causal=causal,
                                             sliding_window=window))[0]
    live = mask.reshape(320 // bq, bq, 480 // bk, bk).any(axis=(1, 3))
    needs_mask = ~mask.reshape(320 // bq, bq, 480 // bk, bk).all(axis=(1, 3))
    for i in range(info.num_q_blocks):
        lo, hi = (int(x) for x in info.kv_range(i, offset))
        if i * bq < t:  # query blocks that hold real rows
            assert set(np.flatnonzero(live[i])) == set(range(lo, hi + 1)), i
        assert hi - lo + 1 <= info.kv_blocks_per_q_block
        for j in range(lo, hi + 1):
            if i * bq + bq <= t:
                assert bool(info.block_needs_mask(i, j, offset)) == needs_mask[i, j], (i, j)
    for j in range(info.num_kv_blocks):
        lo, hi = (int(x) for x in info.q_range(j, offset))
        assert set(np.flatnonzero(live[:, j])) == set(range(lo, hi + 1)), j
        assert hi - lo + 1 <= info.q_blocks_per_kv_block


def _pallas_operands(fn, *args):
    """Shapes of the operands of every pallas_call in fn's jaxpr (forward and backward)."""
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                shapes.append([tuple(v.aval.shape) for v in eqn.invars])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_gqa_and_head_dim_96_reach_the_kernel_unrepeated_and_unpadded(backend):
    """K and V enter the kernels with their own kv-head count (no repeat to H heads) and head_dim
    96 stays 96 in HBM (any padding to the hardware tile happens inside the kernel)."""
    b, t, h, kv, d = 1, 256, 8, 2, 96
    q = jnp.zeros((b, t, h, d), jnp.bfloat16)
    k = jnp.zeros((b, t, kv, d), jnp.bfloat16)

    def loss(q, k, v):
        return flash_attention(q, k, v, backend=backend, interpret=True).astype(jnp.float32).sum()

    calls = _pallas_operands(jax.grad(loss, argnums=(0, 1, 2)), q, k, k)
    assert len(calls) == 3  # forward, dq, dk/dv
    head_axis = 1 if backend == "tpu" else 2  # TPU: [B, KV, (G,) T, D]; GPU: [B, T, heads, D]
    for operands in calls:
        assert not any(len(shape) >= 4 and shape[-1] == 128 for shape in operands), operands
        per_head = [shape for shape in operands if len(shape) >= 4 and shape[-1] == d]
        assert all(shape[head_axis] in (kv, h) for shape in per_head), operands
        assert sum(shape[head_axis] == kv for shape in per_head) >= 2, operands  # k and v with kv heads
        if backend == "tpu":  # q is grouped [B, KV, G, T, D]: nothing carries all h heads
            assert all(shape[head_axis] == kv for shape in per_head), operands


# ------------------------------------------------------------------------------ decode
DECODE_FACTORS = {"window": (None, "smaller", "larger"), "group": (1, 4, 8), "head_dim": (64, 96, 128),
                  "dtype": ("float32", "bfloat16")}
DECODE_CASES = pairwise(DECODE_FACTORS)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", DECODE_CASES,
                         ids=lambda c: f"w{c['window']}-g{c['group']}-d{c['head_dim']}-{c['dtype']}")
def test_decode_matches_reference(case, backend):
    """Rows of different lengths (1, a middle one, the full cache) in one batch; heads-major cache."""
    group, d, dtype = case["group"], case["head_dim"], jnp.dtype(case["dtype"])
    kv = 2 if group * 2 <= 8 else 1
    b, s, h = 3, 200, group * kv
    ks = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(ks[0], (b, h, d)).astype(dtype)
    k, v = (jax.random.normal(key, (b, kv, s, d)).astype(dtype) for key in ks[1:])
    lengths = jnp.array([1, 77, s], jnp.int32)
    window = {None: None, "smaller": 50, "larger": 500}[case["window"]]
    if backend == "tpu" and ON_GPU:
        pytest.skip("TPU interpreter tests run on CPU")
    interpret = GPU_INTERPRET if backend == "gpu" else True
    out = jax.jit(lambda *a: decode_attention(*a, sliding_window=window, block_k=32, backend=backend,
                                              interpret=interpret))(q, k, v, lengths)
    with jax.default_matmul_precision("highest"):
        ref = decode_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths, sliding_window=window)
    assert out.shape == (b, h, d) and out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[case["dtype"]]


@tpu_interpreter
def test_decode_matches_flash_with_offset():
    """Decoding one token equals the flash kernel run with that row's cache offset."""
    b, s, h, kv, d = 2, 256, 4, 2, 64
    ks = jax.random.split(jax.random.key(11), 3)
    q = jax.random.normal(ks[0], (b, 1, h, d))
    k, v = (jax.random.normal(key, (b, s, kv, d)) for key in ks[1:])
    lengths = jnp.array([5, 200], jnp.int32)
    dec = decode_attention(q[:, 0], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), lengths, backend="tpu",
                           interpret=True)
    flash = flash_attention(q, k, v, q_offset=lengths - 1, backend="tpu", interpret=True)
    assert rel_err(dec, flash[:, 0]) < TOLERANCE["float32"]


# ------------------------------------------------------------------------------ larger grid (slow)
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", [dict(zip(FACTORS, values, strict=True))
                                  for values in itertools.product(*FACTORS.values())][::7], ids=case_id)
def test_flash_larger_grid(case, backend):
    if backend == "tpu" and ON_GPU:
        pytest.skip("TPU interpreter tests run on CPU")
    check_flash(case, backend, GPU_INTERPRET if backend == "gpu" else True)
