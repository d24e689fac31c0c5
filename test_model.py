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
