"""
The Hierarchical Reasoning Model (HRM) and its Adaptive Computation Time (ACT) wrapper, in one file.

HRM (Wang et al. 2025, arXiv 2506.21734) is a recurrent transformer with two modules: L, fast and detailed,
takes L_cycles steps for every step of H, slow and abstract; H runs H_cycles steps. The input is injected
into L at every step. Only the last L step and the last H step of a forward pass carry gradient (the
"1-step gradient"). ACT runs that forward pass as repeated segments on a carried state, detached between
segments (deep supervision), and a Q head learns when to stop.

This file computes the same functions as the original implementation (github.com/sapientinc/HRM):
test_model.py checks it against that code's recorded outputs, and load_reference_checkpoint reads its
checkpoints. Read it top to bottom: layers, the config, the model (embeddings, the H/L recurrence, the ACT
segment, the loss), the optimizers, then loading the original's checkpoints.
"""
import math
import re
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from dataset import DataError, IGNORE_LABEL_ID, check_ranges  # labels equal to IGNORE_LABEL_ID are not scored
import kernels
from kernels import add_rms_norm, add_rms_norm_fp8, attention, linear_swiglu, linear_swiglu_fp8, swiglu

# -----------------------------------------------------------------------------
# layers


@torch.no_grad()
def trunc_normal_(tensor, std=1.0, lower=-2.0, upper=2.0):
    """Normal truncated to [lower, upper] standard deviations whose std really is `std`, as JAX's truncated
    LeCun init (the original's). torch.nn.init.trunc_normal_ truncates without rescaling, so its std falls short."""
    if std == 0:
        return tensor.zero_()
    pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    mass = cdf(upper) - cdf(lower)
    truncated_var = 1 + (lower * pdf(lower) - upper * pdf(upper)) / mass - ((pdf(lower) - pdf(upper)) / mass) ** 2
    scale = std / math.sqrt(truncated_var)
    # inverse-CDF sampling: uniform over the truncated range of erf, mapped back through erfinv
    tensor.uniform_(2 * cdf(lower) - 1, 2 * cdf(upper) - 1).erfinv_().mul_(math.sqrt(2) * scale)
    return tensor.clamp_(lower * scale, upper * scale)


class CastedLinear(nn.Linear):
    """nn.Linear with float32 master weights, cast to the input's dtype (bfloat16) when used."""

    def reset_parameters(self):
        trunc_normal_(self.weight, std=self.in_features ** -0.5)  # truncated LeCun normal
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastedEmbedding(nn.Embedding):
    """nn.Embedding with float32 master weights, looked up in the compute dtype."""

    def __init__(self, num_embeddings, embedding_dim, init_std, cast_to):
        super().__init__(num_embeddings, embedding_dim)
        trunc_normal_(self.weight, std=init_std)
        self.cast_to = cast_to

    def forward(self, idx):
        return F.embedding(idx, self.weight.to(self.cast_to))


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embedding (float32, halves duplicated: the rotate-half layout),
    looked up at explicit position_ids so that a window need not start at 0 or fill the maximum length."""

    def __init__(self, head_dim, max_positions, base):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        freqs = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, position_ids):
        # position_ids: (T,) shared by the batch, or (B, T) per sequence -> tables of shape (..., T, head_dim)
        return self.cos[position_ids], self.sin[position_ids]


class Attention(nn.Module):
    """Bidirectional multi-head self-attention; the kernel applies RoPE to q and k."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = CastedLinear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = CastedLinear(hidden_size, hidden_size, bias=False)

    def forward(self, x, cos_sin):
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        y = attention(q, k, v, *cos_sin) if cos_sin is not None else attention(q, k, v)
        return self.o_proj(y.reshape(B, T, C))


class SwiGLU(nn.Module):

    def __init__(self, hidden_size, expansion):
        super().__init__()
        # 2/3 of expansion * hidden keeps the parameter count of a plain MLP; rounded up to a multiple of 256
        inter = 256 * max(1, math.ceil(round(expansion * hidden_size * 2 / 3) / 256))
        self.gate_up_proj = CastedLinear(hidden_size, 2 * inter, bias=False)
        self.down_proj = CastedLinear(inter, hidden_size, bias=False)

    def forward(self, x, x_fp8=None):
        if x_fp8 is not None:  # x also as FP8 rows with their scales (HRMConfig.fp8): the gate and up in FP8
            hidden = linear_swiglu_fp8(x_fp8, self.gate_up_proj.weight, x.dtype).view(*x.shape[:-1], -1)
        else:  # one fused kernel where kernels.py has one (a Hopper GPU, no gradient)
            hidden = linear_swiglu(x, self.gate_up_proj.weight.to(x.dtype))
        return self.down_proj(hidden)


class Block(nn.Module):
    """Post-norm transformer block: x = norm(x + attn(x)); x = norm(x + mlp(x)), RMSNorm without weights.
    With mixer='mlp' a SwiGLU across the num_tokens positions, shared by the channels, takes attention's
    place (TRM's MLP-Mixer-style choice for Sudoku: it needs every sequence num_tokens long)."""

    def __init__(self, config, num_tokens):
        super().__init__()
        self.mixer = config.mixer
        if config.mixer == "attention":
            self.self_attn = Attention(config.hidden_size, config.num_heads)
        else:
            self.token_mlp = SwiGLU(num_tokens, config.expansion)
            # zero, so each block starts as its channel MLP alone and learns to mix from there: from a random
            # start (TRM's) the model sat at uniform digits for the first ~2,500 steps of config/sudoku_fast.py
            nn.init.zeros_(self.token_mlp.down_proj.weight)
        self.mlp = SwiGLU(config.hidden_size, config.expansion)
        self.eps = config.rms_norm_eps
        self.fp8 = config.fp8

    def forward(self, x, cos_sin):
        if self.mixer == "attention":
            mixed = self.self_attn(x, cos_sin)
        else:
            mixed = self.mix_positions(x)
        if self.fp8 and not torch.is_grad_enabled():  # the norm writes its output in FP8 too, for the MLP
            x, x_fp8 = add_rms_norm_fp8(x, mixed, self.eps)
        else:
            x, x_fp8 = add_rms_norm(x, mixed, self.eps), None
        return add_rms_norm(x, self.mlp(x, x_fp8), self.eps)

    def mix_positions(self, x):
        """The SwiGLU across positions on x (B, T, C), with T zero-padded to a multiple of 8 inside, its weights
        too, so the result is the same: 82 positions in bfloat16 are 164 bytes, not the multiple of 16 that
        cuBLAS's Hopper kernels need. (The padded copy replaces the one the transpose made.)"""
        T, pad = x.shape[1], -x.shape[1] % 8
        if pad == 0:
            return self.token_mlp(x.transpose(1, 2)).transpose(1, 2)
        gate_up, down = self.token_mlp.gate_up_proj.weight.to(x.dtype), self.token_mlp.down_proj.weight.to(x.dtype)
        hidden = swiglu(F.linear(F.pad(x.transpose(1, 2), (0, pad)), F.pad(gate_up, (0, pad))))
        return F.linear(hidden, F.pad(down, (0, 0, 0, pad)))[..., :T].transpose(1, 2)


