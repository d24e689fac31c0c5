"""
CPU tests of the project: python -m pytest test_model.py

The reference test needs the original implementation's recorded outputs (../shared/fixtures, or the paths
in HRM_REFERENCE_FIXTURES, separated by ':'); it is skipped where none exist.
"""
import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import (HRM, HRMConfig, IGNORE_LABEL_ID, AdamAtan2, PuzzleEmbeddingSignSGD, config_from_reference,
                   convert_reference_state_dict, load_reference_checkpoint, softmax_cross_entropy,
                   stablemax_cross_entropy)

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
        pytest.skip(f"no reference fixture at {path}")
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
    with pytest.raises(KeyError, match=r"missing \['q_head.bias'\].*unexpected \['extra.weight'\]"):
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
    for _ in range(config.halt_max_steps):
        carry, loss, metrics, outputs = model(carry if _ else model.initial_carry(batch), batch)
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
# end to end: train.py, sample.py, configurator.py (subprocesses on small data)

import json
import re
import subprocess
import sys

import numpy as np

import prepare_sudoku

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


def write_dataset(path, inputs, labels):
    """A split in the original implementation's layout, one example per puzzle and group."""
    os.makedirs(path)
    n = len(inputs)
    np.save(os.path.join(path, "all__inputs.npy"), inputs.astype(np.uint8))
    np.save(os.path.join(path, "all__labels.npy"), labels.astype(np.uint8))
    np.save(os.path.join(path, "all__puzzle_identifiers.npy"), np.zeros(n, np.int32))
    np.save(os.path.join(path, "all__puzzle_indices.npy"), np.arange(n + 1, dtype=np.int32))
    np.save(os.path.join(path, "all__group_indices.npy"), np.arange(n + 1, dtype=np.int32))
    with open(os.path.join(path, "dataset.json"), "w") as f:
        json.dump(dict(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=11, seq_len=inputs.shape[1],
                       num_puzzle_identifiers=1, total_groups=n, mean_puzzle_examples=1, sets=["all"]), f)


@pytest.fixture(scope="module")
def reverse_task(tmp_path_factory):
    """A small task an HRM learns in seconds on a CPU: print 12 digits in reverse order."""
    root = tmp_path_factory.mktemp("reverse")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2000), ("test", 256)):
        digits = rng.integers(2, 11, (n, 12))
        write_dataset(os.path.join(root, "data", "reverse", split), digits, digits[:, ::-1])
    return root


def read_eval_log(out_dir):
    with open(os.path.join(out_dir, "eval_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_hrm_learns_a_task(reverse_task, tmp_path):
    out = str(tmp_path / "out")
    run_script("train.py", ["--dataset=reverse", f"--out_dir={out}", "--global_batch_size=32", "--hidden_size=64",
                            "--puzzle_emb_ndim=0", "--halt_max_steps=2", "--learning_rate=1e-3", "--warmup_steps=20",
                            "--weight_decay=0.1", "--max_steps=500", "--eval_interval=500"] + TINY_MODEL[1:],
               cwd=reverse_task)
    final = read_eval_log(out)[-1]
    assert final["step"] == 500
    assert final["accuracy"] > 0.3, final  # chance is 1/9 per digit


RESUME_ARGS = ["--dataset=reverse", "--global_batch_size=8", "--puzzle_emb_ndim=32", "--halt_max_steps=3",
               "--halt_exploration_prob=0.5", "--learning_rate=1e-3", "--warmup_steps=5", "--lr_min_ratio=0.1",
               "--epochs=1", "--eval_interval=10", "--eval_max_examples=16", "--log_interval=5"] + TINY_MODEL


def load_checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)


def test_resumed_run_reaches_the_same_weights(reverse_task, tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run_script("train.py", RESUME_ARGS + [f"--out_dir={whole}", "--max_steps=30"], cwd=reverse_task)
    run_script("train.py", RESUME_ARGS + [f"--out_dir={parts}", "--max_steps=10"], cwd=reverse_task)
    assert load_checkpoint(parts)["iter_num"] == 10
    run_script("train.py", RESUME_ARGS + [f"--out_dir={parts}", "--max_steps=30", "--init_from=resume"],
               cwd=reverse_task)
    a, b = load_checkpoint(whole), load_checkpoint(parts)
    assert a["iter_num"] == b["iter_num"] == 30 and a["loader"] == b["loader"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["carry"]:
        assert torch.equal(a["carry"][key], b["carry"][key]), key
    # the checkpoint holds what a resume needs
    assert {"model", "optimizer", "sparse_optimizer", "iter_num", "loader", "carry", "rng", "config",
            "model_args"} <= a.keys()
    assert a["config"]["learning_rate"] == 1e-3


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
    result = run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--max_steps=30", "--init_from=resume",
                                                   "--learning_rate=1e38"], cwd=reverse_task, check=False)
    assert result.returncode != 0
    # the first loss computed after the 1e38 update is not finite; the message names its step
    assert re.search(r"^non-finite loss at step 1[1-9]: stopping", result.stderr, re.M), result.stderr[-2000:]
    kept = load_checkpoint(out)
    assert kept["iter_num"] == 10
    assert all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())


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
    data = np.load(os.path.join(reverse_task, "data", "reverse", "test", "all__inputs.npy"))[:16]
    labels = np.load(os.path.join(reverse_task, "data", "reverse", "test", "all__labels.npy"))[:16]
    batch = dict(inputs=torch.from_numpy(data.astype(np.int32)), labels=torch.from_numpy(labels.astype(np.int32)),
                 puzzle_identifiers=torch.zeros(16, dtype=torch.int32))
    carry = model.initial_carry(batch)
    with torch.no_grad():
        for _ in range(3):
            carry, _, metrics, _ = model(carry, batch)
    logged = read_eval_log(out)[-1]
    assert logged["accuracy"] == pytest.approx(metrics["accuracy"].item() / 16, abs=1e-6)
    missing = run_script("train.py", RESUME_ARGS + [f"--out_dir={out}", "--init_from=reference",
                                                    "--reference_checkpoint=nope"], cwd=reverse_task, check=False)
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_configurator_rejects_bad_overrides(reverse_task):
    unknown = run_script("train.py", ["--no_such_key=1"], cwd=reverse_task, check=False)
    assert unknown.returncode != 0 and "unknown config key 'no_such_key'" in unknown.stderr
    wrong_type = run_script("train.py", ["--global_batch_size=big"], cwd=reverse_task, check=False)
    assert wrong_type.returncode != 0 and "--global_batch_size expects int" in wrong_type.stderr
    no_data = run_script("train.py", ["--dataset=absent"], cwd=reverse_task, check=False)
    assert no_data.returncode != 0 and "run prepare_sudoku.py first" in no_data.stderr


