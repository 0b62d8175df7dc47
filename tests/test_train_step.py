"""The loss and the optimiser step: overfitting, packing equivalence, exact gradient accumulation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from phi3jax.config import Phi3Config
from phi3jax.model import init_params
from phi3jax.train.step import OptimConfig, init_train_state, loss_and_grads, make_optimizer, token_nll, train_step

CFG = Phi3Config.preset("tiny", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                        original_max_position_embeddings=128)


def _row_batch(inputs, targets, mask, segments, positions):
    return {"inputs": jnp.asarray(inputs, jnp.int32), "targets": jnp.asarray(targets, jnp.int32),
            "loss_mask": jnp.asarray(mask, jnp.float32), "segment_ids": jnp.asarray(segments, jnp.int32),
            "positions": jnp.asarray(positions, jnp.int32)}


def _random_batch(rng, b, t, padded_rows=()):
    x = rng.integers(3, CFG.vocab_size, (b, t + 1))
    mask = np.ones((b, t), np.float32)
    seg = np.ones((b, t), np.int32)
    for row, keep in padded_rows:
        mask[row, keep:] = 0
        seg[row, keep:] = 0
    pos = np.tile(np.arange(t), (b, 1))
    return _row_batch(x[:, :-1], x[:, 1:], mask, seg, pos)


def test_overfitting_one_batch_drives_the_loss_near_zero():
    batch = _random_batch(np.random.default_rng(0), 2, 32)
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)
    optimizer = make_optimizer(optim, 300)
    state = init_train_state(init_params(CFG, 0), optimizer)
    step = jax.jit(functools.partial(train_step, cfg=CFG, optimizer=optimizer))
    losses = []
    for _ in range(150):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 4.0  # ~ln(128) at init
    assert losses[-1] < 0.05, losses[-10:]


def test_a_packed_row_gives_each_document_the_loss_it_has_alone():
    """Per-document summed NLL, packed vs one by one; float32, so agreement to 1e-5 relative."""
    rng = np.random.default_rng(1)
    params = init_params(CFG, 1)
    lengths = [13, 7, 20, 9]
    docs = [rng.integers(3, CFG.vocab_size, n + 1) for n in lengths]
    t = sum(lengths) + 5  # trailing padding
    inputs, targets, seg, pos, mask = (np.zeros(t, np.int64) for _ in range(5))
    at = 0
    for k, d in enumerate(docs):
        n = len(d) - 1
        inputs[at:at + n], targets[at:at + n] = d[:-1], d[1:]
        seg[at:at + n], pos[at:at + n], mask[at:at + n] = k + 1, np.arange(n), 1
        at += n
    nll = jax.jit(token_nll, static_argnums=1)
    packed = np.asarray(nll(params, CFG, _row_batch(inputs[None], targets[None], mask[None], seg[None], pos[None])))[0]
    # Each document alone, in its own row (right-padded to one shape so it compiles once).
    width = max(lengths)
    alone = np.zeros((len(docs), 5, width), np.int64)
    for k, d in enumerate(docs):
        n = len(d) - 1
        alone[k, :, :n] = [d[:-1], d[1:], np.ones(n), np.ones(n), np.arange(n)]
    single = np.asarray(nll(params, CFG, _row_batch(*alone.transpose(1, 0, 2))))
    for k, n in enumerate(lengths):
        np.testing.assert_allclose(packed[seg == k + 1].sum(), single[k, :n].sum(), rtol=1e-5)


def test_accumulating_k_micro_batches_equals_one_big_batch_with_uneven_padding():
    """float32: same loss and gradients up to summation order: rtol 1e-4, and an absolute slack of 1e-5 of
    each leaf's largest gradient (reordered float32 sums of terms up to 1e3x larger than the result)."""
    k = 4
    rng = np.random.default_rng(2)
    # Micro-batches with very different numbers of counted tokens (one row almost all padding).
    batch = _random_batch(rng, 8, 24, padded_rows=[(0, 3), (1, 20), (5, 1), (6, 12)])
    params = init_params(CFG.replace(initializer_range=0.5), 2)  # confident logits: per-token losses differ
    loss_big, count_big, grads_big = jax.jit(loss_and_grads, static_argnums=(1, 3))(params, CFG, batch, 1)
    loss_acc, count_acc, grads_acc = jax.jit(loss_and_grads, static_argnums=(1, 3))(params, CFG, batch, k)
    assert float(count_big) == float(count_acc) == float(batch["loss_mask"].sum())
    np.testing.assert_allclose(float(loss_acc), float(loss_big), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_acc), jax.tree.leaves(grads_big), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    # The naive alternative (mean of per-micro-batch means) is measurably different here.
    nll = np.asarray(jax.jit(token_nll, static_argnums=1)(params, CFG, batch)) * np.asarray(batch["loss_mask"])
    sums, counts = nll.reshape(k, -1).sum(1), np.asarray(batch["loss_mask"]).reshape(k, -1).sum(1)
    assert abs(np.mean(sums / counts) - float(loss_big)) > 1e-3


