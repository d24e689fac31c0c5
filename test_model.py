"""
The project's tests, on the CPU: python -m pytest test_model.py

One section per file under test:
- model.py against the original implementation's recorded outputs (../shared/fixtures, or the paths in
  HRM_REFERENCE_FIXTURES separated by ':'; skipped, saying so, where none exist), and its mechanisms;
- kernels.py: the Triton kernels against the PyTorch references, under Triton's interpreter without a GPU
  (float32 and float16: the interpreter mishandles bfloat16), on the GPU where there is one;
- dataset.py: the shared format, safe atomic writes, damaged files, the dihedral transforms, downloads;
- prepare_sudoku.py: parsing and checks, the augmentation, the dataset layout, bad input, interruptions;
- prepare_timeseries.py and the forecasting model: windows and borders, calendar features, bad rows, the
  heads, shorter windows and halting, a forecaster that learns, the baselines, the SVG, end to end;
- configurator.py, then train.py and sample.py end to end in subprocesses on small data, with their errors;
- on a CUDA GPU only: a bfloat16 training step of the whole HRM with each kernel backend.
"""
import copy
import csv
import dataclasses
import functools
import hashlib
import http.server
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: the kernel tests use its interpreter

import dataset  # noqa: E402
import kernels  # noqa: E402
import prepare_sudoku as ps  # noqa: E402
import prepare_timeseries as pt  # noqa: E402
from model import (HRM, HRMConfig, IGNORE_LABEL_ID, AdamAtan2, PuzzleEmbeddingSignSGD, RotaryEmbedding,  # noqa: E402
                   config_from_reference, convert_reference_state_dict, load_reference_checkpoint, softmax_cross_entropy,
                   stablemax_cross_entropy)
from model import ForecastConfig, build_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FIXTURE = os.path.join(HERE, "..", "shared", "fixtures", "hrm_reference_small.pt")
FIXTURES = [p for p in os.environ.get("HRM_REFERENCE_FIXTURES", DEFAULT_FIXTURE).split(":") if p]


def tiny_config(**overrides):
    config = dict(vocab_size=11, seq_len=16, puzzle_emb_ndim=32, num_puzzle_identifiers=7, batch_size=4,
                  H_cycles=2, L_cycles=3, H_layers=1, L_layers=2, hidden_size=32, expansion=2, num_heads=2,
                  halt_max_steps=4, halt_exploration_prob=0.0, forward_dtype="float32")
    config.update(overrides)
    return HRMConfig(**config)