class ReasoningModule(nn.Module):
    """One recurrent module, H or L: add the injected input to the state, then a stack of blocks."""

    def __init__(self, config, num_layers, num_tokens):
        super().__init__()
        self.layers = nn.ModuleList(Block(config, num_tokens) for _ in range(num_layers))

    def forward(self, z, injection, cos_sin):
        z = z + injection
        for layer in self.layers:
            z = layer(z, cos_sin)
        return z


class PuzzleEmbedding(nn.Module):
    """A learned embedding per puzzle identifier, trained sparsely: only the batch's rows get a gradient
    and an update (by PuzzleEmbeddingSignSGD).

    The table is a buffer, not a parameter, so that the dense optimizer never decays the rows a batch does
    not use. In training the batch's rows are copied into `local_weights`, a fixed-size leaf that collects
    their gradient, and their ids into `local_ids`; fixed sizes keep torch.compile's graph static.
    """

    def __init__(self, num_embeddings, embedding_dim, batch_size, cast_to):
        super().__init__()
        self.cast_to = cast_to
        self.register_buffer("weights", torch.zeros(num_embeddings, embedding_dim))  # zero init
        self.register_buffer("local_weights", torch.zeros(batch_size, embedding_dim, requires_grad=True),
                             persistent=False)
        self.register_buffer("local_ids", torch.zeros(batch_size, dtype=torch.int32), persistent=False)

    def forward(self, ids):
        if not self.training:
            return self.weights[ids].to(self.cast_to)
        if ids.shape[0] != self.local_ids.shape[0]:
            raise ValueError(f"training batch has {ids.shape[0]} sequences but the puzzle embedding was built "
                             f"for batch_size={self.local_ids.shape[0]} (set HRMConfig.batch_size)")
        with torch.no_grad():
            self.local_weights.copy_(self.weights[ids])
            self.local_ids.copy_(ids)
        return self.local_weights.to(self.cast_to)

    def _apply(self, fn, recurse=True):
        # Module._apply moves buffers under autograd, which would turn local_weights into a non-leaf copy
        # whose .grad never fills; move without autograd and make it a leaf again.
        with torch.no_grad():
            super()._apply(fn, recurse)
        self.local_weights.requires_grad_(True)
        return self

# -----------------------------------------------------------------------------
# the model