def test_accumulated_train_step_updates_parameters_like_the_big_batch():
    batch = _random_batch(np.random.default_rng(3), 4, 16, padded_rows=[(1, 5), (2, 9)])
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0), 10)
    state = init_train_state(init_params(CFG, 3), optimizer)
    big, _ = jax.jit(functools.partial(train_step, cfg=CFG, optimizer=optimizer, accum_steps=1))(state, batch)
    acc, _ = jax.jit(functools.partial(train_step, cfg=CFG, optimizer=optimizer, accum_steps=2))(state, batch)
    # Adam's first update is about lr * sign(g): an element whose gradient is ~0 can turn float32 summation
    # noise into a visible step, so the slack is 1% of the learning rate.
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_weight_decay_skips_norms_and_embeddings_unless_configured():
    from phi3jax.train.step import weight_decay_mask

    params = init_params(CFG, 0)
    mask = weight_decay_mask(params, OptimConfig())
    assert mask["layers"]["attn"]["q"] and mask["layers"]["mlp"]["down"]
    assert not mask["embed"] and not mask["lm_head"] and not mask["final_norm"]["scale"]
    assert not mask["layers"]["attn_norm"]["scale"]
    on = weight_decay_mask(params, OptimConfig(decay_embeddings=True, decay_norms=True))
    assert on["embed"] and on["final_norm"]["scale"]


def test_bf16_compute_keeps_float32_master_weights():
    batch = _random_batch(np.random.default_rng(4), 1, 8)
    cfg16 = CFG.replace(dtype="bfloat16", param_dtype="float32")
    optimizer = make_optimizer(OptimConfig(warmup_steps=0), 10)
    state = init_train_state(init_params(cfg16, 0), optimizer)
    new, metrics = jax.jit(functools.partial(train_step, cfg=cfg16, optimizer=optimizer))(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    f32_loss = float(jax.jit(loss_and_grads, static_argnums=1)(init_params(CFG, 0), CFG, batch)[0])
    assert abs(float(metrics["loss"]) - f32_loss) < 0.05  # bf16 activations: ~3 significant digits


def test_remat_gives_the_same_loss_and_gradients():
    batch = _random_batch(np.random.default_rng(5), 1, 8)
    params = init_params(CFG, 0)
    grad = jax.jit(loss_and_grads, static_argnums=1)
    plain, remat = grad(params, CFG, batch), grad(params, CFG.replace(remat_policy="full"), batch)
    np.testing.assert_allclose(float(plain[0]), float(remat[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain[2]), jax.tree.leaves(remat[2]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_token_nll_is_the_softmax_cross_entropy_of_the_logits():
    import optax

    from phi3jax.model import Phi3

    batch = _random_batch(np.random.default_rng(6), 2, 8)
    params = init_params(CFG.replace(initializer_range=0.5), 0)
    logits, _ = Phi3(CFG).apply({"params": params}, batch["inputs"], batch["positions"],
                                segment_ids_bt=batch["segment_ids"])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    np.testing.assert_allclose(np.asarray(token_nll(params, CFG, batch)), np.asarray(expected), rtol=1e-6)