def random_batch(config, batch_size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = batch_size or config.batch_size
    return dict(inputs=torch.randint(1, config.vocab_size, (B, config.seq_len), generator=g, dtype=torch.int32),
                labels=torch.randint(1, config.vocab_size, (B, config.seq_len), generator=g, dtype=torch.int32),
                puzzle_identifiers=torch.randint(0, config.num_puzzle_identifiers, (B,), generator=g,
                                                 dtype=torch.int32))


def assert_close(actual, expected, what, rtol=1e-4):
    """Relative error ||a - e|| / ||e|| under rtol for floats (NaN never passes); equality otherwise."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.is_floating_point():
        assert torch.equal(actual.to(expected.dtype), expected), f"{what}: {actual} != {expected}"
        return
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-6)).item()
    assert err < rtol, f"{what}: relative error {err:.3g}"

# -----------------------------------------------------------------------------
# the original implementation's recorded outputs


@pytest.mark.parametrize("path", FIXTURES)
def test_matches_reference_implementation(path):
    if not os.path.exists(path):
        pytest.skip(f"the original's recorded outputs are not at {path}: the match with the original was not checked")
    fixture = torch.load(path, weights_only=False)
    assert fixture["ignore_label_id"] == IGNORE_LABEL_ID
    model = load_reference_checkpoint(fixture["state_dict"], fixture["config"])
    renamed = {k: convert_reference_state_dict({k: None}).popitem()[0] for k in fixture["state_dict"]}
    renamed["model.inner.puzzle_emb.local_weights"] = "puzzle_emb.local_weights"

    # evaluation: segments from a fresh carry until every sequence halted
    model.eval()
    batch = fixture["eval"]["batch"]
    carry = model.initial_carry(batch)
    with torch.no_grad():
        for i, ref in enumerate(fixture["eval"]["steps"]):
            carry, loss, metrics, outputs = model(carry, batch)
            where = f"{path} eval segment {i}"
            assert_close(loss, ref["loss"], f"{where} loss")
            for key in ("logits", "q_halt_logits", "q_continue_logits"):
                assert_close(outputs[key], ref[key], f"{where} {key}")
            for key in ("halted", "steps", "z_H", "z_L"):
                assert_close(getattr(carry, key), ref[key], f"{where} {key}")
            assert metrics.keys() == ref["metrics"].keys()
            for key, value in ref["metrics"].items():
                assert_close(metrics[key], value, f"{where} metric {key}")
    assert carry.halted.all()

    # training: three segments from a fresh carry, each offered a new batch; gradients of loss / batch_size
    model.train()
    carry = None
    for i, ref in enumerate(fixture["train"]["steps"]):
        where = f"{path} train segment {i}"
        batch = ref["batch"]
        carry = carry or model.initial_carry(batch)
        model.zero_grad(set_to_none=True)
        if hasattr(model, "puzzle_emb"):
            model.puzzle_emb.local_weights.grad = None
        carry, loss, metrics, outputs = model(carry, batch)
        (loss / batch["inputs"].shape[0]).backward()
        assert_close(loss, ref["loss"], f"{where} loss")
        assert outputs.keys() == ref["outputs"].keys()
        for key, value in ref["outputs"].items():
            assert_close(outputs[key], value, f"{where} {key}")
        assert_close(carry.halted, ref["halted"], f"{where} halted")
        assert_close(carry.steps, ref["steps"], f"{where} steps")
        for key, value in ref["current_data"].items():
            assert_close(carry.current_data[key], value, f"{where} current_data {key}")
        assert metrics.keys() == ref["metrics"].keys()
        for key, value in ref["metrics"].items():
            assert_close(metrics[key], value, f"{where} metric {key}")

        tensors = dict(model.named_parameters())
        if hasattr(model, "puzzle_emb"):
            tensors["puzzle_emb.local_weights"] = model.puzzle_emb.local_weights
        assert {renamed[k] for k in ref["grads"]} == {k for k, t in tensors.items() if t.grad is not None}
        for key, grad in ref["grads"].items():
            assert_close(tensors[renamed[key]].grad, grad, f"{where} gradient of {key}")

        if "puzzle_emb_after_signsgd" in ref:
            table = model.puzzle_emb.weights.clone()
            PuzzleEmbeddingSignSGD(model.puzzle_emb, lr=0.01, weight_decay=0.1).step()
            assert_close(model.puzzle_emb.weights, ref["puzzle_emb_after_signsgd"], f"{where} SignSGD table")
            model.puzzle_emb.weights.copy_(table)


def test_reference_loader_names_bad_keys():
    config = dict(batch_size=2, seq_len=8, puzzle_emb_ndim=16, num_puzzle_identifiers=3, vocab_size=5,
                  H_cycles=1, L_cycles=1, H_layers=1, L_layers=1, hidden_size=16, expansion=2, num_heads=2,
                  pos_encodings="learned", halt_max_steps=2, halt_exploration_prob=0.1, forward_dtype="float32")
    model = HRM(config_from_reference(config))
    # the original's naming, as saved by its compiled training script
    reference = {"_orig_mod.model.inner." + k.replace("embed_tokens.weight", "embed_tokens.embedding_weight")
                 .replace("embed_pos.weight", "embed_pos.embedding_weight"): v for k, v in model.state_dict().items()}
    loaded = load_reference_checkpoint(reference, config)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    broken = dict(reference)
    del broken["_orig_mod.model.inner.q_head.bias"]
    broken["_orig_mod.model.inner.extra.weight"] = torch.zeros(1)
    with pytest.raises(dataset.DataError, match=r"missing \['q_head.bias'\].*unexpected \['extra.weight'\]"):
        load_reference_checkpoint(broken, config)
    with pytest.raises(ValueError, match="unknown keys in the reference config: mystery_knob"):
        config_from_reference(dict(config, mystery_knob=1))
    # a whole training config with the model under 'arch' and the loss named as the original names it
    nested = config_from_reference(dict(arch=dict(config, name="hrm.hrm_act_v1@X",
                                                  loss=dict(name="losses@ACTLossHead",
                                                            loss_type="softmax_cross_entropy"))))
    assert nested.loss_type == "softmax" and nested.pos_encodings == "learned"

# -----------------------------------------------------------------------------
# the model's mechanisms


def test_shapes_and_carry():
    config = tiny_config()
    model = HRM(config)
    batch = random_batch(config)
    carry = model.initial_carry(batch)
    assert carry.halted.all()
    carry, loss, metrics, outputs = model(carry, batch)
    T = config.seq_len + model.puzzle_emb_len
    assert model.puzzle_emb_len == 1
    assert outputs["logits"].shape == (config.batch_size, config.seq_len, config.vocab_size)
    assert outputs["q_halt_logits"].shape == outputs["q_continue_logits"].shape == (config.batch_size,)
    assert carry.z_H.shape == carry.z_L.shape == (config.batch_size, T, config.hidden_size)
    assert not carry.z_H.requires_grad and not carry.z_L.requires_grad  # detached between segments
    assert loss.ndim == 0 and torch.isfinite(loss)
    # an embedding wider than hidden_size takes ceil(ndim / hidden) tokens, zero-padded
    wide = HRM(tiny_config(puzzle_emb_ndim=40))
    assert wide.puzzle_emb_len == 2
    assert wide(wide.initial_carry(batch), batch)[0].z_H.shape[1] == config.seq_len + 2


def test_only_last_L_and_H_steps_carry_gradient():
    config = tiny_config(H_cycles=3, L_cycles=2)
    model = HRM(config).train()
    calls = []
    for name in ("H_level", "L_level"):
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: calls.append((name, out.requires_grad)))
    batch = random_batch(config)
    carry, loss, _, _ = model(model.initial_carry(batch), batch)
    # the segment, then the no-grad pass that bootstraps the Q target
    segment = ([("L_level", False)] * 2 + [("H_level", False)]) * 2 + [("L_level", False), ("L_level", True),
                                                                         ("H_level", True)]
    target = ([("L_level", False)] * 2 + [("H_level", False)]) * 3
    assert calls == segment + target
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    # the gradient equals that of a model whose no-grad steps are replaced by their (detached) results
    model.zero_grad()
    data = dict(batch)
    z_H, z_L = model.H_init.expand_as(carry.z_H), model.L_init.expand_as(carry.z_L)
    x = model.embed_inputs(data["inputs"], data["puzzle_identifiers"], torch.arange(z_H.shape[1]))
    cos_sin = model.rotary_emb(torch.arange(z_H.shape[1]))
    with torch.no_grad():
        for h in range(3):
            for l in range(2):
                if (h, l) != (2, 1):
                    z_L = model.L_level(z_L, z_H + x, cos_sin)
            if h < 2:
                z_H = model.H_level(z_H, z_L, cos_sin)
    z_L = model.L_level(z_L, z_H + x, cos_sin)
    z_H = model.H_level(z_H, z_L, cos_sin)
    manual = model.lm_head(z_H)[:, 1:]
    model.zero_grad()
    model.eval()
    _, _, _, outputs = model(model.initial_carry(batch), batch)
    assert torch.allclose(outputs["logits"], manual, atol=1e-5)


def test_halting_in_training_and_evaluation():
    config = tiny_config(halt_max_steps=5)
    model = HRM(config)
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([5.0, -5.0]))  # q_halt > q_continue: the Q head says halt now
    batch = random_batch(config)

    model.train()
    carry, _, _, outputs = model(model.initial_carry(batch), batch)
    assert carry.halted.all() and (carry.steps == 1).all()  # training obeys the Q head
    assert "target_q_continue" in outputs

    model.eval()
    carry = model.initial_carry(batch)
    for segment in range(1, 6):
        carry, _, metrics, outputs = model(carry, batch)
        assert (carry.steps == segment).all()
        assert carry.halted.all() == (segment == 5)  # evaluation always runs halt_max_steps
        assert "target_q_continue" not in outputs
    assert metrics["count"] == config.batch_size and metrics["steps"] == 5 * config.batch_size

    # exploration forces a random minimum of 2..halt_max_steps segments
    explorer = HRM(tiny_config(halt_max_steps=5, halt_exploration_prob=1.0)).train()
    explorer.load_state_dict(model.state_dict())
    carry, _, _, _ = explorer(explorer.initial_carry(batch), batch)
    assert not carry.halted.any()


def test_halted_sequences_restart_on_new_data():
    config = tiny_config(halt_max_steps=3)
    model = HRM(config).eval()
    first, second = random_batch(config, seed=1), random_batch(config, seed=2)
    carry = model.initial_carry(first)
    for _ in range(2):
        carry, _, _, _ = model(carry, first)
    assert not carry.halted.any()
    carry.halted[:2] = True  # as if the first two sequences had halted
    carry, _, _, outputs = model(carry, second)
    assert torch.equal(carry.steps, torch.tensor([1, 1, 3, 3], dtype=torch.int32))
    for key in first:
        assert torch.equal(carry.current_data[key][:2], second[key][:2])
        assert torch.equal(carry.current_data[key][2:], first[key][2:])
    # the restarted rows compute exactly what a fresh carry computes on the new data
    _, _, _, fresh = model(model.initial_carry(second), second)
    assert torch.allclose(outputs["logits"][:2], fresh["logits"][:2], atol=1e-6)


def test_ignored_labels_are_not_scored():
    config = tiny_config()
    model = HRM(config).eval()
    batch = random_batch(config)
    batch["labels"][0] = IGNORE_LABEL_ID          # a sequence with nothing to score
    batch["labels"][1, :5] = IGNORE_LABEL_ID      # and one partly ignored
    carry = model.initial_carry(batch)
    for _ in range(config.halt_max_steps):
        carry, loss, metrics, outputs = model(carry, batch)
    assert metrics["count"] == config.batch_size - 1
    logits = outputs["logits"].detach().requires_grad_()
    for loss_fn in (stablemax_cross_entropy, softmax_cross_entropy):
        per_token = loss_fn(logits, batch["labels"])
        assert (per_token[0] == 0).all() and (per_token[1, :5] == 0).all() and (per_token[1, 5:] > 0).all()
        per_token.sum().backward()
        assert (logits.grad[0] == 0).all() and (logits.grad[1, :5] == 0).all()
        logits.grad = None


def test_losses():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 7) * 4, torch.randint(0, 7, (3, 5))
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 7), labels.view(-1), reduction="none")
    assert torch.allclose(softmax_cross_entropy(logits, labels), expected.view(3, 5), atol=1e-6)
    # stablemax: s(x) = x + 1 for x >= 0, 1 / (1 - x) below, normalised like softmax
    s = torch.where(logits < 0, 1 / (1 - logits.double()), logits.double() + 1)
    expected = -torch.log(s.gather(-1, labels.unsqueeze(-1)).squeeze(-1) / s.sum(-1))
    got = stablemax_cross_entropy(logits, labels)
    assert got.dtype == torch.float64 and torch.allclose(got, expected)


def test_adam_atan2_matches_its_definition():
    torch.manual_seed(0)
    lr, (beta1, beta2), wd = 3e-3, (0.9, 0.95), 0.5
    p = torch.randn(4, 5, requires_grad=True)
    reference, m, v = p.detach().double().clone(), torch.zeros(4, 5).double(), torch.zeros(4, 5).double()
    optimizer = AdamAtan2([p], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    for t in range(1, 6):
        g = torch.randn(4, 5)
        g[0, 0] = 0.0  # a zero gradient: atan2(0, 0) = 0, where Adam would divide by epsilon
        p.grad = g.clone()
        optimizer.step()
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        for i in range(4):
            for j in range(5):
                reference[i, j] = reference[i, j] * (1 - lr * wd) - lr * math.atan2(m_hat[i, j], math.sqrt(v_hat[i, j]))
        assert torch.allclose(p.detach().double(), reference, atol=1e-6), f"step {t}"


def test_raising_halt_max_steps_at_inference():
    config = tiny_config(halt_max_steps=2)
    model = HRM(config).eval()
    batch = random_batch(config)
    model.config.halt_max_steps = 6
    carry, segments = model.initial_carry(batch), 0
    while True:
        carry, _, _, _ = model(carry, batch)
        segments += 1
        if carry.halted.all():
            break
    assert segments == 6 and (carry.steps == 6).all()


def test_learned_positions_and_position_ids():
    config = tiny_config(pos_encodings="learned", puzzle_emb_ndim=0)
    model = HRM(config).eval()
    batch = random_batch(config)
    carry, loss, _, _ = model(model.initial_carry(batch), batch)
    assert torch.isfinite(loss) and model.puzzle_emb_len == 0

    # RoPE at explicit positions: a shorter window at positions 0..T-1 equals the implicit default
    rope = HRM(tiny_config(puzzle_emb_ndim=0)).eval()
    short = {k: v[:, :10] if v.ndim == 2 else v for k, v in batch.items()}
    _, _, _, implicit = rope(rope.initial_carry(short), short)
    explicit = dict(short, position_ids=torch.arange(10).expand(config.batch_size, 10))
    _, _, _, out = rope(rope.initial_carry(explicit), explicit)
    assert torch.allclose(implicit["logits"], out["logits"], atol=1e-6)
    # RoPE sees relative positions only: a shifted window computes the same, a stretched one does not
    shifted = dict(short, position_ids=torch.arange(3, 13).expand(config.batch_size, 10))
    _, _, _, out = rope(rope.initial_carry(shifted), shifted)
    assert torch.allclose(implicit["logits"], out["logits"], atol=1e-4)
    stretched = dict(short, position_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 15]).expand(config.batch_size, 10))
    _, _, _, out = rope(rope.initial_carry(stretched), stretched)
    assert not torch.allclose(implicit["logits"], out["logits"], atol=1e-3)


def test_puzzle_embedding_stays_a_leaf_when_moved():
    model = HRM(tiny_config()).double()
    assert model.puzzle_emb.local_weights.is_leaf and model.puzzle_emb.local_weights.requires_grad
    model.train()
    batch = random_batch(model.config)
    _, loss, _, _ = model(model.initial_carry(batch), batch)
    loss.backward()
    grad = model.puzzle_emb.local_weights.grad
    assert grad is not None and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="batch_size=4"):
        model(model.initial_carry(random_batch(model.config, batch_size=3)), random_batch(model.config, 3))


def test_configure_optimizers_and_signsgd_touches_only_batch_rows():
    config = tiny_config()
    model = HRM(config).train()
    with torch.no_grad():
        model.puzzle_emb.weights.normal_()
    dense, sparse = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95), 1e-2, 0.1)
    assert isinstance(dense, AdamAtan2) and isinstance(sparse, PuzzleEmbeddingSignSGD)
    assert sum(p.numel() for g in dense.param_groups for p in g["params"]) == model.get_num_params()
    batch = random_batch(config)
    batch["puzzle_identifiers"] = torch.tensor([2, 5, 2, 5], dtype=torch.int32)
    before = model.puzzle_emb.weights.clone()
    _, loss, _, _ = model(model.initial_carry(batch), batch)
    loss.backward()
    sparse.step()
    sparse.zero_grad()
    changed = (model.puzzle_emb.weights != before).any(-1)
    assert changed.tolist() == [False, False, True, False, False, True, False]
    assert model.puzzle_emb.local_weights.grad is None
    # each updated row moved by decay plus exactly lr in every coordinate (the sign of the summed gradient)
    step = (model.puzzle_emb.weights[2] - before[2] * (1 - 1e-2 * 0.1)).abs()
    assert torch.allclose(step, torch.full_like(step, 1e-2))
    _, adamw_sparse = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95), 1e-2, 0.1, optimizer="adamw")
    assert isinstance(adamw_sparse, PuzzleEmbeddingSignSGD)
    assert HRM(tiny_config(puzzle_emb_ndim=0)).configure_optimizers(1e-3, 0.1, (0.9, 0.95), 1e-2, 0.1)[1] is None


def _signsgd_rank(rank, world, port, grads, ids, table, result):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = HRM(tiny_config())
    model.puzzle_emb.weights.copy_(table)
    model.puzzle_emb.local_ids.copy_(ids[rank])
    model.puzzle_emb.local_weights.grad = grads[rank].clone()
    PuzzleEmbeddingSignSGD(model.puzzle_emb, lr=0.1, weight_decay=0.0).step()
    result[rank] = model.puzzle_emb.weights.clone()
    dist.destroy_process_group()


def test_signsgd_sums_duplicate_ids_across_ranks():
    torch.manual_seed(0)
    table = torch.randn(7, 32)
    ids = torch.tensor([[1, 3, 3, 0], [3, 6, 1, 1]], dtype=torch.int32)
    grads = torch.randn(2, 4, 32)
    # single process on the concatenated batch
    model = HRM(tiny_config(batch_size=8))
    model.puzzle_emb.weights.copy_(table)
    model.puzzle_emb.local_ids.copy_(ids.flatten())
    model.puzzle_emb.local_weights.grad = grads.flatten(0, 1).clone()
    PuzzleEmbeddingSignSGD(model.puzzle_emb, lr=0.1, weight_decay=0.0).step()
    expected = model.puzzle_emb.weights.clone()
    # row 3 appears on both ranks: its update follows the sign of the summed gradient
    summed = grads[0, 1] + grads[0, 2] + grads[1, 0]
    assert torch.allclose(expected[3], table[3] - 0.1 * summed.sign())

    with mp.Manager() as manager:
        result = manager.dict()
        port = 29500 + os.getpid() % 1000
        mp.spawn(_signsgd_rank, args=(2, port, grads, ids, table, result), nprocs=2)
        for rank in range(2):
            assert torch.equal(result[rank], expected), f"rank {rank}"


# -----------------------------------------------------------------------------
# kernels.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")


def rel_err(out, ref, floor=0.0):
    """||out - ref|| / max(||ref||, floor); a floor stands in where ref is analytically 0."""
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out.double() - ref.double()).norm() / max(ref.double().norm().item(), floor)).item()


def rope_tables(B, T, D, per_sample, generator):
    """cos, sin in the rotate-half layout; per_sample gives (B, T, D) tables at random positions."""
    pos = torch.randint(0, 4096, (B, T), generator=generator) if per_sample else torch.arange(T)
    cos, sin = RotaryEmbedding(D, 4096, 10000.0)(pos)
    return cos.to(DEVICE), sin.to(DEVICE)


def packed_qkv(B, T, H, D, dtype, generator, scale=1.0):
    """q, k, v as strided views into one (B, T, 3H, D) projection output, as in the model."""
    qkv = (torch.randn(B, T, 3 * H, D, generator=generator) * scale).to(DEVICE, dtype).requires_grad_()
    return qkv, qkv.split(H, dim=2)


def check_attention(B, T, H, D, dtype, rope, per_sample=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    qkv, (q, k, v) = packed_qkv(B, T, H, D, dtype, g, scale)
    cos, sin = rope_tables(B, T, D, per_sample, g) if rope else (None, None)
    out = kernels.flash_attention(q, k, v, cos, sin)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    out.backward(dout)

    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = qkv64.split(H, dim=2)
    ref = kernels.attention_reference(q64, k64, v64, *((cos.double(), sin.double()) if rope else (None, None)))
    ref.backward(dout.double())
    assert out.shape == ref.shape and out.dtype == dtype
    # with one token the softmax is constant, so dq = dk = 0: measure them against unit-sized gradients
    floor = math.sqrt(out.numel()) if T == 1 else 0.0
    errs = [rel_err(out, ref)] + [rel_err(a, b, floor) for a, b in zip(qkv.grad.split(H, 2), qkv64.grad.split(H, 2))]
    assert max(errs) < TOL[dtype], f"out, dq, dk, dv relative errors {errs}"
    return errs


@needs_triton
@pytest.mark.parametrize("B, T, H, D, per_sample", [
    (2, 1, 2, 64, True),     # a single token (time-series window of 1)
    (2, 81, 2, 64, False),
    (2, 82, 2, 64, True),    # Sudoku: 81 cells + the puzzle token; one key block, fused backward
    (1, 82, 2, 128, False),
    (1, 127, 2, 128, True),
    (1, 256, 1, 64, False),  # whole key blocks only: no ragged tail
    (1, 200, 1, 128, False),  # the two-kernel backward at head_dim 128
    (1, 900, 1, 64, True),   # mazes / ARC: many key blocks and a ragged tail
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_reference(B, T, H, D, per_sample, dtype):
    check_attention(B, T, H, D, dtype, rope=True, per_sample=per_sample)


@needs_triton
@pytest.mark.parametrize("T", [82, 200])
def test_attention_without_rope(T):
    check_attention(2, T, 2, 64, DTYPES[-1], rope=False)


@needs_triton
@pytest.mark.parametrize("T", [82, 200])
def test_attention_backward_of_a_sum(T):
    """out.sum().backward() hands the backward an expanded gradient (all strides 0), which neither a
    kernel's shared strides nor a TMA descriptor can take as it is."""
    g = torch.Generator().manual_seed(2)
    dtype = DTYPES[0]
    qkv, (q, k, v) = packed_qkv(1, T, 2, 64, dtype, g)
    cos, sin = rope_tables(1, T, 64, False, g)
    kernels.flash_attention(q, k, v, cos, sin).sum().backward()
    qkv64 = qkv.detach().double().requires_grad_()
    kernels.attention_reference(*qkv64.split(2, dim=2), cos.double(), sin.double()).sum().backward()
    assert rel_err(qkv.grad, qkv64.grad) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("T", [100, 200])
def test_attention_padded_keys_do_not_overflow(T):
    """Rows whose real scores are all very negative have a very negative logsumexp; the zero scores of
    padded keys must be masked, or exp2(0 - lse) overflows into inf * 0 = NaN in dQ."""
    g = torch.Generator().manual_seed(1)
    B, H, D = 1, 1, 64
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    k = u.expand(B, T, H, D) * 30 + 0.01 * torch.randn(B, T, H, D, generator=g)
    q = -u.expand(B, T, H, D) * 30 + 0.01 * torch.randn(B, T, H, D, generator=g)
    v = torch.randn(B, T, H, D, generator=g)
    dtype = DTYPES[0]
    qkv = torch.cat((q, k, v), dim=2).to(DEVICE, dtype).requires_grad_()
    out = kernels.flash_attention(*qkv.split(H, dim=2))
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(qkv.grad).all()
    qkv64 = qkv.detach().double().requires_grad_()
    ref = kernels.attention_reference(*qkv64.split(H, dim=2))
    ref.backward(torch.ones_like(ref))
    assert rel_err(out, ref) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("fwd_config, bwd_config", [
    (None, (None, (32, 128, 4, 1))),                     # persistent forward, fused one-tile backward
    ((64, 64, 4, 1), ((16, 32, 4, 1), (16, 32, 4, 1))),  # key tiles: q, k rotated by the separate pass
    (None, ((32, 32, 4, 1), (32, 64, 4, 1))),            # two-kernel backward: RoPE pass first; a 32-key last tile
    ((32, 128, 4, 1), (None, (32, 128, 4, 1))),          # one-tile tiled forward; fused backward, pre-rotated
])
def test_attention_kernel_paths(fwd_config, bwd_config):
    """The launch paths the default configs do not all reach at one length, forced through explicit configs."""
    g = torch.Generator().manual_seed(5)
    B, T, H, D = 2, 82, 2, 64
    dtype = DTYPES[0]
    qkv, (q, k, v) = packed_qkv(B, T, H, D, dtype, g)
    cos, sin = rope_tables(B, T, D, True, g)
    q, k, v = (t.detach() for t in (q, k, v))
    o, lse, q_saved, k_saved, rotated = kernels._flash_fwd(q, k, v, cos, sin, fwd_config)
    do = torch.randn(o.shape, generator=g).to(DEVICE, dtype)
    grads = kernels._flash_bwd(do, q_saved, k_saved, v, o, lse, cos, sin, rotated, bwd_config)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = kernels.attention_reference(q64, k64, v64, cos.double(), sin.double())
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert rotated == (fwd_config is not None)
    if rotated:
        for saved, x in ((q_saved, q64), (k_saved, k64)):
            assert rel_err(saved, kernels.apply_rotary(x.detach(), cos.double(), sin.double())) < TOL[dtype] / 10
    for a, b in zip((o,) + grads, (ref,) + ref_grads):
        assert rel_err(a, b) < TOL[dtype]


@needs_triton
def test_backward_takes_q_and_k_with_different_strides():
    """The two-kernel backward of unrotated q, k rotates them first, in a pass that reads both with one
    set of strides: a k laid out differently from q must be copied, not misread."""
    g = torch.Generator().manual_seed(8)
    B, T, H, D = 1, 82, 2, 64
    dtype = DTYPES[0]
    q, v, do = (torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype) for _ in range(3))
    k = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    cos, sin = rope_tables(B, T, D, False, g)
    o, lse, q_saved, k_saved, rotated = kernels._flash_fwd(q, k, v, cos, sin)
    grads = kernels._flash_bwd(do, q, k, v, o, lse, cos, sin, rotated, ((32, 32, 4, 1), (32, 64, 4, 1)))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = kernels.attention_reference(q64, k64, v64, cos.double(), sin.double())
    for a, b in zip(grads, torch.autograd.grad(ref, (q64, k64, v64), do.double())):
        assert rel_err(a, b) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("programs", [1, 4, 6, 9])