@pytest.fixture(scope="module")
def sudoku_checkpoint(tmp_path_factory):
    """A few training steps on a small Sudoku build: enough for sample.py to load and run."""
    root = tmp_path_factory.mktemp("sudoku")
    csv_dir = os.path.join(HERE, "assets", "sudoku")
    prepare_sudoku.build_dataset(os.path.join(csv_dir, "train.csv"), os.path.join(csv_dir, "test.csv"),
                                 os.path.join(root, "data", "sudoku-small"), subsample_size=20, num_aug=2, log=lambda s: None)
    run_script("train.py", ["--dataset=sudoku-small", f"--out_dir={root / 'out'}", "--global_batch_size=8",
                            "--max_steps=4", "--eval_interval=4", "--eval_max_examples=8", "--puzzle_emb_ndim=32",
                            "--halt_max_steps=2"] + TINY_MODEL, cwd=root)
    return root


def test_sample_solves_and_reports(sudoku_checkpoint, tmp_path):
    puzzle = "4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
    bad_length = puzzle[:80]
    conflicting = "44" + puzzle[2:]
    bad_character = "x" + puzzle[1:]
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text("\n".join([puzzle, bad_length, conflicting, bad_character]) + "\n")
    out = str(sudoku_checkpoint / "out")
    result = run_script("sample.py", [f"--out_dir={out}", f"--puzzles={puzzles}", "--show_steps=True",
                                      "--halt_max_steps=3"], cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert f"sample: {puzzles} line 2: expected 81 characters, got 80" in lines
    assert any(f"{puzzles} line 3:" in l and "digit 4 appears twice in row 1" in l for l in lines)
    assert any(f"{puzzles} line 4:" in l and "'x'" in l for l in lines)
    assert "4 . . | . . . | 8 . 5" in lines  # the puzzle, drawn as a grid
    assert sum(l.startswith("after segment") for l in lines) == 3  # --halt_max_steps beyond training's 2
    assert any(l.startswith("solution after 3 segments") for l in lines)
    assert "1 puzzle(s) through the model" in result.stdout and "3 could not be read" in result.stdout

    # a CSV with answers is scored; a missing checkpoint is a one-line error
    scored = run_script("sample.py", [f"--out_dir={out}", f"--puzzles={os.path.join(HERE, 'assets', 'sudoku', 'test.csv')}",
                                      "--max_puzzles=5", "--quiet=True"], cwd=tmp_path)
    assert "exact accuracy against the given answers: " in scored.stdout and "/5 = " in scored.stdout
    missing = run_script("sample.py", [f"--out_dir={tmp_path / 'none'}", f"--puzzle={puzzle}"], cwd=tmp_path, check=False)
    assert missing.returncode != 0 and "no checkpoint at" in missing.stderr