@dataclass
class HRMConfig:
    vocab_size: int = 11            # Sudoku: PAD, blank, digits 1-9
    seq_len: int = 81               # tokens per puzzle, not counting puzzle-embedding tokens
    puzzle_emb_ndim: int = 0        # width of the per-puzzle embedding; 0 = none
    num_puzzle_identifiers: int = 1
    batch_size: int = 384           # sequences per process in training (sizes the puzzle embedding's buffers)
    H_cycles: int = 2
    L_cycles: int = 2
    H_layers: int = 4
    L_layers: int = 4
    hidden_size: int = 512
    expansion: float = 4.0
    num_heads: int = 8
    pos_encodings: str = "rope"     # 'rope', 'learned' or 'none'
    mixer: str = "attention"        # token mixing: 'attention', or 'mlp' across the positions (TRM's for Sudoku)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    halt_max_steps: int = 16        # ACT segments at most; may be raised at inference
    halt_exploration_prob: float = 0.1
    grad_L_steps: int = 1           # L steps of the last H cycle that backpropagate: 1 is the paper's 1-step
                                    # gradient, L_cycles TRM's gradient through the whole last cycle
    fp8: bool = False               # the MLPs' gate-and-up matmul in FP8 in passes without gradient: all of the
                                    # recurrence but its last L and H steps, the Q-continue pass, evaluation
    act_continue: bool = True       # Q-continue learnt from a bootstrapped second pass; False: halt at Q-halt > 0
    halt_adaptive: bool = False     # in evaluation too, each sequence halts where its Q head says (training always)
    forward_dtype: str = "bfloat16"
    loss_type: str = "stablemax"    # 'stablemax' or 'softmax'

    def __post_init__(self):
        check_ranges(self, self.rules())

    def rules(self):
        """(field, ok, what it must be) for every field."""
        return [
            ("vocab_size", 1 <= self.vocab_size <= 256, "in [1, 256] (tokens are stored as bytes)"),
            ("seq_len", self.seq_len >= 1, ">= 1"),
            ("puzzle_emb_ndim", self.puzzle_emb_ndim >= 0, ">= 0"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("num_puzzle_identifiers", self.num_puzzle_identifiers >= 1, ">= 1"),
            ("H_cycles", self.H_cycles >= 1, ">= 1"), ("L_cycles", self.L_cycles >= 1, ">= 1"),
            ("H_layers", self.H_layers >= 1, ">= 1"), ("L_layers", self.L_layers >= 1, ">= 1"),
            ("hidden_size", self.hidden_size >= 1, ">= 1"), ("expansion", self.expansion > 0, "> 0"),
            ("num_heads", self.num_heads >= 1 and self.hidden_size % self.num_heads == 0
             and not (self.rotates_heads and self.hidden_size // self.num_heads % 2),
             "a divisor of hidden_size (with RoPE, one leaving an even head size: RoPE rotates pairs)"),
            ("pos_encodings", self.pos_encodings in ("rope", "learned", "none"), "'rope', 'learned' or 'none'"),
            ("mixer", self.mixer in ("attention", "mlp"), "'attention' or 'mlp'"),
            ("grad_L_steps", 1 <= self.grad_L_steps <= self.L_cycles, f"in [1, L_cycles={self.L_cycles}]"),
            ("halt_max_steps", self.halt_max_steps >= 1, ">= 1"),
            ("halt_exploration_prob", 0 <= self.halt_exploration_prob <= 1, "in [0, 1]"),
            ("forward_dtype", self.forward_dtype in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
            ("rms_norm_eps", self.rms_norm_eps > 0, "> 0"), ("rope_theta", self.rope_theta > 0, "> 0"),
            ("loss_type", self.loss_type in LOSSES, f"one of {sorted(LOSSES)}")]

    @property
    def rotates_heads(self):
        """Attention rotates each head's queries and keys by RoPE."""
        return self.pos_encodings == "rope" and self.mixer == "attention"


@dataclass
class Carry:
    """What ACT carries from one segment to the next, per sequence."""
    z_H: torch.Tensor           # (B, T, C) H state
    z_L: torch.Tensor           # (B, T, C) L state
    steps: torch.Tensor         # (B,) int32 segments run on the current example
    halted: torch.Tensor        # (B,) bool: the example is done; the next segment starts a new one
    current_data: dict          # the batch entries of the example each sequence is working on

    def state_dict(self):
        """Every tensor of the carry by name (the data's under 'data.'), for a checkpoint."""
        return dict(z_H=self.z_H, z_L=self.z_L, steps=self.steps, halted=self.halted,
                    **{f"data.{k}": v for k, v in self.current_data.items()})

    @classmethod
    def from_state_dict(cls, state, rows=slice(None), device=None):
        """The carry of state_dict()'s output, its sequences `rows` only (a process's slice), on device."""
        state = {k: v[rows].to(device) for k, v in state.items()}
        return cls(z_H=state.pop("z_H"), z_L=state.pop("z_L"), steps=state.pop("steps"), halted=state.pop("halted"),
                   current_data={k.removeprefix("data."): v for k, v in state.items()})


class HRM(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.forward_dtype = getattr(torch, config.forward_dtype)
        C = config.hidden_size
        # token embeddings are initialised at std 1/sqrt(C) and scaled back up by sqrt(C) in use
        self.embed_scale = math.sqrt(C)
        max_positions = self.build_input_output()
        self.q_head = CastedLinear(C, 2, bias=True)  # (halt, continue) logits, read at the first position
        if config.pos_encodings == "rope":
            self.rotary_emb = RotaryEmbedding(C // config.num_heads, max_positions, config.rope_theta)
        elif config.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(max_positions, C, 1 / self.embed_scale, self.forward_dtype)

        self.H_level = ReasoningModule(config, config.H_layers, max_positions)
        self.L_level = ReasoningModule(config, config.L_layers, max_positions)
        if config.fp8 and C % 16:
            raise DataError(f"fp8=True needs hidden_size a multiple of 16 (FP8 rows of 16 bytes), not {C}")
        # the states every example starts from (fixed random vectors, not trained)
        self.register_buffer("H_init", trunc_normal_(torch.empty(C), std=1).to(self.forward_dtype))
        self.register_buffer("L_init", trunc_normal_(torch.empty(C), std=1).to(self.forward_dtype))

        # Q starts near "never halt" (sigmoid(-5) ~ 0.007) so that early training is not cut short
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5)

    def build_input_output(self):
        """The token and puzzle embeddings and lm_head (a Forecaster builds its own ends here instead).
        Returns the number of positions a sequence can have."""
        config, C = self.config, self.config.hidden_size
        self.embed_tokens = CastedEmbedding(config.vocab_size, C, 1 / self.embed_scale, self.forward_dtype)
        self.lm_head = CastedLinear(C, config.vocab_size, bias=False)
        # the puzzle embedding is prepended as ceil(puzzle_emb_ndim / C) extra tokens, zero-padded
        self.puzzle_emb_len = -(config.puzzle_emb_ndim // -C)
        if config.puzzle_emb_ndim > 0:
            self.puzzle_emb = PuzzleEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim,
                                              config.batch_size, self.forward_dtype)
        return config.seq_len + self.puzzle_emb_len

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- one segment: embeddings and the H/L recurrence

    def embed_inputs(self, inputs, puzzle_identifiers, position_ids):
        x = self.embed_tokens(inputs.to(torch.int32))
        if self.config.puzzle_emb_ndim > 0:
            C = self.config.hidden_size
            puzzle = self.puzzle_emb(puzzle_identifiers)
            puzzle = F.pad(puzzle, (0, self.puzzle_emb_len * C - puzzle.shape[-1]))
            x = torch.cat((puzzle.view(-1, self.puzzle_emb_len, C), x), dim=-2)
        if self.config.pos_encodings == "learned":
            # the 1/sqrt(2) keeps the variance of the sum of two unit-variance embeddings
            x = 0.707106781 * (x + self.embed_pos(position_ids))
        return self.embed_scale * x

    def reason(self, z_H, z_L, data):
        """One segment of the H/L recurrence from state (z_H, z_L) on `data`. Returns the new state
        (detached) and the outputs: the token logits and the Q (halt, continue) logits."""
        T = data["inputs"].shape[1] + self.puzzle_emb_len
        position_ids = data.get("position_ids", torch.arange(T, device=z_H.device))
        cos_sin = self.rotary_emb(position_ids) if self.config.pos_encodings == "rope" else None
        x = self.embed_inputs(data["inputs"], data["puzzle_identifiers"], position_ids)
        z_H, z_L = self.recur(z_H, z_L, x, cos_sin)
        logits = self.lm_head(z_H)[:, self.puzzle_emb_len:]
        q_logits = self.q_head(z_H[:, 0]).float()
        return z_H.detach(), z_L.detach(), dict(logits=logits, q_halt_logits=q_logits[..., 0],
                                                q_continue_logits=q_logits[..., 1])

    def recur(self, z_H, z_L, x, cos_sin):
        """The H/L core: H_cycles x L_cycles steps of L, an H step after every L_cycles of them, the input x
        injected into L at every step. Only the final grad_L_steps L steps and the final H step run with
        gradient (1: the paper's 1-step gradient approximation). Returns the new (z_H, z_L)."""
        config = self.config
        with torch.no_grad():
            for h_step in range(config.H_cycles):
                last_cycle = h_step == config.H_cycles - 1
                for _ in range(config.L_cycles - config.grad_L_steps if last_cycle else config.L_cycles):
                    z_L = self.L_level(z_L, z_H + x, cos_sin)
                if not last_cycle:
                    z_H = self.H_level(z_H, z_L, cos_sin)
        for _ in range(config.grad_L_steps):
            z_L = self.L_level(z_L, z_H + x, cos_sin)
        return self.H_level(z_H, z_L, cos_sin), z_L

    # --- ACT: a segment for every sequence, halting, the Q target

    def num_tokens(self, batch):
        """The length of the state (z_H, z_L) for the batch's sequences."""
        return batch["inputs"].shape[1] + self.puzzle_emb_len

    def initial_carry(self, batch):
        """A carry in which every sequence has halted, so the first segment takes its data from the batch."""
        inputs = batch["inputs"]
        B, T = inputs.shape[0], self.num_tokens(batch)
        z = torch.zeros(B, T, self.config.hidden_size, dtype=self.forward_dtype, device=inputs.device)
        return Carry(z_H=z, z_L=z.clone(),
                     steps=torch.zeros(B, dtype=torch.int32, device=inputs.device),
                     halted=torch.ones(B, dtype=torch.bool, device=inputs.device),
                     current_data={k: torch.zeros_like(v) for k, v in batch.items()})

    def forward(self, carry, batch):
        """Run one ACT segment for every sequence of the batch.

        Sequences that halted in the previous segment restart from (H_init, L_init) on their example in
        `batch`; the others continue on the example they hold. Returns (carry, loss, metrics, outputs);
        loss and metrics are None and {} when the batch has no labels.
        """
        config = self.config
        halted = carry.halted
        # (a carry saved in another dtype, resumed on another machine, takes this model's: torch.where would
        # promote the whole recurrence to the wider of the two)
        z_H = torch.where(halted.view(-1, 1, 1), self.H_init, carry.z_H.to(self.H_init.dtype))
        z_L = torch.where(halted.view(-1, 1, 1), self.L_init, carry.z_L.to(self.L_init.dtype))
        steps = torch.where(halted, 0, carry.steps)
        data = {k: torch.where(halted.view((-1,) + (1,) * (v.ndim - 1)), batch[k], v)
                for k, v in carry.current_data.items()}

        z_H, z_L, outputs = self.reason(z_H, z_L, data)
        q_halt_logits, q_continue_logits = outputs["q_halt_logits"], outputs["q_continue_logits"]

        with torch.no_grad():
            steps = steps + 1
            is_last_step = steps >= config.halt_max_steps
            halted = is_last_step
            # in evaluation every sequence runs halt_max_steps segments, so a batch halts together, unless
            # halt_adaptive lets the Q head decide there as in training (model.solve then refills the batch)
            if (self.training or config.halt_adaptive) and config.halt_max_steps > 1:
                # without Q-continue (TRM's simplification: half the forward passes) halting needs Q-halt > 0
                halted = halted | (q_halt_logits > (q_continue_logits if config.act_continue else 0))
            if self.training and config.halt_max_steps > 1:
                # exploration: with probability halt_exploration_prob, a random minimum number of segments
                explore = torch.rand_like(q_halt_logits) < config.halt_exploration_prob
                min_halt_steps = explore * torch.randint_like(steps, low=2, high=config.halt_max_steps + 1)
                halted = halted & (steps >= min_halt_steps)
            if self.training and config.halt_max_steps > 1 and config.act_continue:
                # Q-continue's target is the value of the next segment, bootstrapped from a second pass (no
                # replay buffer or target network: a large batch is many parallel environments, as in PQN)
                _, _, following = self.reason(z_H, z_L, data)
                next_q_halt, next_q_continue = following["q_halt_logits"], following["q_continue_logits"]
                outputs["target_q_continue"] = torch.sigmoid(
                    torch.where(is_last_step, next_q_halt, torch.maximum(next_q_halt, next_q_continue)))

        carry = Carry(z_H=z_H, z_L=z_L, steps=steps, halted=halted, current_data=data)
        if "labels" not in data:
            return carry, None, {}, outputs
        loss, metrics = self.act_loss(carry, outputs)
        return carry, loss, metrics, outputs

    @torch.no_grad()
    def run_to_halt(self, forward, batch):
        """Segments from a fresh carry until every sequence halted: in evaluation halt_max_steps of them, or
        with config.halt_adaptive each where its Q head first says halt (it then restarts on its example, and
        what it does after is dropped). forward: this model, or its compiled version. Returns the metrics
        (empty without labels) and outputs of each sequence's halting segment, outputs["steps"] (B,) being the
        segments it ran."""
        carry = self.initial_carry(batch)
        answered, outputs = torch.zeros_like(carry.halted), None
        while not answered.all():
            carry, _, _, latest = forward(carry, batch)
            first = carry.halted & ~answered
            latest = dict(latest, steps=carry.steps)
            outputs = latest if outputs is None else {
                k: torch.where(first.view((-1,) + (1,) * (v.ndim - 1)), v, outputs[k]) for k, v in latest.items()}
            answered = answered | first
        if "labels" not in batch:
            return {}, outputs
        answers = replace(carry, steps=outputs["steps"], halted=answered)
        return self.act_loss(answers, outputs, scored_only=True)[1], outputs

    @torch.no_grad()
    def solve(self, forward, inputs, puzzle_identifiers, batch_size, labels=None, progress=None):
        """Every input through ACT segments, batch_size at a time, all on the device: a slot whose input halted
        takes the next one, as in training, so with config.halt_adaptive the batch works only on unfinished
        inputs. forward: this model (in eval mode) or its compiled version; inputs (N, seq_len) and
        puzzle_identifiers (N,) on the model's device. labels (N, seq_len), optional, change no result: a
        compiled forward that has run labelled evaluation batches runs the same graph here, where a batch
        without labels would compile another. progress, optional, is called with the number of inputs finished
        at each sync (for a progress bar). Returns the predicted tokens (N, seq_len) uint8, the Q head's final
        halting probability (N,) and the segments each input ran (N,)."""
        N, B = inputs.shape[0], min(batch_size, inputs.shape[0])
        # the keys in the order of dataset.py's batches: a compiled forward's graph is keyed on it too
        data = dict(inputs=inputs, **({} if labels is None else dict(labels=labels)),
                    puzzle_identifiers=puzzle_identifiers)
        # row N of the results takes what the slots without an input (at the end) produce
        predictions = torch.zeros(N + 1, inputs.shape[1], dtype=torch.uint8, device=inputs.device)
        q_halt = torch.zeros(N + 1, device=inputs.device)
        segments = torch.zeros(N + 1, dtype=torch.int32, device=inputs.device)
        slot = torch.full((B,), N, device=inputs.device)  # the input each slot holds; N: none
        handed_out, finished = torch.zeros((), dtype=torch.long, device=inputs.device), 0
        carry = self.initial_carry({k: v[:B] for k, v in data.items()})
        while finished < N:
            for _ in range(self.config.halt_max_steps):  # between two syncs: the GPU is never left waiting
                fresh = carry.halted
                slot = torch.where(fresh, (handed_out + fresh.cumsum(0) - 1).clamp(max=N), slot)
                handed_out = handed_out + fresh.sum()
                carry, _, _, outputs = forward(carry, {k: v[slot.clamp(max=N - 1)] for k, v in data.items()})
                row = torch.where(carry.halted, slot, N)
                predictions[row] = outputs["logits"].argmax(-1).to(torch.uint8)
                q_halt[row] = torch.sigmoid(outputs["q_halt_logits"])
                segments[row] = carry.steps
            finished = int(handed_out.clamp(max=N) - ((slot < N) & ~carry.halted).sum())  # handed out, halted
            if progress is not None:
                progress(finished)
        return predictions[:N], q_halt[:N], segments[:N]

    def predictions(self, outputs):
        """What a task's evaluate reads: the predicted tokens (B, seq_len), uint8."""
        return outputs["logits"].argmax(-1).to(torch.uint8)

    # --- the loss

    def act_loss(self, carry, outputs, scored_only=False):
        """Token loss, normalised per sequence, plus 0.5 x the two Q losses: Q-halt against whole-sequence
        correctness, Q-continue against the bootstrapped target. Losses are sums over the batch (divide by
        the global batch size before backward), as the original's, or with scored_only over the sequences
        with something to score (evaluation's padding rows have nothing). Metrics are sums over the sequences
        that halted."""
        labels = carry.current_data["labels"]
        logits, q_halt_logits = outputs["logits"], outputs["q_halt_logits"]
        with torch.no_grad():
            mask = labels != IGNORE_LABEL_ID
            loss_counts = mask.sum(-1)
            loss_divisor = loss_counts.clamp_min(1).unsqueeze(-1)
            is_correct = mask & (logits.argmax(-1) == labels)
            seq_is_correct = is_correct.sum(-1) == loss_counts
            valid = carry.halted & (loss_counts > 0)
            metrics = dict(
                count=valid.sum(),
                accuracy=torch.where(valid, (is_correct.float() / loss_divisor).sum(-1), 0).sum(),
                exact_accuracy=(valid & seq_is_correct).sum(),
                q_halt_accuracy=(valid & ((q_halt_logits >= 0) == seq_is_correct)).sum(),
                steps=torch.where(valid, carry.steps, 0).sum(),
            )

        lm_loss = (LOSSES[self.config.loss_type](logits, labels) / loss_divisor).sum()
        metrics["lm_loss"] = lm_loss.detach()
        counted = loss_counts > 0 if scored_only else None
        return lm_loss + self.q_loss(outputs, seq_is_correct, metrics, counted), metrics

    def q_loss(self, outputs, halt_target, metrics, counted=None):
        """0.5 x the two Q losses, sums over the batch (or its `counted` rows (B,), where some are padding):
        Q-halt against halt_target (B,) (the answer is right), Q-continue against the bootstrapped target
        (training only). Each is also put in metrics."""
        total = lambda losses: losses.sum() if counted is None else torch.where(counted, losses, 0).sum()
        q_halt_logits = outputs["q_halt_logits"]
        q_halt_loss = total(F.binary_cross_entropy_with_logits(q_halt_logits, halt_target.to(q_halt_logits.dtype),
                                                               reduction="none"))
        metrics["q_halt_loss"] = q_halt_loss.detach()
        q_continue_loss = 0
        if "target_q_continue" in outputs:
            q_continue_loss = total(F.binary_cross_entropy_with_logits(outputs["q_continue_logits"],
                                                                       outputs["target_q_continue"], reduction="none"))
            metrics["q_continue_loss"] = q_continue_loss.detach()
        return 0.5 * (q_halt_loss + q_continue_loss)

    # --- optimizers

    def configure_optimizers(self, learning_rate, weight_decay, betas, puzzle_emb_lr, puzzle_emb_weight_decay,
                             optimizer="adam_atan2"):
        """The dense optimizer over every parameter (weight decay on all, as the original) and the SignSGD
        optimizer of the sparse puzzle embedding, or None without one. Returns (dense, sparse)."""
        check_ranges(dict(learning_rate=learning_rate, weight_decay=weight_decay, betas=betas, optimizer=optimizer,
                          puzzle_emb_lr=puzzle_emb_lr, puzzle_emb_weight_decay=puzzle_emb_weight_decay), [
            ("learning_rate", learning_rate > 0, "> 0"), ("weight_decay", weight_decay >= 0, ">= 0"),
            ("betas", all(0 <= b < 1 for b in betas), "in [0, 1)"), ("puzzle_emb_lr", puzzle_emb_lr >= 0, ">= 0"),
            ("puzzle_emb_weight_decay", puzzle_emb_weight_decay >= 0, ">= 0"),
            ("optimizer", optimizer in ("adam_atan2", "adamw"), "'adam_atan2' or 'adamw'")])
        params = list(self.parameters())
        if optimizer == "adam_atan2":
            dense = AdamAtan2(params, lr=learning_rate, betas=betas, weight_decay=weight_decay)
        else:
            dense = torch.optim.AdamW(params, lr=learning_rate, betas=betas, weight_decay=weight_decay,
                                      fused=params[0].is_cuda)
        sparse = None
        if hasattr(self, "puzzle_emb"):  # a forecaster has none, whatever its config's puzzle_emb_ndim
            sparse = PuzzleEmbeddingSignSGD(self.puzzle_emb, lr=puzzle_emb_lr, weight_decay=puzzle_emb_weight_decay)
        return dense, sparse


# -----------------------------------------------------------------------------
# losses

def log_stablemax(x, dim=-1):
    # stablemax replaces exp with s(x) = x + 1 for x >= 0 and 1 / (1 - x) below: linear growth, no overflow
    s = torch.where(x < 0, 1 / (1 - x + 1e-30), x + 1)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits, labels):
    """Per-token loss, 0 where the label is IGNORE_LABEL_ID; computed in float64 as the original does."""
    logprobs = log_stablemax(logits.to(torch.float64))
    valid = labels != IGNORE_LABEL_ID
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return -torch.where(valid, picked, 0)


def softmax_cross_entropy(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, -2), labels.long().flatten(),
                           ignore_index=IGNORE_LABEL_ID, reduction="none").view(labels.shape)


LOSSES = {"stablemax": stablemax_cross_entropy, "softmax": softmax_cross_entropy}

# -----------------------------------------------------------------------------
# forecasting: the same H/L core and ACT with a time-series front and back

NUM_CALENDAR = 5  # calendar features per step: hour, day of week, day of month, day of year, month (dataset.py)


@dataclass
class ForecastConfig(HRMConfig):
    """HRMConfig's core (cycles, layers, width, heads, positions, ACT) with a time-series front and back; its
    token fields (vocab_size, seq_len, puzzle_emb_ndim, num_puzzle_identifiers, batch_size) are not used."""
    num_features: int = 7           # variables of the series, every one both input and forecast
    input_len: int = 96             # steps of history (the most: the time layout also takes fewer)
    horizon: int = 96               # steps to forecast
    layout: str = "patch"           # a token is a 'time' step, a 'patch' of one variable, or a 'variable'
    head: str = "oneshot"           # 'oneshot' (the whole horizon at once) or 'autoregressive'
    patch_len: int = 16             # the patch layout: steps per patch, a new patch every patch_len // 2
    loss_type: str = "mse"          # 'mse' or 'mae' of a window's forecast
    halt_tolerance: float = 0.1     # Q-halt learns whether a window's forecast MSE is under this

    def rules(self):
        return [r for r in super().rules() if r[0] not in ("loss_type", "mixer")] + [
            ("num_features", self.num_features >= 1, ">= 1"), ("input_len", self.input_len >= 1, ">= 1"),
            ("horizon", self.horizon >= 1, ">= 1"),
            ("layout", self.layout in ("time", "patch", "variable"), "'time', 'patch' or 'variable'"),
            ("head", self.head in ("oneshot", "autoregressive"), "'oneshot' or 'autoregressive'"),
            ("patch_len", self.layout != "patch" or 2 <= self.patch_len <= self.input_len,
             f"in [2, input_len={self.input_len}] for the patch layout"),
            ("loss_type", self.loss_type in ("mse", "mae"), "'mse' or 'mae'"),
            ("mixer", self.mixer == "attention", "'attention' for a forecaster (a window's tokens vary in number)"),
            ("halt_tolerance", self.halt_tolerance > 0, "> 0")]

    @property
    def rotates_heads(self):
        return super().rotates_heads and self.layout != "variable"  # the variable layout's tokens have no order

    @property
    def steps_per_forecast(self):
        """What the head predicts at once: the horizon (one-shot), else the next step (the next patch)."""
        if self.head == "oneshot":
            return self.horizon
        return self.patch_len if self.layout == "patch" else 1


class TimeSeriesEmbedding(nn.Module):
    """A window's history (B, L, F), already normalised, with the calendar features of its steps and of the
    steps to forecast -> the tokens the core reads (B', T, C) and their positions (T,). The layouts:

    time      a token per step of history (its F values and calendar features, projected), then a token per
              step to forecast (its calendar features, projected: the future's calendar is known). Positions
              count from the start of the longest window, so a shorter one keeps every step's distance to
              the forecast. B' = B.
    patch     each variable on its own (PatchTST, Nie et al. 2023): its history, with patch_len // 2 copies of
              its last value appended, cut into patches of patch_len steps every patch_len // 2 steps, each
              projected. B' = B x F: the core attends within a variable only.
    variable  a token per variable and per calendar feature, its whole history projected (iTransformer, Liu
              et al. 2024). Tokens without an order: RoPE is left out; learned positions identify them.
    """

    def __init__(self, config):
        super().__init__()
        self.config, self.dtype = config, getattr(torch, config.forward_dtype)
        C, F, L = config.hidden_size, config.num_features, config.input_len
        if config.layout == "time":
            self.history = CastedLinear(F + NUM_CALENDAR, C, bias=True)
            self.future = CastedLinear(NUM_CALENDAR, C, bias=True)
            self.max_positions = L + config.steps_per_forecast
        elif config.layout == "patch":
            self.stride = config.patch_len // 2
            self.num_patches = (L - config.patch_len) // self.stride + 2
            self.patch = CastedLinear(config.patch_len, C, bias=True)
            self.max_positions = self.num_patches
        else:
            self.window = CastedLinear(L, C, bias=True)
            self.max_positions = F + NUM_CALENDAR

    def num_tokens(self, input_len):
        """Tokens per window in the carried state: (B, T, C)."""
        config = self.config
        if config.layout == "time":
            return input_len + config.steps_per_forecast
        return config.num_features * self.num_patches if config.layout == "patch" else self.max_positions

    def forward(self, inputs, input_marks, target_marks):
        B, L, F = inputs.shape
        config, device = self.config, inputs.device
        if config.layout == "time":
            if L > config.input_len:
                raise ValueError(f"a window of {L} steps is longer than input_len={config.input_len}")
            history = self.history(torch.cat((inputs, input_marks), -1).to(self.dtype))
            future = self.future(target_marks[:, :config.steps_per_forecast].to(self.dtype))
            positions = torch.arange(config.input_len - L, config.input_len + future.shape[1], device=device)
            return torch.cat((history, future), 1), positions
        if L != config.input_len:
            raise ValueError(f"the {config.layout} layout takes windows of input_len={config.input_len} steps, got {L}")
        if config.layout == "patch":
            series = inputs.transpose(1, 2)  # (B, F, L)
            series = torch.cat((series, series[..., -1:].expand(B, F, self.stride)), -1)
            patches = series.unfold(-1, config.patch_len, self.stride)  # (B, F, patches, patch_len)
            x = self.patch(patches.reshape(B * F, self.num_patches, config.patch_len).to(self.dtype))
            return x, torch.arange(self.num_patches, device=device)
        variables = torch.cat((inputs, input_marks), -1).transpose(1, 2)  # (B, F + calendar, L)
        return self.window(variables.to(self.dtype)), torch.arange(self.max_positions, device=device)


class TSRegressionHead(nn.Module):
    """The core's final H state -> the forecast (B, steps, F) in float32, still normalised, where steps is
    config.steps_per_forecast: the horizon (one-shot) or the next step, the next patch_len for the patch
    layout (autoregressive). time: each forecast token projected to its step's F values; patch: a variable's
    patch tokens flattened and projected to its steps (PatchTST's flatten head), shared by the variables;
    variable: a variable's token projected to its steps."""

    def __init__(self, config, embedding):
        super().__init__()
        self.config = config
        C, steps = config.hidden_size, config.steps_per_forecast
        if config.layout == "time":
            self.proj = CastedLinear(C, config.num_features, bias=True)
        elif config.layout == "patch":
            self.proj = CastedLinear(embedding.num_patches * C, steps, bias=True)
        else:
            self.proj = CastedLinear(C, steps, bias=True)

    def forward(self, z_H, batch_size):
        z, config = z_H.float(), self.config
        if config.layout == "time":
            return self.proj(z[:, -config.steps_per_forecast:])
        if config.layout == "patch":
            z = z.reshape(batch_size, config.num_features, -1)  # (B, F, patches x C)
        else:
            z = z[:, :config.num_features]
        return self.proj(z).transpose(1, 2)


class Forecaster(HRM):
    """HRM forecasting a multivariate series through the same H/L core and ACT segments. A batch holds windows:
    inputs (B, L, F) and labels (B, horizon, F), values normalised by the series' training statistics, their
    calendar features input_marks (B, L, 5) and target_marks (B, horizon, 5), and valid (B,), False for
    padding. Outputs: the forecast (B, horizon, F) and the Q logits.

    Each window is first normalised by its own mean and std per variable, and the forecast mapped back
    (RevIN without its affine part, Kim et al. 2022, as PatchTST and iTransformer do: ETT's levels drift
    between the training and the test months). Q reads the mean of the H state.

    Halting: Q-halt learns whether this segment's forecast is good enough, its window's MSE under
    halt_tolerance: the regression reading of a puzzle's "the answer is correct", so training halts windows
    as it halts puzzles (Q-continue bootstrapped from the next segment, the same exploration). In evaluation
    every window runs halt_max_steps segments, as puzzles do, so the metrics do not depend on Q (unless
    halt_adaptive). The default tolerance, 0.1 (the series' variance is 1), lets few ETTh1 windows leave
    early; at 0.3, about the median window's error, half of them left after one segment of two and
    validation MSE was worse (train.py config/etth1.py --halt_tolerance=0.3 on an H200: 0.721 against 0.709
    with patches, 0.742 against 0.711 with --ts_layout=variable; one run each).

    The autoregressive head is the iterated strategy: trained on the next step (patch) only, it forecasts the
    horizon by feeding its forecasts back as history (run_to_halt)."""

    def build_input_output(self):
        self.embed = TimeSeriesEmbedding(self.config)
        self.head = TSRegressionHead(self.config, self.embed)
        return self.embed.max_positions

    def num_tokens(self, batch):
        return self.embed.num_tokens(batch["inputs"].shape[1])

    def reason(self, z_H, z_L, data):
        inputs = data["inputs"].float()
        mean = inputs.mean(1, keepdim=True)
        std = (inputs.var(1, keepdim=True, unbiased=False) + 1e-5).sqrt()
        x, position_ids = self.embed((inputs - mean) / std, data["input_marks"], data["target_marks"])
        cos_sin = None
        if self.config.pos_encodings == "learned":
            x = 0.707106781 * (x + self.embed_scale * self.embed_pos(position_ids))
        elif self.config.pos_encodings == "rope" and self.config.layout != "variable":
            cos_sin = self.rotary_emb(position_ids)
        shape = z_H.shape  # (B, T, C); the core runs on (B', T', C), the shape of x
        z_H, z_L = self.recur(z_H.view(x.shape), z_L.view(x.shape), x, cos_sin)
        forecast = self.head(z_H, len(inputs)) * std + mean
        z_H, z_L = z_H.view(shape), z_L.view(shape)
        q_logits = self.q_head(z_H.mean(1)).float()
        return z_H.detach(), z_L.detach(), dict(forecast=forecast, q_halt_logits=q_logits[..., 0],
                                                q_continue_logits=q_logits[..., 1])

    def act_loss(self, carry, outputs, scored_only=True):
        """The forecast loss, a window's MSE or MAE summed over the windows that are not padding, plus HRM's Q
        losses, Q-halt's target being MSE < halt_tolerance; padding windows are never scored (scored_only
        always holds). Metrics: sums over the windows that halted."""
        data = carry.current_data
        mse, mae, metrics = self.forecast_metrics(outputs, data, carry.halted & data["valid"], carry.steps)
        forecast_loss = torch.where(data["valid"], mse if self.config.loss_type == "mse" else mae, 0).sum()
        metrics["forecast_loss"] = forecast_loss.detach()
        return forecast_loss + self.q_loss(outputs, mse.detach() < self.config.halt_tolerance, metrics,
                                           data["valid"]), metrics

    def forecast_metrics(self, outputs, data, counted, steps):
        """Each window's MSE and MAE (B,) over the steps both the forecast and its labels have (an
        autoregressive patch may reach past a shorter horizon), and the metrics: sums over the `counted`
        windows."""
        steps_scored = min(outputs["forecast"].shape[1], data["labels"].shape[1])
        error = outputs["forecast"][:, :steps_scored] - data["labels"][:, :steps_scored].float()
        mse, mae = error.square().mean((1, 2)), error.abs().mean((1, 2))
        with torch.no_grad():
            good = mse < self.config.halt_tolerance
            metrics = dict(count=counted.sum(), mse=torch.where(counted, mse, 0).sum(),
                           mae=torch.where(counted, mae, 0).sum(),
                           q_halt_accuracy=(counted & ((outputs["q_halt_logits"] >= 0) == good)).sum(),
                           steps=torch.where(counted, steps, 0).sum())
        return mse, mae, metrics

    @torch.no_grad()
    def run_to_halt(self, forward, batch):
        """HRM's for the one-shot head. The autoregressive one forecasts the next step (patch), which joins
        the history as the window moves forward as many steps, until the horizon is covered; the metrics are
        then the whole horizon's, its steps the mean segments per forecast step."""
        if self.config.head == "oneshot":
            return super().run_to_halt(forward, batch)
        window, pieces, segments = {k: v for k, v in batch.items() if k != "labels"}, [], []
        while True:
            _, outputs = super().run_to_halt(forward, window)
            step = outputs["forecast"]
            pieces.append(step)
            segments.append(outputs["steps"])
            k = step.shape[1]
            if sum(p.shape[1] for p in pieces) >= self.config.horizon:
                break
            window = dict(window, inputs=torch.cat((window["inputs"][:, k:], step), 1),
                          input_marks=torch.cat((window["input_marks"][:, k:], window["target_marks"][:, :k]), 1),
                          target_marks=window["target_marks"][:, k:])
        steps = torch.stack(segments).float().mean(0)
        outputs = dict(outputs, forecast=torch.cat(pieces, 1)[:, :self.config.horizon], steps=steps)
        return self.forecast_metrics(outputs, batch, batch["valid"], steps)[2], outputs

    def predictions(self, outputs):
        """What the time-series task's evaluate reads: the forecast (B, horizon, F), float32."""
        return outputs["forecast"]


def build_model(model_args):
    """The model train.py's model_args describe: a Forecaster when they have a horizon, else an HRM."""
    return Forecaster(ForecastConfig(**model_args)) if "horizon" in model_args else HRM(HRMConfig(**model_args))


# -----------------------------------------------------------------------------
# optimizers


class AdamAtan2(torch.optim.Optimizer):
    """Adam with atan2 in place of the epsilon division (Everett et al. 2024), as the original HRM trains it
    (the adam-atan2 package's CUDA kernel, its first bias correction outside the atan2):

        m = lerp(m, g, 1 - beta1);  v = lerp(v, g^2, 1 - beta2)
        p = p * (1 - lr * weight_decay) - lr / (1 - beta1^t) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))

    atan2(a, b) ~ a / b where |a| << b and is bounded by pi/2, so there is no epsilon to tune."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        # each line updates every tensor of a group in a few multi-tensor kernels (torch._foreach_*): a loop of
        # ~9 small kernels per tensor takes ~6 ms of CPU a step to launch, which bounds the step when each GPU
        # has little work (small batches per GPU)
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            grads = [p.grad for p in params]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_lerp_(v, torch._foreach_mul(grads, grads), 1 - beta2)
            torch._foreach_mul_(params, 1 - lr * weight_decay)
            v_hat = torch._foreach_sqrt(v)
            torch._foreach_div_(v_hat, [math.sqrt(1 - beta2 ** t) for t in steps])
            update = [torch.atan2(a, b) for a, b in zip(m, v_hat)]  # there is no multi-tensor atan2
            torch._foreach_mul_(update, [-lr / (1 - beta1 ** t) for t in steps])
            torch._foreach_add_(params, update)


class WeightEMA:
    """An exponential moving average of a model's parameters, updated after every optimizer step (ema = decay
    * ema + (1 - decay) * p) and swapped in for evaluation: TRM evaluates with it (Sudoku 79.9% -> 87.4%).
    The puzzle embedding, a buffer trained by SignSGD, is not averaged, as in TRM."""

    def __init__(self, model, decay):
        self.decay, self.params = decay, dict(model.named_parameters())
        self.average = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(list(self.average.values()), list(self.params.values()), 1 - self.decay)

    @torch.no_grad()
    def swap(self):
        """Exchange the model's parameters and the average in place (a compiled model sees the same tensors);
        a second call swaps them back."""
        for name, p in self.params.items():
            held = p.detach().clone()
            p.copy_(self.average[name])
            self.average[name].copy_(held)

    def state_dict(self):
        return {name: a.cpu() for name, a in self.average.items()}

    @torch.no_grad()
    def load_state_dict(self, state):
        for name, a in self.average.items():
            a.copy_(state[name])


class PuzzleEmbeddingSignSGD(torch.optim.Optimizer):
    """SignSGD with decoupled weight decay on the rows of a PuzzleEmbedding that the last batch used
    (for gradients this sparse Adam's update is close to the sign anyway). Under torch.distributed every
    rank gathers all ranks' ids and gradients and sums those of duplicate ids before taking the sign, so
    every rank applies the same update to its copy of the table."""

    def __init__(self, puzzle_emb, lr=1e-2, weight_decay=0.1):
        super().__init__([puzzle_emb.weights], dict(lr=lr, weight_decay=weight_decay))
        self.puzzle_emb = puzzle_emb

    @torch.no_grad()
    def step(self):
        grad, ids = self.puzzle_emb.local_weights.grad, self.puzzle_emb.local_ids
        if grad is None:
            return
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            all_grad = grad.new_empty((world * grad.shape[0], grad.shape[1]))
            all_ids = ids.new_empty(world * ids.shape[0])
            dist.all_gather_into_tensor(all_grad, grad.contiguous())
            dist.all_gather_into_tensor(all_ids, ids)
            grad, ids = all_grad, all_ids
        # the gradients of a duplicate id are summed before the sign, without ids.unique(): its data-dependent
        # size would make the host wait for the GPU every step (and the next step's launches start from an
        # idle GPU). Sorted, equal ids are runs; every row of a run gets the same new row, so the index_put
        # below writes one value per id whichever duplicate lands last
        ids, order = ids.sort()
        run_start = torch.ones_like(ids, dtype=torch.bool)
        run_start[1:] = ids[1:] != ids[:-1]
        run_of_row = run_start.cumsum(0) - 1
        summed = torch.zeros_like(grad).index_add_(0, run_of_row, grad[order])[run_of_row]
        for group in self.param_groups:
            weights = group["params"][0]
            rows = weights[ids] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * summed.sign()
            weights[ids] = rows

    def zero_grad(self, set_to_none=True):
        self.puzzle_emb.local_weights.grad = None


# -----------------------------------------------------------------------------
# checkpoints of the original implementation (github.com/sapientinc/HRM)

REFERENCE_LOSS_TYPES = {"stablemax_cross_entropy": "stablemax", "softmax_cross_entropy": "softmax"}
REFERENCE_IGNORED_KEYS = {"name", "causal"}  # the class to load; always False for HRM


def config_from_reference(reference_config, **overrides):
    """HRMConfig from the original's config: its flat model config dict, or a whole training config
    (all_config.yaml loaded as a dict) holding it under 'arch'. The dataset-derived fields (seq_len,
    vocab_size, num_puzzle_identifiers, batch_size) are not in all_config.yaml: pass them as overrides."""
    flat = dict(reference_config.get("arch", reference_config))
    flat.update(overrides)
    loss = flat.pop("loss", None)
    if isinstance(loss, dict):
        flat.setdefault("loss_type", loss.get("loss_type", "stablemax_cross_entropy"))
    if "loss_type" in flat:
        flat["loss_type"] = REFERENCE_LOSS_TYPES.get(flat["loss_type"], flat["loss_type"])
    known = {f.name for f in fields(HRMConfig)}
    unknown = sorted(k for k in flat if k not in known and k not in REFERENCE_IGNORED_KEYS)
    if unknown:
        raise DataError(f"unknown keys in the reference config: {', '.join(unknown)}")
    return HRMConfig(**{k: v for k, v in flat.items() if k in known})


def convert_reference_state_dict(state_dict):
    """Rename the original's state-dict keys to this model's: drop the prefixes of torch.compile
    ('_orig_mod.'), its loss head ('model.') and ACT wrapper ('inner.'); its embeddings' 'embedding_weight'
    is our 'weight'. Everything else has the same name here."""
    converted = {}
    for key, value in state_dict.items():
        name = key.removeprefix("_orig_mod.").removeprefix("model.").removeprefix("inner.")
        converted[name.replace("embedding_weight", "weight")] = value
    return converted


def load_reference_checkpoint(state_dict, reference_config, **overrides):
    """An HRM holding the weights of a checkpoint saved by the original implementation. `state_dict` is
    the loaded checkpoint (or its path); keys missing or left over are a DataError that names them."""
    where = state_dict if isinstance(state_dict, str) else "the checkpoint"
    if isinstance(state_dict, str):
        state_dict = load_checkpoint(state_dict, required=())
    if {"model", "model_args", "iter_num"} <= set(state_dict):
        raise DataError(f"{where} was saved by this repository's train.py, not the original implementation: "
                        f"continue it with --init_from=resume and its folder as --out_dir")
    model = HRM(config_from_reference(reference_config, **overrides))
    converted = convert_reference_state_dict(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    if missing or unexpected or mismatched:
        raise DataError(f"{where} does not match the model: missing {missing or 'none'}, unexpected "
                        f"{unexpected or 'none'}, other shapes {mismatched or 'none'}")
    model.load_state_dict(converted)
    return model


def load_checkpoint(path, required=("model", "model_args", "config", "iter_num")):
    """A checkpoint read with weights_only=True (tensors and plain values, no code runs). A missing,
    truncated or foreign file is a DataError naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:  # torch.load raises many types for a damaged or foreign file
        raise DataError(f"{path}: not a readable checkpoint, truncated or from other code? "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    missing = [k for k in required if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise DataError(f"{path}: not a checkpoint of train.py (no {', '.join(missing)})")
    return checkpoint


def check_device(device):
    """device ('cpu', 'cuda', 'cuda:<n>' or 'mps') if torch can use it here, else a DataError saying why."""
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise DataError(f"device={device!r}: must be 'cpu', 'cuda', 'cuda:<n>' or 'mps'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"device={device!r}, but torch sees no CUDA GPU (a CPU-only build of torch, or no driver?); "
                        f"use --device=cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise DataError(f"device={device!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DataError("device='mps', but MPS is not available here")
    return device


def check_fp8(device, dtype):
    """For fp8=True: on a GPU kernels_matmul's FP8 kernel, which needs a Hopper GPU (H100, H200) and computes
    in bfloat16 or float16; on the CPU, in any dtype, the same products dequantized and multiplied in float32
    (slow: for tests and dry runs); MPS has no float8. Else a DataError saying why."""
    if device == "mps":
        raise DataError("fp8=True: torch has no float8 on MPS; use device='cuda' or 'cpu'")
    if not device.startswith("cuda"):
        return
    if kernels.kernels_matmul is None:
        raise DataError(f"fp8=True needs kernels_matmul's FP8 kernel, and {kernels._matmul_missing}")
    capability = torch.cuda.get_device_capability(device)
    if capability[0] != 9:
        raise DataError(f"fp8=True runs an FP8 kernel written for Hopper GPUs (H100, H200); "
                        f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}")
    if dtype not in ("bfloat16", "float16"):
        raise DataError(f"fp8=True computes in bfloat16 or float16 on a GPU, not dtype={dtype!r}")