@pytest.mark.parametrize("tables", ["none", "shared", "per_sample"])
def test_persistent_forward_covers_every_head(programs, tables):
    """The short-sequence forward walks B * H = 6 heads with a grid of `programs` programs (capped at 6),
    without RoPE its loop pipelined two heads deep, with RoPE each prefetching its next head by hand:
    uneven shares, prefetches past the last head and programs with fewer heads than stages must be
    right, with no RoPE, one (T, D) table for all samples, or (B, T, D) tables."""
    g = torch.Generator().manual_seed(7)
    B, T, H, D = 3, 82, 2, 64
    dtype = DTYPES[0]
    qkv, (q, k, v) = packed_qkv(B, T, H, D, dtype, g)
    cos, sin = rope_tables(B, T, D, tables == "per_sample", g) if tables != "none" else (None, None)
    q, k, v = (t.detach() for t in (q, k, v))
    o, lse, _, _, rotated = kernels._flash_fwd(q, k, v, cos, sin, short_config=(4, programs, 2) if cos is None else (4, programs))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    if cos is not None:
        q64, k64 = (kernels.apply_rotary(x, cos.double(), sin.double()) for x in (q64, k64))
    ref = kernels.attention_reference(q64, k64, v64)
    qr, kr = q64.transpose(1, 2), k64.transpose(1, 2)
    ref_lse = torch.logsumexp(qr @ kr.transpose(-1, -2) / math.sqrt(D), dim=-1) / math.log(2)
    assert not rotated
    assert rel_err(o, ref) < TOL[dtype]
    assert torch.allclose(lse.double(), ref_lse, atol=1e-3)


@needs_triton
def test_rope_pass_matches_apply_rotary():
    g = torch.Generator().manual_seed(6)
    qkv, (q, k, v) = packed_qkv(2, 37, 3, 64, DTYPES[0], g)
    cos, sin = rope_tables(2, 37, 64, True, g)
    q_rot, k_rot = kernels._rope_qk_launch(q.detach(), k.detach(), cos, sin)
    for a, x in ((q_rot, q), (k_rot, k)):
        assert rel_err(a, kernels.apply_rotary(x.detach().double(), cos.double(), sin.double())) < TOL[DTYPES[0]] / 10


@needs_triton
@pytest.mark.parametrize("shape, eps", [((37, 512), 1e-5), ((3, 5, 300), 1e-6), ((2, 82, 512), 1e-5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(shape, eps, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    y = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    out = kernels.add_rms_norm_triton(x, y, eps)
    dout = torch.randn(shape, generator=g).to(DEVICE, dtype)
    out.backward(dout)
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = kernels.add_rms_norm_reference(x64, y64, eps)
    ref.backward(dout.double())
    assert out.shape == ref.shape and out.dtype == dtype
    for a, b in ((out, ref), (x.grad, x64.grad), (y.grad, y64.grad)):
        assert rel_err(a, b) < TOL[dtype]


@needs_triton
def test_add_rms_norm_gradients_accumulate_when_inputs_share_a_leaf():
    """The backward returns one tensor as both dx and dy; autograd must still add them correctly."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 64, generator=g).to(DEVICE, DTYPES[0]).requires_grad_()
    dout = torch.randn(4, 64, generator=g).to(DEVICE, DTYPES[0])
    kernels.add_rms_norm_triton(a * 2, a * 3, 1e-5).backward(dout)
    a64 = a.detach().double().requires_grad_()
    kernels.add_rms_norm_reference(a64 * 2, a64 * 3, 1e-5).backward(dout.double())
    assert rel_err(a.grad, a64.grad) < TOL[DTYPES[0]]


# -----------------------------------------------------------------------------
# backend selection

@pytest.fixture
def fresh_switch():
    kernels.set_use_flash(None)
    kernels._logged.clear()
    yield
    kernels.set_use_flash(None)


def attn_inputs(D=64, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 10, 2, D, generator=g).to(device, dtype) for _ in range(3))
    cos, sin = rope_tables(2, 10, D, False, g)
    return q, k, v, cos.to(device), sin.to(device)


def records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "hrm.attn"]


def test_cpu_tensors_fall_back_to_pytorch_and_log_once(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    q, k, v, cos, sin = attn_inputs()
    for _ in range(2):
        out = kernels.attention(q, k, v, cos, sin)
    assert torch.equal(out, kernels.attention_reference(q, k, v, cos, sin))
    msgs = records(caplog)
    assert len(msgs) == 1 and "PyTorch SDPA" in msgs[0] and "not CUDA" in msgs[0]
    x = torch.randn(3, 16)
    assert torch.equal(kernels.add_rms_norm(x, x, 1e-5), kernels.add_rms_norm_reference(x, x, 1e-5))


def test_unsupported_head_dim_falls_back(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    q, k, v, cos, sin = attn_inputs(D=48, device=DEVICE, dtype=DTYPES[-1])
    out = kernels.attention(q, k, v, cos, sin)
    assert torch.equal(out, kernels.attention_reference(q, k, v, cos, sin))
    assert any("head_dim 48" in m for m in records(caplog))


def test_forced_off(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(False)
    q, k, v, cos, sin = attn_inputs(device=DEVICE, dtype=DTYPES[-1])
    assert torch.equal(kernels.attention(q, k, v, cos, sin), kernels.attention_reference(q, k, v, cos, sin))
    assert any("forced off" in m for m in records(caplog))


@needs_triton
def test_forced_on_uses_the_kernel(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    q, k, v, cos, sin = attn_inputs(device=DEVICE, dtype=DTYPES[-1])
    out = kernels.attention(q.requires_grad_(), k, v, cos, sin)
    assert "FlashAttention" in type(out.grad_fn).__name__
    assert rel_err(out, kernels.attention_reference(q, k, v, cos, sin)) < TOL[DTYPES[-1]]
    msgs = records(caplog)
    assert len(msgs) == 1 and "triton" in msgs[0] and "forced on" in msgs[0]


def test_compiled_model_logs_its_choice_once(fresh_switch, caplog):
    """Inside torch.compile the choice is logged while the graph is traced, without a graph break
    (fullgraph), also from a function the compiled one calls, as a model's blocks do."""
    caplog.set_level(logging.INFO, logger="hrm.attn")
    q, k, v, cos, sin = attn_inputs()

    def block(q, k, v):
        return kernels.attention(q, k, v, cos, sin) * 2

    compiled = torch.compile(lambda q, k, v: block(q, k, v) + 1, fullgraph=True, backend="eager")
    for _ in range(3):
        out = compiled(q, k, v)
    torch._dynamo.reset()
    assert records(caplog) == ["attention: PyTorch SDPA (tensors are on cpu, not CUDA)"]
    assert torch.allclose(out, block(q, k, v) + 1)


def test_everything_imports_and_runs_without_triton():
    """With triton missing, the model runs on PyTorch, and forcing the kernels says why they are not used."""
    code = (
        "import sys, logging; sys.modules['triton'] = None\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "import torch, kernels, model, sample\n"
        "kernels.set_use_flash(True)\n"
        "q = torch.randn(1, 5, 2, 64)\n"
        "assert torch.equal(kernels.attention(q, q, q), kernels.attention_reference(q, q, q))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hrm.attn: attention: PyTorch SDPA (triton is not installed)" in result.stderr


def test_set_use_flash_rejects_other_values():
    with pytest.raises(AssertionError):
        kernels.set_use_flash("yes")


@pytest.mark.skipif(DEVICE != "cuda" or kernels.triton is None, reason="needs CUDA and triton")
def test_cuda_picks_the_kernel_automatically(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    q, k, v, cos, sin = attn_inputs(device="cuda", dtype=torch.bfloat16)
    out = kernels.attention(q.requires_grad_(), k, v, cos, sin)
    assert "FlashAttention" in type(out.grad_fn).__name__
    assert any("CUDA tensors" in m for m in records(caplog))
    assert math.isfinite(rel_err(out, kernels.attention_reference(q, k, v, cos, sin)))


# -----------------------------------------------------------------------------
# dataset.py: the shared format, safe writes, bad files, the dihedral transforms

def tiny_arrays(n=6, seq_len=4):
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 5, (n, seq_len))
    return dataset.puzzle_arrays(inputs, inputs[:, ::-1], examples_per_puzzle=1, puzzles_per_group=2)


def write_tiny_dataset(path):
    arrays = tiny_arrays()
    meta = dataset.metadata(arrays, "sudoku", vocab_size=5)
    return dataset.write_dataset(str(path), {"train": (arrays, meta), "test": (arrays, meta)}, ["<blank>"])


def test_puzzle_arrays_offsets():
    inputs = np.zeros((7, 3), np.uint8)
    a = dataset.puzzle_arrays(inputs, inputs, examples_per_puzzle=[2, 1, 3, 1], puzzles_per_group=[1, 3],
                              puzzle_identifiers=[5, 6, 6, 7])
    assert a["puzzle_indices"].tolist() == [0, 2, 3, 6, 7] and a["group_indices"].tolist() == [0, 1, 4]
    assert a["puzzle_identifiers"].dtype == np.int32 and a["puzzle_identifiers"].tolist() == [5, 6, 6, 7]
    meta = dataset.metadata(a, "arc", vocab_size=12, num_puzzle_identifiers=8)
    assert meta["mean_puzzle_examples"] == 7 / 4 and meta["total_groups"] == 2 and meta["seq_len"] == 3


@pytest.mark.parametrize("name", [".", "..", "", "a/b", "/abs/path"])
def test_dataset_names_that_are_not_plain_are_refused(tmp_path, name):
    with pytest.raises(dataset.DataError, match="must be a plain directory name"):
        dataset.dataset_path(str(tmp_path), name)


def test_a_directory_that_is_not_a_dataset_is_never_replaced(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("meow")
    with pytest.raises(dataset.DataError, match="exists and is not a dataset: not replacing it"):
        dataset.dataset_path(str(tmp_path), "photos")
    assert (tmp_path / "photos" / "cat.jpg").read_text() == "meow"
    (tmp_path / "file").write_text("x")
    with pytest.raises(dataset.DataError, match="is not a dataset"):
        dataset.dataset_path(str(tmp_path), "file")
    write_tiny_dataset(tmp_path / "ds")  # a dataset may be rebuilt in place
    assert dataset.dataset_path(str(tmp_path), "ds") == os.path.join(str(tmp_path), "ds")
    result = run_prepare("--name=.", f"--out_dir={tmp_path}", cwd=tmp_path)  # the command line says so too
    assert result.returncode == 1 and "must be a plain directory name" in result.stderr
    assert (tmp_path / "photos" / "cat.jpg").exists()


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead, alive = 999999999, os.getpid()
    for entry in (f".ds.tmp-{dead}", f".ds.old-{dead}", f".ds.tmp-{alive}"):
        (tmp_path / entry).mkdir()
    (tmp_path / f"ckpt.pt.tmp-{dead}").write_text("half a checkpoint")
    (tmp_path / "notes.tmp-1").write_text("not ours: no leading dot")
    dataset.remove_stale_temp_files(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [f".ds.tmp-{alive}", "notes.tmp-1"]


def test_puzzle_data_round_trip(tmp_path):
    write_tiny_dataset(tmp_path / "ds")
    data = dataset.PuzzleData(str(tmp_path / "ds" / "train"))
    arrays = tiny_arrays()
    assert np.array_equal(data.inputs, arrays["inputs"]) and data.num_groups == 3 and data.num_examples == 6
    assert data.meta["task"] == "sudoku"
    batch = data.batch(np.array([0, 5]), np.array([0, 5]), pad_to=4)
    assert batch["inputs"].shape == (4, 4) and (batch["labels"][2:] == dataset.IGNORE_LABEL_ID).all()


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "dataset.json").write_text("{not json"), "dataset.json: not valid JSON"),
    (lambda d: (d / "dataset.json").write_text('{"pad_id": 0}'), "dataset.json: blank_identifier_id is None, expected int"),
    (lambda d: (d / "all__inputs.npy").write_bytes((d / "all__inputs.npy").read_bytes()[:100]),
     "all__inputs.npy: not a readable .npy array"),
    (lambda d: (d / "all__labels.npy").unlink(), "all__labels.npy: no such file"),
    (lambda d: np.save(d / "all__labels.npy", np.zeros((6, 3), np.uint8)), "labels.npy has shape (6, 3), inputs.npy (6, 4)"),
    (lambda d: np.save(d / "all__puzzle_indices.npy", np.array([0, 2, 1, 6], np.int32)), "puzzle_indices.npy is not increasing"),
    (lambda d: np.save(d / "all__inputs.npy", np.full((6, 4), 9, np.uint8)), "tokens outside 0..vocab_size-1"),
])
def test_damaged_dataset_files_are_named(tmp_path, damage, reason):
    write_tiny_dataset(tmp_path / "ds")
    damage(tmp_path / "ds" / "train")
    with pytest.raises(dataset.DataError) as e:
        dataset.PuzzleData(str(tmp_path / "ds" / "train"))
    assert str(tmp_path / "ds" / "train") in str(e.value) and reason in str(e.value), str(e.value)


def test_dihedral_transforms_and_inverses():
    grid = np.arange(12).reshape(3, 4)
    seen = set()
    for t in range(8):
        moved = dataset.dihedral(grid, t)
        assert np.array_equal(dataset.inverse_dihedral(moved, t), grid)
        seen.add(moved.tobytes() + bytes(moved.shape))
        stack = dataset.dihedral(np.stack([grid, grid + 1]), t)  # batches transform grid by grid
        assert np.array_equal(stack[1], moved + 1)
    assert len(seen) == 8
    # the original's numbering: 1 = rot90 counter-clockwise, 4 = left-right mirror, 6 = transpose
    assert np.array_equal(dataset.dihedral(grid, 1), np.rot90(grid)) and np.array_equal(dataset.dihedral(grid, 6), grid.T)
    assert np.array_equal(dataset.dihedral(grid, 4), grid[:, ::-1]) and np.array_equal(dataset.dihedral(grid, 7), np.rot90(grid, 1)[:, ::-1])


def test_read_csv_bom_crlf_and_errors(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbfquestion,answer\r\n q1 ,a1\r\n\r\nq2,a2\r\n")
    assert list(dataset.read_csv(str(path), ("question", "answer"))) == [(2, {"question": "q1", "answer": "a1"}),
                                                                          (4, {"question": "q2", "answer": "a2"})]
    path.write_bytes(b"question,answer\nq1,\xff\xfe\n")
    with pytest.raises(dataset.DataError, match="line 2: not UTF-8 text"):
        list(dataset.read_csv(str(path), ("question",)))
    path.write_text('question,answer\n"q1,a1\n')
    with pytest.raises(dataset.DataError, match="malformed CSV"):
        list(dataset.read_csv(str(path), ("question",)))
    with pytest.raises(dataset.DataError, match="no such file"):
        list(dataset.read_csv(str(tmp_path / "none.csv"), ("question",)))


# -----------------------------------------------------------------------------
# download

@pytest.fixture
def http_server():
    """A local HTTP server over the shipped sample directory; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=os.path.dirname(SAMPLE_TRAIN))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download(tmp_path, http_server):
    dest = tmp_path / "dl" / "train.csv"
    dataset.download(f"{http_server}/train.csv", str(dest), show_progress=False)
    assert dest.read_bytes() == open(SAMPLE_TRAIN, "rb").read()
    assert os.listdir(tmp_path / "dl") == ["train.csv"]  # no .part file left
    with pytest.raises(dataset.DataError, match="HTTP 404"):
        dataset.download(f"{http_server}/nope.csv", str(tmp_path / "dl" / "nope.csv"), show_progress=False)
    assert os.listdir(tmp_path / "dl") == ["train.csv"]


def test_download_offline_is_a_clear_error(tmp_path):
    import socket
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_prepare("--source=hf", f"--hf_url=http://127.0.0.1:{port}", "--download_dir=dl", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"prepare_sudoku.py: could not download http://127.0.0.1:{port}/train.csv")
    assert "offline?" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path / "dl") == []


def test_source_hf_end_to_end(tmp_path, http_server):
    args = ("--source=hf", f"--hf_url={http_server}", "--download_dir=dl", "--subsample_size=4", "--num_aug=1")
    result = run_prepare(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "dl")) == ["test.csv", "train.csv"]
    meta, _ = load_split(tmp_path / "data" / "sudoku-extreme-4-aug-1" / "train")
    assert meta["total_groups"] == 4
    result = run_prepare(*args, cwd=tmp_path)  # a second run reuses the files
    assert result.returncode == 0 and "downloaded before" in result.stdout


# -----------------------------------------------------------------------------
# prepare_sudoku.py

SAMPLE_TRAIN = os.path.join(HERE, "assets", "sudoku", "train.csv")
SAMPLE_TEST = os.path.join(HERE, "assets", "sudoku", "test.csv")
SHARED_SUDOKU = os.path.join(HERE, "..", "shared", "data", "sudoku")  # only for an optional test
HEADER = ["source", "question", "answer", "rating"]


def read_rows(path, limit=None):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[:limit] if limit else rows


def write_csv(path, rows, header=HEADER):
    """rows: dicts, or lists written as they are (to make ragged rows)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row[c] for c in header] if isinstance(row, dict) else row)
    return str(path)


def quiet(*args, **kwargs):
    pass


def run_prepare(*args, cwd, script="prepare_sudoku.py"):
    return subprocess.run([sys.executable, os.path.join(HERE, script), "--progress=False", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def load_split(path):
    with open(os.path.join(path, "dataset.json")) as f:
        meta = json.load(f)
    return meta, {k: np.load(os.path.join(path, f"all__{k}.npy")) for k in dataset.ARRAYS}


def problem(question, answer=None):
    """The one checker on one grid: the sentence, or None."""
    found = ps.grid_problems(np.asarray(question)[None], None if answer is None else np.asarray(answer)[None])[0]
    return found and found[1]


def valid_by_sets(question, answer):
    """An independent oracle for the tests: every unit of the answer holds 1..9, and the clues are kept."""
    grid = np.asarray(answer).reshape(9, 9)
    units = list(grid) + list(grid.T) + [grid[r:r + 3, c:c + 3].ravel() for r in (0, 3, 6) for c in (0, 3, 6)]
    return all(set(u.tolist()) == set(range(1, 10)) for u in units) and \
        all(q in (0, a) for q, a in zip(np.asarray(question).ravel(), grid.ravel()))


@pytest.fixture(scope="module")
def puzzles():
    """(questions, answers) digit arrays of the first 40 shipped training puzzles."""
    rows = read_rows(SAMPLE_TRAIN, 40)
    return (np.stack([ps.parse_puzzle(r["question"]) for r in rows]),
            np.stack([ps.parse_puzzle(r["answer"], answer=True) for r in rows]))


def test_parse_puzzle_reads_blanks_and_digits():
    row = read_rows(SAMPLE_TRAIN, 1)[0]
    grid = ps.parse_puzzle(row["question"])
    assert grid.shape == (81,) and grid.min() >= 0 and grid.max() <= 9
    assert np.array_equal(ps.parse_puzzle("  " + row["question"].replace(".", "0") + "\n"), grid)
    assert (grid == 0).sum() == row["question"].count(".")
    assert valid_by_sets(grid, ps.parse_puzzle(row["answer"], answer=True))


@pytest.mark.parametrize("text, answer, reason", [
    ("1" * 80, False, "expected 81 characters, got 80"),
    ("." * 40 + "x" + "." * 40, False, "character 'x' at row 5, col 5 is not 1-9, '.' or '0'"),
    ("." * 40 + "é" + "." * 40, False, "character 'é' at row 5, col 5 is not 1-9, '.' or '0'"),
    ("1" * 80 + ".", True, "character '.' at row 9, col 9 is not a digit 1-9"),
    ("1" * 9 + "0" + "1" * 71, True, "character '0' at row 2, col 1 is not a digit 1-9"),
    ("44" + "." * 79, False, "question's clues conflict: digit 4 appears twice in row 1"),
])
def test_parse_puzzle_errors(text, answer, reason):
    with pytest.raises(ValueError) as e:
        ps.parse_puzzle(text, answer=answer)
    assert str(e.value) == reason


def test_grid_problems_name_row_column_and_box(puzzles):
    grid = np.zeros(81, dtype=np.int16)
    assert problem(grid) is None
    row = grid.copy(); row[[9, 17]] = 5
    assert problem(row) == "question's clues conflict: digit 5 appears twice in row 2"
    col = grid.copy(); col[[3, 75]] = 7
    assert problem(col).endswith("digit 7 appears twice in column 4")
    box = grid.copy(); box[[30, 50]] = 2  # (3, 3) and (5, 5): the middle box, different row and column
    assert problem(box).endswith("digit 2 appears twice in box 5 (rows 4-6, cols 4-6)")
    thrice = grid.copy(); thrice[[0, 1, 2]] = 1
    assert problem(thrice).endswith("digit 1 appears 3 times in row 1")

    question, answer = puzzles[0][0], puzzles[1][0]
    assert problem(question, answer) is None
    blank = answer.copy(); blank[40] = 0
    assert problem(question, blank) == "answer leaves row 5, col 5 blank"
    clue = int(np.flatnonzero(question)[0])
    d, e = answer[clue], answer[clue] % 9 + 1  # swap the labels d and e: a valid grid that breaks the clue
    relabelled = np.where(answer == d, e, np.where(answer == e, d, answer))
    assert problem(question, relabelled).startswith(
        f"answer contradicts clue at row {clue // 9 + 1}, col {clue % 9 + 1} (clue {answer[clue]}, answer ")
    swapped = answer.copy(); swapped[[0, 1]] = swapped[[1, 0]]  # row intact, columns 1 and 2 now repeat
    assert problem(np.zeros(81, np.int16), swapped).startswith("answer is not a valid Sudoku: digit ")
    assert "column 1" in problem(np.zeros(81, np.int16), swapped)


def test_the_checker_agrees_with_an_independent_oracle(puzzles):
    """Random single-cell corruptions of questions and answers: the checker flags exactly the pairs that are
    not a valid solution keeping the clues, or whose clues repeat a digit."""
    rng = np.random.default_rng(0)
    questions, answers = np.repeat(puzzles[0], 10, 0), np.repeat(puzzles[1], 10, 0)
    for grid in (questions, answers):
        rows = rng.random(len(grid)) < 0.4
        grid[rows, rng.integers(0, 81, rows.sum())] = rng.integers(0, 10, rows.sum())
    found = ps.grid_problems(questions, answers)
    expected = [not valid_by_sets(q, a) for q, a in zip(questions, answers)]  # (kept clues of a valid grid never repeat)
    assert [f is not None for f in found] == expected and 50 < sum(expected) < 300


def test_format_grid_and_tokens():
    grid = ps.parse_puzzle("12345678." + "." * 72)
    lines = ps.format_grid(grid).split("\n")
    assert len(lines) == 11 and lines[3] == lines[7] == "------+-------+------"
    assert lines[0] == "1 2 3 | 4 5 6 | 7 8 ." and lines[10] == ". . . | . . . | . . ."
    digits = np.arange(81) % 10
    tokens = ps.encode(digits)
    assert tokens.dtype == np.uint8 and tokens.min() == 1 and tokens.max() == 10
    assert np.array_equal(ps.decode(tokens), digits) and ps.decode(np.array([0]))[0] == 0  # PAD reads as blank


def test_import_has_no_side_effects(tmp_path):
    for module in ("prepare_sudoku", "dataset", "sample"):
        result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import {module}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout == "" and result.stderr == "", module
    assert os.listdir(tmp_path) == []


def test_transforms_are_cell_bijections_and_digit_permutations():
    cell_source, digit_map = ps.random_transforms(2000, np.random.default_rng(0))
    assert cell_source.shape == (2000, 81) and digit_map.shape == (2000, 10)
    assert (np.sort(cell_source, axis=1) == np.arange(81)).all()
    assert (digit_map[:, 0] == 0).all() and (np.sort(digit_map[:, 1:], axis=1) == np.arange(1, 10)).all()
    # The cells of a new row come from one old row (no transpose) or one old column (transpose), about half each.
    from_one_row = (cell_source[:, :9] // 9 == cell_source[:, :1] // 9).all(axis=1)
    from_one_col = (cell_source[:, :9] % 9 == cell_source[:, :1] % 9).all(axis=1)
    assert (from_one_row ^ from_one_col).all() and 800 < from_one_col.sum() < 1200
    corner = np.bincount(cell_source[:, 0], minlength=81)  # any old cell can land in the corner, uniformly
    assert corner.min() >= 5 and corner.max() <= 55


def test_augmented_puzzles_are_valid(puzzles):
    questions, answers = puzzles
    num_aug = 50
    inputs, labels = ps.augment(questions, answers, num_aug, np.random.default_rng(1))
    assert inputs.shape == labels.shape == (40 * (1 + num_aug), 81) and inputs.dtype == labels.dtype == np.uint8
    groups_in, groups_lab = inputs.reshape(40, 1 + num_aug, 81), labels.reshape(40, 1 + num_aug, 81)
    assert np.array_equal(groups_in[:, 0], questions) and np.array_equal(groups_lab[:, 0], answers)
    assert ((groups_in > 0).sum(axis=2) == (questions > 0).sum(axis=1)[:, None]).all()  # clue count unchanged
    assert all(p is None for p in ps.grid_problems(inputs, labels))
    assert all(valid_by_sets(inputs[i], labels[i]) for i in range(0, len(inputs), 97))
    assert (groups_in[:, 1:] != groups_in[:, :1]).any(axis=2).mean() > 0.99
    a = ps.augment(questions, answers, 5, np.random.default_rng(7))
    b = ps.augment(questions, answers, 5, np.random.default_rng(7))
    c = ps.augment(questions, answers, 5, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])


NUM_AUG = 3


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    """20 training puzzles x (1 + 3) and 10 test puzzles, built from the shipped sample."""
    root = tmp_path_factory.mktemp("build")
    train_rows, test_rows = read_rows(SAMPLE_TRAIN, 20), read_rows(SAMPLE_TEST, 10)
    train_csv, test_csv = write_csv(root / "train.csv", train_rows), write_csv(root / "test.csv", test_rows)
    out = root / "data" / "sudoku-small"
    ps.build_dataset(train_csv, test_csv, str(out), num_aug=NUM_AUG, seed=0, log=quiet)
    return out, train_rows, test_rows


def test_output_layout_matches_the_original(small_build):
    out, train_rows, test_rows = small_build
    assert sorted(os.listdir(out)) == ["identifiers.json", "test", "train"]
    with open(out / "identifiers.json") as f:
        assert json.load(f) == ["<blank>"]
    assert not [e for e in os.listdir(out.parent) if e.startswith(".")]  # no temporary directory left
    for split, groups, per_group in (("train", 20, 1 + NUM_AUG), ("test", 10, 1)):
        assert sorted(os.listdir(out / split)) == ["all__group_indices.npy", "all__inputs.npy", "all__labels.npy",
                                                   "all__puzzle_identifiers.npy", "all__puzzle_indices.npy",
                                                   "dataset.json"]
        meta, a = load_split(out / split)
        n = groups * per_group
        # The fields of the original's PuzzleDatasetMetadata, with the original's values for Sudoku.
        assert {k: meta[k] for k in ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                                     "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "sets")} == \
            dict(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=11, seq_len=81,
                 num_puzzle_identifiers=1, total_groups=groups, mean_puzzle_examples=1, sets=["all"])
        assert meta["num_puzzles"] == meta["num_examples"] == n and meta["task"] == "sudoku"
        assert meta["build"]["num_aug"] == (NUM_AUG if split == "train" else 0) and meta["build"]["seed"] == 0
        assert a["inputs"].dtype == a["labels"].dtype == np.uint8 and a["inputs"].shape == a["labels"].shape == (n, 81)
        for k in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
            assert a[k].dtype == np.int32 and a[k].ndim == 1
        assert np.array_equal(a["puzzle_identifiers"], np.zeros(n))
        assert np.array_equal(a["puzzle_indices"], np.arange(n + 1))  # one example per puzzle
        assert np.array_equal(a["group_indices"], np.arange(0, n + 1, per_group))
        assert a["inputs"].min() >= 1 and a["inputs"].max() <= 10      # never PAD
        assert a["labels"].min() >= 2 and a["labels"].max() <= 10      # always a digit


def test_output_decodes_to_the_csv(small_build):
    out, train_rows, test_rows = small_build
    _, train = load_split(out / "train")
    _, test = load_split(out / "test")
    for arrays, rows, picks in ((train, train_rows, train["group_indices"][:-1]), (test, test_rows, np.arange(10))):
        for row, i in zip(rows, picks, strict=True):
            assert np.array_equal(ps.decode(arrays["inputs"][i]), ps.parse_puzzle(row["question"]))
            assert np.array_equal(ps.decode(arrays["labels"][i]), ps.parse_puzzle(row["answer"], answer=True))
    assert all(p is None for p in ps.grid_problems(ps.decode(train["inputs"]), ps.decode(train["labels"])))


def test_subsample_min_difficulty_and_seed(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, 60)
    train_csv = write_csv(tmp_path / "train.csv", rows)
    test_csv = write_csv(tmp_path / "test.csv", read_rows(SAMPLE_TEST, 30))
    build = functools.partial(ps.build_dataset, train_csv, test_csv, log=quiet)
    build(str(tmp_path / "a"), subsample_size=7, num_aug=2, seed=5)
    build(str(tmp_path / "b"), subsample_size=7, num_aug=2, seed=5)
    build(str(tmp_path / "c"), subsample_size=7, num_aug=2, seed=6)
    a, b, c = (load_split(tmp_path / x / "train")[1] for x in "abc")
    assert a["inputs"].shape == (21, 81) and len(a["group_indices"]) == 8
    assert np.array_equal(a["inputs"], b["inputs"]) and not np.array_equal(a["inputs"], c["inputs"])
    csv_questions = {row["question"].replace(".", "0") for row in rows}
    for i in a["group_indices"][:-1]:  # the originals are rows of the CSV
        assert "".join(map(str, ps.decode(a["inputs"][i]))) in csv_questions

    ratings = sorted(int(r["rating"]) for r in rows)
    cut = ratings[len(ratings) // 2]
    build(str(tmp_path / "d"), subsample_size=0, num_aug=0, min_difficulty=cut)
    assert load_split(tmp_path / "d" / "train")[0]["total_groups"] == sum(r >= cut for r in ratings)
    test_ratings = [int(r["rating"]) for r in read_rows(SAMPLE_TEST, 30)]
    assert load_split(tmp_path / "d" / "test")[0]["total_groups"] == sum(r >= cut for r in test_ratings)
    assert ps.default_name(1000, 1000, 0) == "sudoku-extreme-1k-aug-1000"
    assert ps.default_name(0, 0, 0) == "sudoku-extreme-full"
    assert ps.default_name(250, 8, 20) == "sudoku-extreme-250-diff-20-aug-8"


def test_command_line_build(tmp_path):
    result = run_prepare("--subsample_size=5", "--num_aug=2", f"--out_dir={tmp_path / 'data'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "sudoku-extreme-5-aug-2"
    assert "train: 5 puzzles -> 15 examples in 5 groups" in result.stdout
    assert "test: 1,000 puzzles" in result.stdout and str(out) in result.stdout
    meta, a = load_split(out / "train")  # the shipped sample was found beside the script, not in cwd
    assert meta["total_groups"] == 5 and a["inputs"].shape == (15, 81)
    assert meta["build"]["csv"] == os.path.abspath(SAMPLE_TRAIN)


def corrupt(row, kind):
    """A copy of a good row made bad in one way, and the reason expected in the error."""
    src, q, a, r = row["source"], row["question"], row["answer"], row["rating"]
    clue = next(i for i, ch in enumerate(q) if ch != ".")
    blanks = [i for i, ch in enumerate(q) if ch == "."]
    if kind == "too few fields":
        return [src, q, a], "expected 4 fields (source,question,answer,rating), got 3"
    if kind == "too many fields":
        return [src, q, a, r, "x"], "expected 4 fields (source,question,answer,rating), got 5"
    if kind == "short question":
        return [src, q[:80], a, r], "question: expected 81 characters, got 80"
    if kind == "long answer":
        return [src, q, a + "1", r], "answer: expected 81 characters, got 82"
    if kind == "bad question character":
        i = blanks[0]
        return [src, q[:i] + "x" + q[i + 1:], a, r], f"question: character 'x' at row {i // 9 + 1}, col {i % 9 + 1}"
    if kind == "non-ASCII question character":
        i = blanks[0]
        return [src, q[:i] + "é" + q[i + 1:], a, r], "question: character 'é' at row"
    if kind == "blank in answer":
        return [src, q, "." + a[1:], r], "answer: character '.' at row 1, col 1 is not a digit 1-9"
    if kind == "zero in answer":
        return [src, q, a[:80] + "0", r], "answer: character '0' at row 9, col 9 is not a digit 1-9"
    if kind == "conflicting clues":
        # A blank in the clue's row set to the clue's digit: the row now holds that digit twice.
        i = next(k for k in blanks if k // 9 == clue // 9)
        return ([src, q[:i] + q[clue] + q[i + 1:], a, r],
                f"question's clues conflict: digit {q[clue]} appears twice in row {clue // 9 + 1}")
    if kind == "answer contradicts clue":
        d, e = a[clue], "1" if a[clue] != "1" else "2"  # swap two digit labels: still a valid grid
        return [src, q, a.translate(str.maketrans(d + e, e + d)), r], \
            f"answer contradicts clue at row {clue // 9 + 1}, col {clue % 9 + 1} (clue {d}, answer {e})"
    if kind == "answer not a valid grid":
        # Swap two differing answer cells of one row that are both blank in the question: the row is still a
        # permutation, the clues still hold, but two columns now repeat a digit.
        i, j = next((i, j) for i in blanks for j in blanks if i < j and i // 9 == j // 9 and a[i] != a[j])
        bad = list(a); bad[i], bad[j] = bad[j], bad[i]
        return [src, q, "".join(bad), r], "answer is not a valid Sudoku: digit "
    if kind == "rating not an integer":
        return [src, q, a, "hard"], "rating 'hard' is not an integer"
    if kind == "fractional rating":
        return [src, q, a, "12.5"], "rating '12.5' is not an integer"
    raise ValueError(kind)


BAD_KINDS = ["too few fields", "too many fields", "short question", "long answer", "bad question character",
             "non-ASCII question character", "blank in answer", "zero in answer", "conflicting clues",
             "answer contradicts clue", "answer not a valid grid", "rating not an integer", "fractional rating"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_row_stops_with_file_line_and_reason(tmp_path, kind):
    rows = read_rows(SAMPLE_TRAIN, 6)
    bad, reason = corrupt(rows[2], kind)
    path = write_csv(tmp_path / "bad.csv", [rows[0], rows[1], bad, rows[3], rows[4]])  # bad one on line 4
    with pytest.raises(dataset.DataError) as e:
        ps.read_sudoku_csv(path)
    assert str(e.value).startswith(f"{path} line 4: {reason}"), str(e.value)
    skipped = dataset.BadRows(skip_bad=True)
    questions, _, _, lines = ps.read_sudoku_csv(path, bad=skipped)
    assert len(questions) == 4 and sum(skipped.counts.values()) == 1 and list(lines) == [2, 3, 5, 6]


def test_bad_row_on_the_command_line_is_one_clean_line(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, 4)
    bad, reason = corrupt(rows[1], "answer contradicts clue")
    write_csv(tmp_path / "train.csv", [rows[0], bad, rows[2]])
    write_csv(tmp_path / "test.csv", rows[:2])
    result = run_prepare("--train_csv=train.csv", "--test_csv=test.csv", "--num_aug=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"prepare_sudoku.py: train.csv line 3: {reason}\n"
    assert not os.path.exists(tmp_path / "data")  # nothing written, not even the parent directory
    result = run_prepare("--train_csv=train.csv", "--test_csv=test.csv", "--num_aug=1", "--skip_bad=True",
                         "--name=skipped", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train.csv: 2 puzzles" in result.stdout
    assert "skipped 1 x answer contradicts clues, e.g. train.csv line 3" in result.stdout
    meta, _ = load_split(tmp_path / "data" / "skipped" / "train")
    assert meta["total_groups"] == 2 and meta["build"]["rows_skipped"] == {"answer contradicts clues": 1}
    result = run_prepare("--train_csv=missing.csv", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == "prepare_sudoku.py: missing.csv: no such file\n"


def test_skip_bad_counts_every_reason(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, len(BAD_KINDS) + 5)
    mixed = [rows[0]] + [corrupt(rows[i + 1], kind)[0] for i, kind in enumerate(BAD_KINDS)] + rows[-4:]
    path = write_csv(tmp_path / "mixed.csv", mixed)
    bad = dataset.BadRows(skip_bad=True)
    questions, _, _, _ = ps.read_sudoku_csv(path, bad=bad, chunk_rows=4)  # chunks smaller than the file
    assert len(questions) == 5
    assert bad.counts == {"wrong number of fields": 2, "bad question": 3, "bad answer": 3, "clues conflict": 1,
                          "answer contradicts clues": 1, "answer not a valid Sudoku": 1, "rating not an integer": 2}
    assert bad.examples["clues conflict"].startswith(f"{path} line 11: question's clues conflict")
    with pytest.raises(dataset.DataError, match=r"line 3: expected 4 fields"):
        ps.read_sudoku_csv(path)  # without skip_bad: the first bad line


@pytest.mark.parametrize("text, reason", [
    ("", "line 1: empty file"),
    ("source,question,rating\n", "line 1: the header has no answer column"),
    ("question,answer\n", "no usable puzzles"),
])
def test_bad_header(tmp_path, text, reason):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(dataset.DataError, match=reason):
        ps.read_sudoku_csv(str(path))


def test_optional_columns_and_min_difficulty_needs_rating(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, 3)
    path = write_csv(tmp_path / "qa.csv", [{"question": r["question"], "answer": r["answer"]} for r in rows],
                     header=["question", "answer"])
    questions, _, ratings, _ = ps.read_sudoku_csv(path)
    assert len(questions) == 3 and (ratings == -1).all()
    with pytest.raises(dataset.DataError, match="min_difficulty needs a rating column"):
        ps.read_sudoku_csv(path, min_difficulty=5)


@pytest.mark.skipif(not os.path.isdir(SHARED_SUDOKU), reason="the project's shared data is not here")
def test_the_full_shared_files_are_valid():
    for name, count in (("train.csv", 43100), ("test.csv", 5000)):
        bad = dataset.BadRows(skip_bad=True)
        assert len(ps.read_sudoku_csv(os.path.join(SHARED_SUDOKU, name), bad=bad)[0]) == count and not bad.counts


def snapshot(path):
    """{relative file: sha256} of a directory tree."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def tiny_csvs(tmp_path):
    return (write_csv(tmp_path / "train.csv", read_rows(SAMPLE_TRAIN, 8)),
            write_csv(tmp_path / "test.csv", read_rows(SAMPLE_TEST, 4)))


def fail_on_test_split(monkeypatch):
    """Make the build fail when it writes the test split (the training split is on disk by then)."""
    save = np.save

    def failing_save(path, *args, **kwargs):
        if f"{os.sep}test{os.sep}" in str(path):
            raise RuntimeError("simulated failure")
        return save(path, *args, **kwargs)
    monkeypatch.setattr(dataset.np, "save", failing_save)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_build_leaves_nothing(tmp_path, tiny_csvs, monkeypatch, error):
    out = tmp_path / "data" / "ds"
    if error is RuntimeError:
        fail_on_test_split(monkeypatch)
    else:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(ps, "augment", interrupted)
    with pytest.raises(error):
        ps.build_dataset(*tiny_csvs, str(out), num_aug=2, log=quiet)
    assert not os.path.exists(tmp_path / "data") or os.listdir(tmp_path / "data") == []


def test_failed_rebuild_keeps_the_old_dataset(tmp_path, tiny_csvs, monkeypatch):
    out = tmp_path / "data" / "ds"
    ps.build_dataset(*tiny_csvs, str(out), num_aug=2, seed=0, log=quiet)
    before = snapshot(out)
    fail_on_test_split(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        ps.build_dataset(*tiny_csvs, str(out), num_aug=5, seed=1, log=quiet)
    assert snapshot(out) == before and os.listdir(tmp_path / "data") == ["ds"]


def test_rebuild_replaces_the_dataset_and_cleans_up(tmp_path, tiny_csvs):
    out = tmp_path / "data" / "ds"
    ps.build_dataset(*tiny_csvs, str(out), num_aug=2, seed=0, log=quiet)
    stale = tmp_path / "data" / ".other.tmp-999999999"  # left by a build killed hard (no such process)
    stale.mkdir()
    (stale / "junk").write_text("x")
    ps.build_dataset(*tiny_csvs, str(out), num_aug=5, seed=1, log=quiet)
    assert os.listdir(tmp_path / "data") == ["ds"]
    meta, a = load_split(out / "train")
    assert meta["build"]["num_aug"] == 5 and a["inputs"].shape == (8 * 6, 81)


def test_sigterm_mid_build_leaves_nothing(tmp_path):
    """A real interruption: SIGTERM to the script while it augments 1M puzzles."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "prepare_sudoku.py"), "--progress=False",
                             f"--out_dir={tmp_path / 'data'}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(tmp_path / "data") and any(e.startswith(".") for e in os.listdir(tmp_path / "data")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the build finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM
    assert os.listdir(tmp_path / "data") == []


# -----------------------------------------------------------------------------
# prepare_timeseries.py and the forecasting model

SHARED_ETTH1 = os.path.join(HERE, "..", "shared", "data", "timeseries", "ETTh1.csv")  # only for an optional test


def write_series_csv(path, rows, header=("date", "a", "b")):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


def hourly(n, start="2021-03-01T00:00"):
    return np.datetime64(start, "s") + np.arange(n) * np.timedelta64(1, "h")


def build_indexed_series(tmp_path, n=200, borders="0.7,0.1,0.2"):
    """A series whose first variable is its row number and second ten times it, plus 1000 from the
    validation part on: windows and statistics can be read off it."""
    values = np.stack([np.arange(n), 10 * np.arange(n)], 1).astype(np.float64)
    values[int(n * 0.7):] += 1000
    path = str(tmp_path / "data" / "indexed")
    pt.build_series(hourly(n), values, ["a", "b"], path, borders, log=quiet)
    return dataset.SeriesData(path), values


def test_windows_follow_the_borders_and_only_training_rows_set_the_scale(tmp_path):
    series, raw = build_indexed_series(tmp_path)
    assert series.borders == [140, 160, 200] and series.meta["task"] == "timeseries"
    assert np.allclose(series.mean, raw[:140].mean(0)) and np.allclose(series.std, raw[:140].std(0))
    L, H = 24, 8
    for split, first_target, last_target, count in (("train", L, 139, 140 - L - H + 1), ("val", 140, 159, 20 - H + 1),
                                                     ("test", 160, 199, 40 - H + 1)):
        windows = dataset.Windows(series, split, L, H)
        batch = windows.batch(np.arange(windows.num_examples), pad_to=windows.num_examples + 3)
        rows = np.rint(batch["inputs"][..., 0] * series.std[0] + series.mean[0]) % 1000  # back to row numbers
        targets = np.rint(batch["labels"][..., 0] * series.std[0] + series.mean[0]) % 1000
        valid = batch["valid"]
        assert windows.num_examples == count and valid.sum() == count and not valid[count:].any()
        # the history, then the targets right after it: no gap, no overlap
        assert (np.diff(rows[valid], axis=1) == 1).all() and (targets[valid][:, 0] == rows[valid][:, -1] + 1).all()
        assert targets[valid].min() == first_target and targets[valid].max() == last_target
        assert np.array_equal(batch["input_marks"][valid], series.calendar[rows[valid].astype(int)])
        assert np.array_equal(batch["target_marks"][valid], series.calendar[targets[valid].astype(int)])
    # ETT's protocol: 12/4/4 months of 30 days; windows of 96 -> 96 as the literature counts them
    assert pt.split_borders("ett", 17420, 3600) == [8640, 11520, 14400]
    assert pt.split_borders("ett", 69680, 900) == [34560, 46080, 57600]
    assert pt.split_borders("0.7,0.1,0.2", 1001, 3600) == [700, 801, 1001]
    assert pt.split_borders("100,150,190", 200, 3600) == [100, 150, 190]
    for spec in ("0.7,0.2", "0.5,0.1,0.2", "150,100,190", "100,150,250", "ett", "x"):
        with pytest.raises(dataset.DataError, match="borders="):
            pt.split_borders(spec, 200, 3600 if spec != "ett" else 7)
    with pytest.raises(dataset.DataError, match="the val part .* too short for one window of input_len=24 \\+ horiz"):
        dataset.Windows(series, "val", 24, 30)


def test_calendar_features():
    stamps = np.array(["2016-07-01T00:00", "2016-12-31T23:00", "2017-01-02T12:30", "2024-02-29T06:00"], "datetime64[s]")
    features = pt.calendar_features(stamps)
    assert features.dtype == np.float32 and features.shape == (4, len(dataset.CALENDAR))
    for row, stamp in zip(features, stamps.astype(object)):
        expected = [stamp.hour / 23, stamp.weekday() / 6, (stamp.day - 1) / 30, (stamp.timetuple().tm_yday - 1) / 365,
                    (stamp.month - 1) / 11]
        assert np.allclose(row, np.array(expected) - 0.5, atol=1e-6), stamp
    assert features[1].tolist() == pytest.approx([0.5, 5 / 6 - 0.5, 0.5, 0.5, 0.5])  # a Saturday, day 366
    year = pt.calendar_features(hourly(24 * 366, "2020-01-01T00:00"))
    assert year.min() == -0.5 and year.max() == 0.5


@pytest.mark.parametrize("rows, fill, message", [
    ([["2021-03-01 00:00", "1", "2"], ["2021-03-01 01:00", "", "3"]], "", "line 3: a is missing (''); --fill=ffill"),
    ([["2021-03-01 00:00", "1", "2"], ["2021-03-01 01:00", "NaN", "3"]], "", "line 3: a is missing ('NaN')"),
    ([["2021-03-01 00:00", "1", "2"], ["2021-03-01 01:00", "1.5kW", "3"]], "ffill", "line 3: a is '1.5kW', not a"),
    ([["2021-03-01 00:00", "1", "inf"]], "", "line 2: b is 'inf', not a finite number"),
    ([["2021-03-01 01:00", "1", "2"], ["2021-03-01 00:00", "1", "3"]], "",
     "line 3: date 2021-03-01 00:00:00 is earlier than line 2's 2021-03-01 01:00:00: rows must be in time order"),
    ([["2021-03-01 00:00", "1", "2"], ["2021-03-01 00:00", "1", "3"]], "", "line 3: date 2021-03-01 00:00:00 repeats"),
    ([["01/03/2021", "1", "2"]], "", "line 2: date '01/03/2021' is not a date and time"),
    ([["2021-03-01 00:00", "", "2"], ["2021-03-01 01:00", "1", "3"]], "ffill", "line 2: a is missing and no row"),
    ([["2021-03-01 00:00", "1", "2", "9"]], "", "line 2: expected 3 fields"),
    ([], "", "no rows"),
])
def test_bad_rows_are_named(tmp_path, rows, fill, message):
    path = write_series_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(dataset.DataError) as error:
        pt.read_series(path, fill=fill)
    assert str(error.value).startswith(path) and message in str(error.value)


def test_fill_and_columns(tmp_path):
    rows = [["2021-03-01 00:00", "1", "10", "x"], ["2021-03-01 01:00", "", "NA", "x"], ["2021-03-01 03:00", "4", "40", "x"]]
    path = write_series_csv(tmp_path / "gaps.csv", rows, header=("date", "a", "b", "note"))
    stamps, values, names = pt.read_series(path, columns=["a", "b"], fill="ffill")
    assert names == ["a", "b"] and values.tolist() == [[1, 10], [1, 10], [4, 40]]
    _, values, _ = pt.read_series(path, columns=["b", "a"], fill="linear")  # interpolated in time: 1 h of 3
    assert values.tolist() == [[10, 1], [20, 2], [40, 4]] and stamps[2] == np.datetime64("2021-03-01T03:00")
    with pytest.raises(dataset.DataError, match="line 2: note is 'x', not a number"):
        pt.read_series(path, fill="ffill")


def test_bad_csv_on_the_command_line_is_one_line(tmp_path):
    path = write_series_csv(tmp_path / "bad.csv", [["2021-03-01 00:00", "1", "2"], ["2021-03-01 01:00", "oops", "3"]])
    one_line_error(run_prepare(f"--csv={path}", cwd=tmp_path, script="prepare_timeseries.py"),
                   f"prepare_timeseries.py: {path} line 3: a is 'oops', not a number")
    assert not os.path.exists(tmp_path / "data")


def test_source_ett_downloads_once(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    stamps = np.datetime64("2016-07-01T00:00", "s") + np.arange(100) * np.timedelta64(15, "m")
    write_series_csv(served / "ETTm2.csv", [[str(t).replace("T", " "), i, 2 * i] for i, t in enumerate(stamps)],
                     header=("date", "HUFL", "OT"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = ("--source=ett", "--ett=ETTm2", f"--ett_url=http://127.0.0.1:{server.server_address[1]}",
                "--download_dir=dl", "--borders=0.6,0.2,0.2")
        result = run_prepare(*args, cwd=tmp_path, script="prepare_timeseries.py")
        assert result.returncode == 0 and "wrote data/ettm2" in result.stdout, result.stderr
        series = dataset.SeriesData(str(tmp_path / "data" / "ettm2"))
        assert series.columns == ["HUFL", "OT"] and series.meta["step_seconds"] == 900 and series.borders == [60, 80, 100]
        assert open(tmp_path / "dl" / "ETTm2.csv").read() == open(served / "ETTm2.csv").read()
        result = run_prepare(*args, cwd=tmp_path, script="prepare_timeseries.py")  # a second run reuses the file
        assert result.returncode == 0 and "downloaded before" in result.stdout
        # ETT's own split needs 20 months of 15-minute steps
        one_line_error(run_prepare(*args[:-1], cwd=tmp_path, script="prepare_timeseries.py"),
                       "borders='ett': the parts end at rows [34560, 46080, 57600]")
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_build_leaves_nothing_and_keeps_the_old_series(tmp_path, monkeypatch):
    series, _ = build_indexed_series(tmp_path)
    before = snapshot(series.path)
    save = np.save

    def failing_save(file, *args, **kwargs):
        if str(file).endswith("calendar.npy"):
            raise KeyboardInterrupt
        return save(file, *args, **kwargs)
    monkeypatch.setattr(dataset.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        build_indexed_series(tmp_path, n=300)
    assert snapshot(series.path) == before and os.listdir(tmp_path / "data") == ["indexed"]
    with pytest.raises(KeyboardInterrupt):
        pt.build_series(hourly(50), np.zeros((50, 1)), ["a"], str(tmp_path / "data" / "new"), log=quiet)
    assert os.listdir(tmp_path / "data") == ["indexed"]


def test_window_batches_resume_and_split_between_processes(tmp_path):
    series, _ = build_indexed_series(tmp_path)
    train = dataset.Windows(series, "train", 24, 8)
    whole = dataset.WindowBatches(train, 48, 0, 1, seed=3)
    batches = [next(whole) for _ in range(5)]  # 109 windows: the third batch crosses into the second epoch
    starts = lambda batch: np.rint(batch["inputs"][:, 0, 0] * series.std[0] + series.mean[0])
    assert sorted(np.concatenate([starts(b) for b in batches[:2]]).tolist() + starts(batches[2])[:13].tolist()) == \
        list(range(109)) and whole.state_dict() == dict(epoch=2, position=22)
    resumed = dataset.WindowBatches(train, 48, 0, 1, seed=3)
    resumed.load_state_dict(dict(epoch=1, position=35))  # after the third batch
    assert all(np.array_equal(next(resumed)["inputs"], b["inputs"]) for b in batches[3:])
    halves = [dataset.WindowBatches(train, 48, rank, 2, seed=3) for rank in (0, 1)]
    for batch in batches:
        parts = [next(h) for h in halves]
        assert np.array_equal(np.concatenate([p["inputs"] for p in parts]), batch["inputs"])
    evaluation = list(dataset.window_batches(dataset.Windows(series, "test", 24, 8), 33, 16, 1, 2))
    assert [b["valid"].sum() for b in evaluation] == [8, 8, 0]  # rows 8-15, 24-31, then padding


def forecast_config(**overrides):
    config = dict(num_features=2, input_len=24, horizon=8, layout="patch", patch_len=8, hidden_size=32, num_heads=2,
                  expansion=2, H_layers=1, L_layers=1, H_cycles=1, L_cycles=2, halt_max_steps=2,
                  halt_exploration_prob=0.0, forward_dtype="float32")
    config.update(overrides)
    return ForecastConfig(**config)


def window_batch(config, B=5, L=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = L or config.input_len
    return dict(inputs=torch.randn(B, L, config.num_features, generator=g),
                labels=torch.randn(B, config.horizon, config.num_features, generator=g),
                input_marks=torch.rand(B, L, 5, generator=g) - 0.5,
                target_marks=torch.rand(B, config.horizon, 5, generator=g) - 0.5, valid=torch.ones(B, dtype=torch.bool))


@pytest.mark.parametrize("layout", ["time", "patch", "variable"])
def test_forecaster_heads_and_the_autoregressive_rollout(layout):
    for head in ("oneshot", "autoregressive"):
        config = forecast_config(layout=layout, head=head, patch_len=4)
        torch.manual_seed(0)
        model = build_model(dataclasses.asdict(config))
        batch = window_batch(config)
        carry, loss, metrics, outputs = model(model.initial_carry(batch), batch)
        step = config.horizon if head == "oneshot" else (4 if layout == "patch" else 1)
        assert outputs["forecast"].shape == (5, step, 2) and outputs["forecast"].dtype == torch.float32
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        model.eval()
        seen = []

        def spy(carry, data):
            seen.append(data["inputs"].clone())
            return model(carry, data)
        metrics, outputs = model.run_to_halt(spy, batch)
        forecast = outputs["forecast"]
        assert forecast.shape == (5, 8, 2) and metrics["count"] == 5
        assert metrics["mse"] / 5 == pytest.approx(((forecast - batch["labels"]) ** 2).mean().item(), rel=1e-5)
        assert len(seen) == 2 * (config.horizon // step)  # halt_max_steps segments for each step forward
        if head == "autoregressive":  # the window moved on by one forecast, which became its newest history
            assert torch.equal(seen[2][:, :-step], batch["inputs"][:, step:])
            assert torch.allclose(seen[2][:, -step:], forecast[:, :step])


def test_shorter_windows_keep_their_positions():
    config = forecast_config(layout="time", input_len=24, horizon=8)
    model = build_model(dataclasses.asdict(config)).eval()
    positions = []
    model.rotary_emb.register_forward_hook(lambda module, args, out: positions.append(args[0].tolist()))
    short = window_batch(config, L=10)
    metrics, outputs = model.run_to_halt(model, short)
    assert outputs["forecast"].shape == (5, 8, 2) and torch.isfinite(outputs["forecast"]).all()
    assert positions[0] == list(range(14, 32))  # the last 10 of the 24 history positions, then the horizon's
    assert model.initial_carry(short).z_H.shape == (5, 18, 32)
    patches = build_model(dataclasses.asdict(forecast_config()))
    with pytest.raises(ValueError, match="the patch layout takes windows of input_len=24 steps, got 10"):
        patches.run_to_halt(patches, short)


def test_regression_halting():
    config = forecast_config(halt_max_steps=3, halt_tolerance=0.5)
    model = build_model(dataclasses.asdict(config))
    batch = window_batch(config)
    _, outputs = model.eval().run_to_halt(model, batch)
    # Q-halt's target is "this window's forecast MSE is under halt_tolerance": the first two are (MSE 0.01)
    batch["labels"] = outputs["forecast"] + torch.tensor([0.1, 0.1, 2, 2, 2])[:, None, None]
    carry = model.initial_carry(batch)
    for _ in range(3):
        carry, loss, metrics, outputs = model(carry, batch)
    expected = F.binary_cross_entropy_with_logits(outputs["q_halt_logits"], torch.tensor([1.0, 1, 0, 0, 0]),
                                                  reduction="sum")
    assert metrics["q_halt_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert carry.halted.all() and (carry.steps == 3).all()  # evaluation: every window runs halt_max_steps
    # in training a window halts where Q says so (Q-halt above Q-continue), the others run on
    model.train()
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
    carry, _, _, _ = model(model.initial_carry(batch), batch)
    assert carry.halted.all() and (carry.steps == 1).all()
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([-5.0, 5.0]))
    carry, _, _, _ = model(model.initial_carry(batch), batch)
    assert not carry.halted.any()


def sine_series(n, periods=(24, 36)):
    t = np.arange(n)[:, None]
    return np.sin(2 * np.pi * t / np.array(periods) + np.array([0.0, 1.0])[:len(periods)])


def test_tiny_forecaster_beats_the_last_value_on_a_sine():
    """Real training, a few seconds: two noiseless sines, 48 steps of history -> the next 12."""
    series = torch.tensor(sine_series(2000), dtype=torch.float32)
    config = forecast_config(input_len=48, horizon=12, patch_len=8, halt_max_steps=1)
    torch.manual_seed(0)
    model = build_model(dataclasses.asdict(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def windows(starts):
        rows = torch.as_tensor(starts)[:, None]
        return dict(inputs=series[rows + torch.arange(48)], labels=series[rows + 48 + torch.arange(12)],
                    input_marks=torch.zeros(len(starts), 48, 5), target_marks=torch.zeros(len(starts), 12, 5),
                    valid=torch.ones(len(starts), dtype=torch.bool))
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = windows(torch.randint(0, 1400, (32,), generator=g))
        _, loss, _, _ = model(model.initial_carry(batch), batch)
        (loss / 32).backward()
        optimizer.step()
        optimizer.zero_grad()
    test = windows(np.arange(1500, 1940, 5))
    metrics, outputs = model.eval().run_to_halt(model, test)
    model_mse = ((outputs["forecast"] - test["labels"]) ** 2).mean().item()
    last_value_mse = pt.errors(pt.last_value_forecast(test["inputs"].numpy(), 12), test["labels"].numpy())[0]
    assert model_mse < 0.2 * last_value_mse, (model_mse, last_value_mse)


def test_baselines_on_a_constructed_series(tmp_path):
    history = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    assert pt.last_value_forecast(history, 4).tolist() == np.repeat(history[:, -1:], 4, 1).tolist()
    assert pt.errors([[1.0, 3.0]], np.array([[0.0, 1.0]])) == (2.5, 1.5)
    x = np.array([[1.0, 2, 3, 4, 10]])
    assert np.allclose(pt.moving_average(x, 3), [[4 / 3, 2, 3, 17 / 3, 8]])  # the ends repeated
    # a sum of sines follows a linear recurrence: DLinear (fitted by least squares) forecasts it exactly
    n = 600
    path = str(tmp_path / "data" / "sines")
    pt.build_series(hourly(n), sine_series(n, (24, 7)) * [3, 1] + [5, 0], ["a", "b"], path, "0.6,0.2,0.2", log=quiet)
    test = dataset.Windows(dataset.SeriesData(path), "test", 48, 12)
    scores = pt.scores(test, np.zeros((test.num_examples, 12, 2), np.float32))
    assert scores["dlinear"][0] < 1e-4 and scores["last_value"][0] > 0.3
    _, truth = pt.window_arrays(test, np.arange(test.num_examples))
    assert scores["model"] == pytest.approx(pt.errors(0, truth) + pt.errors(0, truth * test.series.std))
    assert scores["model"][2] == pytest.approx(np.mean(truth ** 2 * test.series.std ** 2))


def test_forecast_svg_parses_as_xml():
    import xml.etree.ElementTree as ET
    svg = pt.forecast_svg(np.sin(np.arange(48)), np.zeros(12), np.ones(12), "OT <test> & more", "OT (°C)", "hours")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == ns + "svg" and len(root.findall(f"{ns}polyline")) == 3
    texts = [t.text for t in root.iter(ns + "text")]
    assert "OT <test> & more" in texts and "hours" in texts and "OT (°C)" in texts and "forecast" in texts
    assert pt.nice_ticks(-48, 11, 10) == [-40, -30, -20, -10, 0, 10] and pt.format_step(900) == "15 min"


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """prepare_timeseries.py (the synthetic series, shortened) -> train.py -> an evaluation log and a checkpoint."""
    root = tmp_path_factory.mktemp("synthetic")
    result = run_prepare("--synthetic_rows=1600", cwd=root, script="prepare_timeseries.py")
    assert result.returncode == 0 and "wrote data/synthetic" in result.stdout, result.stderr
    run_script("train.py", ["--dataset=synthetic", f"--out_dir={root / 'out'}", "--input_len=48", "--horizon=12",
                            "--patch_len=8", "--global_batch_size=32", "--max_steps=40", "--eval_interval=20",
                            "--learning_rate=3e-3", "--warmup_steps=5", "--halt_max_steps=2"] + TINY_MODEL, cwd=root)
    return root


def test_timeseries_end_to_end(synthetic_run, tmp_path):
    log = read_eval_log(synthetic_run / "out")
    assert [row["step"] for row in log] == [20, 40]
    for key in ("mse", "mae", "mse_real", "mae_real", "last_value_mse", "last_value_mae", "dlinear_mse", "dlinear_mae",
                "steps", "q_halt_accuracy"):
        assert key in log[-1] and f"val_{key}" in log[-1], key
    assert log[-1]["mse"] < log[-1]["last_value_mse"] and log[-1]["steps"] == 2
    plot = tmp_path / "forecast.svg"
    result = run_script("sample.py", [f"--out_dir={synthetic_run / 'out'}", f"--plot={plot}", "--variable=demand",
                                      "--window=3"], cwd=synthetic_run)
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()}
    assert float(rows["model"][0]) == pytest.approx(log[-1]["mse"], abs=1e-4)  # printed with 4 decimals
    assert float(rows["dlinear"][0]) == pytest.approx(log[-1]["dlinear_mse"], abs=1e-4) and "last_value" in rows
    import xml.etree.ElementTree as ET
    assert "demand: test window 3" in ET.parse(plot).getroot().findtext("{http://www.w3.org/2000/svg}text")
    args = [f"--out_dir={synthetic_run / 'out'}", f"--plot={plot}", "--variable=OT"]
    one_line_error(run_script("sample.py", args, cwd=synthetic_run, check=False),
                   "variable='OT': the series has demand, temperature, supply")
    args = [f"--out_dir={tmp_path}", "--dataset=synthetic", "--input_len=2000"] + TINY_MODEL
    one_line_error(run_script("train.py", args, cwd=synthetic_run, check=False),
                   "the train part (rows 0 to 1,120) is too short for one window")


@pytest.mark.skipif(not os.path.isfile(SHARED_ETTH1), reason="ETTh1.csv (../shared/data/timeseries) is not here")
def test_etth1_follows_the_standard_protocol(tmp_path):
    stamps, values, names = pt.read_series(SHARED_ETTH1)
    pt.build_series(stamps, values, names, str(tmp_path / "etth1"), is_ett=True, log=quiet)
    series = dataset.SeriesData(str(tmp_path / "etth1"))
    assert series.borders == [8640, 11520, 14400] and series.columns[-1] == "OT"
    counts = [dataset.Windows(series, split, 96, 96).num_examples for split in dataset.SPLITS]
    assert counts == [8449, 2785, 2785]  # as the literature's loaders count them
    test = dataset.Windows(series, "test", 96, 96)
    history, truth = pt.window_arrays(test, np.arange(test.num_examples))
    # the last-value forecast's test errors as published ("Repeat", Zeng et al. 2023): 1.295 and 0.713
    assert pt.errors(pt.last_value_forecast(history, 96), truth) == pytest.approx((1.2944, 0.7132), abs=1e-4)


# -----------------------------------------------------------------------------
# configurator.py

def run_configured(args, config_file=None, cwd=None):
    """A script with three config keys that prints them after the configurator ran."""
    script = ("import os\n_not_config = set(globals())\nname = 'x'\nsteps = 3\nrate = 0.5\nflag = False\n"
              "config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]\n"
              f"exec(open({os.path.join(HERE, 'configurator.py')!r}).read())\n"
              "print(repr((name, steps, rate, flag)), sorted(config_overrides))\n")
    return subprocess.run([sys.executable, "-c", script] + args, capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize("args, printed", [
    (["--name=4000008050"], "('4000008050', 3, 0.5, False) ['name']"),  # strings stay strings
    (["--name=123", "--steps=7", "--rate=2", "--flag=True"], "('123', 7, 2.0, True) ['flag', 'name', 'rate', 'steps']"),
    (["--name=[1, 2]"], "('[1, 2]', 3, 0.5, False) ['name']"),
])
def test_configurator_keeps_types(args, printed):
    result = run_configured(args)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == printed, result.stderr


@pytest.mark.parametrize("args, file_text, message", [
    (["--stepz=1"], None, "--stepz=1: unknown config key 'stepz'"),
    (["--config_keys=[]"], None, "unknown config key 'config_keys'"),
    (["--os=1"], None, "unknown config key 'os'"),
    (["--steps=big"], None, "--steps=big: expected int (default 3), got 'big'"),
    (["--steps=1.5"], None, "expected int (default 3), got 1.5"),
    (["--flag=yes"], None, "expected bool (default False), got 'yes'"),
    (["-steps=1"], None, "-steps=1: expected --key=value or a config file ending in .py"),
    (["steps=1"], None, "steps=1: expected --key=value or a config file ending in .py"),
    (["--steps"], None, "--steps: expected --key=value"),
    (["missing.py"], None, "missing.py: cannot read this config file"),
    ([], "stepz = 4\n", "cfg.py: unknown config key 'stepz'"),
    ([], "steps = 'four'\n", "cfg.py: steps: expected int (default 3), got 'four'"),
    ([], "steps = \n", "cfg.py: SyntaxError"),
])
def test_configurator_rejects_what_it_cannot_apply(tmp_path, args, file_text, message):
    if file_text is not None:
        (tmp_path / "cfg.py").write_text(file_text)
        args = args + ["cfg.py"]
    result = run_configured(args, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_config_files_set_only_what_they_assign(tmp_path):
    (tmp_path / "cfg.py").write_text("import math\nsteps = int(math.sqrt(16))\nrate = steps / 8\n")
    result = run_configured(["cfg.py", "--flag=True"], cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "('x', 4, 0.5, True) ['flag', 'rate', 'steps']", result.stderr


# -----------------------------------------------------------------------------
# train.py and sample.py end to end (subprocesses on small data), and their one-line errors

TINY_MODEL = ["--hidden_size=32", "--num_heads=2", "--H_layers=1", "--L_layers=1", "--H_cycles=1", "--L_cycles=2",
              "--compile=False", "--device=cpu", "--dtype=float32"]


def run_script(script, args, cwd, nproc=0, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, os.path.join(HERE, script)] + args
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   os.path.join(HERE, script)] + args
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def one_line_error(result, message):
    """The process failed with exactly one line on stderr, which holds message."""
    lines = [l for l in result.stderr.splitlines() if l.strip() and not l.startswith("hrm.attn")]
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


@pytest.fixture(scope="module")
def reverse_task(tmp_path_factory):
    """A small task an HRM learns in seconds on a CPU: print 12 digits in reverse order."""
    root = tmp_path_factory.mktemp("reverse")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 2000), ("test", 256)):
        digits = rng.integers(2, 11, (n, 12))
        arrays = dataset.puzzle_arrays(digits, digits[:, ::-1], examples_per_puzzle=1, puzzles_per_group=1)
        splits[split] = (arrays, dataset.metadata(arrays, None, vocab_size=11))
    dataset.write_dataset(str(root / "data" / "reverse"), splits, ["<blank>"])
    return root


def read_eval_log(out_dir):
    with open(os.path.join(out_dir, "eval_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_hrm_learns_a_task(reverse_task, tmp_path):
    out = str(tmp_path / "out")
    result = run_script("train.py", ["--dataset=reverse", f"--out_dir={out}", "--global_batch_size=32",
                                     "--hidden_size=64", "--puzzle_emb_ndim=0", "--halt_max_steps=2",
                                     "--learning_rate=1e-3", "--warmup_steps=20", "--weight_decay=0.1",
                                     "--max_steps=500", "--eval_interval=500"] + TINY_MODEL[1:], cwd=reverse_task)
    # the backend choice is shown once: head_dim 32 has no kernel (or, without triton, no kernels at all)
    assert len(re.findall(r"hrm\.attn: attention: PyTorch SDPA \((head_dim 32 not in|triton is not installed)",
                          result.stderr)) == 1, result.stderr[-2000:]
    final = read_eval_log(out)[-1]
    assert final["step"] == 500 and final["accuracy"] > 0.3, final  # chance is 1/9 per digit


RESUME_ARGS = ["--dataset=reverse", "--global_batch_size=8", "--puzzle_emb_ndim=32", "--halt_max_steps=3",
               "--halt_exploration_prob=0.5", "--learning_rate=1e-3", "--warmup_steps=5", "--lr_min_ratio=0.1",
               "--epochs=1", "--eval_interval=10", "--eval_max_examples=16", "--log_interval=5"] + TINY_MODEL


def load_checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_resumed_run_reaches_the_same_weights(reverse_task, tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run_script("train.py", RESUME_ARGS + [f"--out_dir={whole}", "--max_steps=30"], cwd=reverse_task)
    run_script("train.py", RESUME_ARGS + [f"--out_dir={parts}", "--max_steps=10"], cwd=reverse_task)
    assert load_checkpoint(parts)["iter_num"] == 10
    # a resume takes the run's own config from the checkpoint: only what the command sets changes
    resumed = run_script("train.py", [f"--out_dir={parts}", "--max_steps=30", "--init_from=resume"], cwd=reverse_task)
    assert "resuming from" in resumed.stdout and "at step 10" in resumed.stdout
    a, b = load_checkpoint(whole), load_checkpoint(parts)
    assert a["iter_num"] == b["iter_num"] == 30 and a["loader"] == b["loader"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["carry"]:
        assert torch.equal(a["carry"][key], b["carry"][key]), key
    assert [l["step"] for l in read_eval_log(whole)] == [l["step"] for l in read_eval_log(parts)] == [10, 20, 30]
    assert {"model", "optimizer", "sparse_optimizer", "iter_num", "loader", "carry", "rng", "config",
            "model_args"} <= a.keys() and a["config"]["learning_rate"] == 1e-3

    # what a resume cannot apply is refused, naming the key; a finished run says there is nothing to do
    one_line_error(run_script("train.py", [f"--out_dir={parts}", "--init_from=resume", "--global_batch_size=16"],
                              cwd=reverse_task, check=False), "global_batch_size=16, but the run in")
    one_line_error(run_script("train.py", [f"--out_dir={parts}", "--init_from=resume", "--hidden_size=64"],
                              cwd=reverse_task, check=False), "hidden_size=64, but the run in")
    one_line_error(run_script("train.py", [f"--out_dir={parts}", "--init_from=resume"], cwd=reverse_task, check=False),
                   "is at step 30, the end of this run (30 steps): nothing to train")
    # a new run does not overwrite another run's checkpoint
    one_line_error(run_script("train.py", RESUME_ARGS + [f"--out_dir={parts}"], cwd=reverse_task, check=False),
                   "ckpt.pt exists: continue it with --init_from=resume")


def test_a_kill_between_evaluation_and_checkpoint_leaves_no_duplicate_log_line(reverse_task, tmp_path):
    out = tmp_path / "out"
    run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--max_steps=10"], cwd=reverse_task)
    with open(out / "eval_log.jsonl", "a") as f:  # as if killed after logging step 20, before its checkpoint
        f.write(json.dumps(dict(step=20, accuracy=0.5)) + "\n" + '{"step": 3')
    (out / "ckpt.pt.tmp-999999999").write_bytes(b"half a checkpoint")
    run_script("train.py", [f"--out_dir={out}", "--max_steps=20", "--init_from=resume"], cwd=reverse_task)
    assert [l["step"] for l in read_eval_log(out)] == [10, 20] and read_eval_log(out)[1]["accuracy"] != 0.5
    assert sorted(os.listdir(out)) == ["ckpt.pt", "eval_log.jsonl"]


def test_torchrun_two_processes_equal_one(reverse_task, tmp_path):
    args = RESUME_ARGS + ["--halt_exploration_prob=0.0", "--max_steps=20", "--backend=gloo"]
    result = run_script("train.py", args + [f"--out_dir={tmp_path / 'ddp'}"], cwd=reverse_task, nproc=2)
    assert "on 2 process(es)" in result.stdout
    run_script("train.py", args + [f"--out_dir={tmp_path / 'single'}"], cwd=reverse_task)
    # (every checkpoint also checks that the processes hold identical weights, or the run fails)
    ddp, single = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "single")
    assert ddp["world_size"] == 2 and ddp["carry"]["z_H"].shape[0] == 8
    for key, value in single["model"].items():
        assert torch.allclose(ddp["model"][key].float(), value.float(), atol=1e-6), key


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(reverse_task, tmp_path):
    out = str(tmp_path / "out")
    run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--max_steps=10"], cwd=reverse_task)
    good = load_checkpoint(out)
    result = run_script("train.py", [f"--out_dir={out}", "--max_steps=30", "--init_from=resume",
                                     "--learning_rate=1e38"], cwd=reverse_task, check=False)
    assert result.returncode != 0
    # the first loss computed after the 1e38 update is not finite; the message names its step
    assert re.search(r"^non-finite loss at step 1[1-9]: stopping", result.stderr, re.M), result.stderr[-2000:]
    kept = load_checkpoint(out)
    assert kept["iter_num"] == 10 and all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())


def test_train_from_a_checkpoint_of_the_original(reverse_task, tmp_path):
    config = dict(vocab_size=11, seq_len=12, puzzle_emb_ndim=32, num_puzzle_identifiers=1, batch_size=8,
                  H_cycles=1, L_cycles=2, H_layers=1, L_layers=1, hidden_size=32, expansion=4.0, num_heads=2,
                  halt_max_steps=3, forward_dtype="float32")
    torch.manual_seed(3)
    model = HRM(HRMConfig(**config))
    reference = {"_orig_mod.model.inner." + k.replace("embed_tokens.weight", "embed_tokens.embedding_weight"): v
                 for k, v in model.state_dict().items()}
    torch.save(reference, tmp_path / "step_100")
    out = str(tmp_path / "out")
    run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--init_from=reference", "--eval_only=True",
                                          f"--reference_checkpoint={tmp_path / 'step_100'}"], cwd=reverse_task)
    # the evaluation of the loaded weights equals this model's own
    model.eval()
    test = dataset.PuzzleData(os.path.join(reverse_task, "data", "reverse", "test"))
    batch = {k: torch.from_numpy(v) for k, v in test.batch(np.arange(16), np.arange(16), 16).items()}
    carry = model.initial_carry(batch)
    with torch.no_grad():
        for _ in range(3):
            carry, _, metrics, _ = model(carry, batch)
    assert read_eval_log(out)[-1]["accuracy"] == pytest.approx(metrics["accuracy"].item() / 16, abs=1e-6)
    one_line_error(run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--init_from=reference",
                                                         "--reference_checkpoint=nope"], cwd=reverse_task, check=False),
                   "nope: no such file")
    torch.save({"not": torch.zeros(1)}, tmp_path / "foreign")
    one_line_error(run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--init_from=reference",
                                                         f"--reference_checkpoint={tmp_path / 'foreign'}"],
                              cwd=reverse_task, check=False), "does not match the model: missing")


@pytest.mark.parametrize("args, message", [
    (["--no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--global_batch_size=big"], "--global_batch_size=big: expected int"),
    (["--global_batch_size=0"], "global_batch_size=0: must be > 0"),
    (["--global_batch_size=-8"], "global_batch_size=-8: must be > 0"),
    (["--eval_interval=0"], "eval_interval=0: must be > 0"),
    (["--epochs=0"], "epochs=0: must be > 0"),
    (["--learning_rate=-1e-4"], "learning_rate=-0.0001: must be > 0"),
    (["--seed=-1"], "seed=-1: must be >= 0"),
    (["--halt_max_steps=0"], "halt_max_steps=0: must be >= 1"),
    (["--dtype=bfloat61"], "dtype='bfloat61': must be 'float32', 'bfloat16' or 'float16'"),
    (["--device=gpu"], "device='gpu': must be 'cpu', 'cuda', 'cuda:<n>' or 'mps'"),
    (["--dataset=absent"], "no dataset at data/absent/train (no dataset.json): build one with a prepare_*.py script"),
    (["--init_from=resume", "--out_dir=nowhere"], "train.py: nowhere/ckpt.pt: no such file"),
])
def test_train_bad_input_is_one_line(reverse_task, args, message):
    one_line_error(run_script("train.py", RESUME_ARGS + args, cwd=reverse_task, check=False), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_on_a_machine_without_it(reverse_task):
    one_line_error(run_script("train.py", RESUME_ARGS + ["--device=cuda"], cwd=reverse_task, check=False),
                   "device='cuda', but torch sees no CUDA GPU")


def test_damaged_checkpoint_is_named(reverse_task, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    one_line_error(run_script("train.py", [f"--out_dir={out}", "--init_from=resume"], cwd=reverse_task, check=False),
                   f"{out / 'ckpt.pt'}: not a readable checkpoint")
    torch.save({"weights": torch.zeros(2)}, out / "ckpt.pt")
    one_line_error(run_script("sample.py", [f"--out_dir={out}", "--puzzle=" + "." * 81], cwd=tmp_path, check=False),
                   "not a checkpoint of train.py (no model, model_args, config, iter_num)")


@pytest.fixture(scope="module")
def sudoku_checkpoint(tmp_path_factory):
    """A few training steps on a small Sudoku build: enough for sample.py to load and run."""
    root = tmp_path_factory.mktemp("sudoku")
    ps.build_dataset(SAMPLE_TRAIN, SAMPLE_TEST, os.path.join(root, "data", "sudoku-small"), subsample_size=20,
                     num_aug=2, log=quiet)
    run_script("train.py", ["--dataset=sudoku-small", f"--out_dir={root / 'out'}", "--global_batch_size=8",
                            "--max_steps=4", "--eval_interval=4", "--eval_max_examples=8", "--puzzle_emb_ndim=32",
                            "--halt_max_steps=2"] + TINY_MODEL, cwd=root)
    return root


def test_sample_solves_and_reports(sudoku_checkpoint, tmp_path):
    puzzle = "4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text("\n".join([puzzle, puzzle[:80], "44" + puzzle[2:], "x" + puzzle[1:]]) + "\n")
    out = str(sudoku_checkpoint / "out")
    result = run_script("sample.py", [f"--out_dir={out}", f"--puzzles={puzzles}", "--show_steps=True",
                                      "--halt_max_steps=3"], cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert f"sample.py: {puzzles} line 2: expected 81 characters, got 80" in lines
    assert f"sample.py: {puzzles} line 3: question's clues conflict: digit 4 appears twice in row 1" in lines
    assert any(f"{puzzles} line 4:" in l and "'x'" in l for l in lines)
    assert "4 . . | . . . | 8 . 5" in lines  # the puzzle, drawn as a grid
    assert sum(l.startswith("after segment") for l in lines) == 3  # --halt_max_steps beyond training's 2
    assert any(l.startswith("solution after 3 segments") for l in lines)
    assert "1 puzzle(s) through the model" in result.stdout and "3 could not be read" in result.stdout

    # '0' for blanks: a puzzle that starts with a digit stays text
    zeros = run_script("sample.py", [f"--out_dir={out}", "--puzzle=" + puzzle.replace(".", "0")], cwd=tmp_path)
    assert "1 puzzle(s) through the model" in zeros.stdout
    # a CSV (with a byte-order mark) is read by the builder's reader: answers that contradict their clues are
    # not scored, and the good rows are
    rows = read_rows(SAMPLE_TEST, 5)
    bad, reason = corrupt(rows[1], "answer contradicts clue")
    csv_path = write_csv(tmp_path / "bom.csv", [rows[0], bad] + rows[2:])
    data = open(csv_path, "rb").read()
    open(csv_path, "wb").write(b"\xef\xbb\xbf" + data)
    scored = run_script("sample.py", [f"--out_dir={out}", f"--puzzles={csv_path}", "--quiet=True"], cwd=tmp_path)
    assert f"skipped 1 x answer contradicts clues, e.g. {csv_path} line 3: {reason}" in scored.stdout
    assert "4 puzzle(s) through the model" in scored.stdout and "/4 = " in scored.stdout

    one_line_error(run_script("sample.py", [f"--out_dir={tmp_path / 'none'}", f"--puzzle={puzzle}"], cwd=tmp_path,
                              check=False), "no such file (train a model with train.py, or set --out_dir)")
    nothing = run_script("sample.py", [f"--out_dir={out}", f"--puzzle={puzzle[:80]}"], cwd=tmp_path, check=False)
    assert nothing.returncode != 0 and "no puzzle could be read (1 had errors)" in nothing.stderr
    one_line_error(run_script("sample.py", [f"--out_dir={out}", f"--puzzle={puzzle}", "--batch_size=-1"], cwd=tmp_path,
                              check=False), "batch_size must be >= 1")
    one_line_error(run_script("sample.py", [f"--out_dir={out}", "--puzzles=missing.txt"], cwd=tmp_path, check=False),
                   "missing.txt: no such file")


# -----------------------------------------------------------------------------
# on a CUDA GPU (skipped elsewhere): bfloat16 training steps with each kernel backend


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_training_step_with_each_backend():
    config = HRMConfig(batch_size=64, seq_len=81, puzzle_emb_ndim=512, num_puzzle_identifiers=3, hidden_size=512,
                       num_heads=8, H_layers=2, L_layers=2, halt_exploration_prob=0.0, forward_dtype="bfloat16")
    torch.manual_seed(0)
    model = HRM(config).cuda()
    with torch.no_grad():
        model.q_head.weight.normal_(0, 0.02)
        model.puzzle_emb.weights.normal_(0, 0.02)
    batch = {k: v.cuda() for k, v in random_batch(config).items()}
    results = {}
    for use_flash in (True, False):
        kernels.set_use_flash(use_flash)
        replica = copy.deepcopy(model).train()
        carry, loss, _, outputs = replica(replica.initial_carry(batch), batch)
        (loss / config.batch_size).backward()
        grads = {n: p.grad.float() for n, p in replica.named_parameters()}
        grads["puzzle_emb.local_weights"] = replica.puzzle_emb.local_weights.grad.float()
        results[use_flash] = (loss.float(), outputs["logits"].float(), carry.z_H.float(), grads)
    kernels.set_use_flash(None)
    (loss_t, logits_t, z_t, grads_t), (loss_p, logits_p, z_p, grads_p) = results[True], results[False]
    errors = {"loss": rel_err(loss_t, loss_p), "logits": rel_err(logits_t, logits_p), "z_H": rel_err(z_t, z_p)}
    errors.update({f"grad {n}": rel_err(g, grads_p[n]) for n, g in grads_t.items()})
    print("\n".join(f"{k}: {v:.2e}" for k, v in errors.items()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads_t.values())
    assert errors["loss"] < 1e-2 and errors["logits"] < 3e-2 and errors["z_H"] < 3e-2
    assert max(v for k, v in errors.items() if k.startswith("grad")) < 1e-1
