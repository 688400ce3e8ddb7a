"""The DiT's CPU execution forms: the same maths as the released model in :mod:`.dit`, in forms that run faster on CPU.

A DiT switches to them with ``set_kernels(fast_kernels("cpu"))`` (see :class:`.dit.DiTKernels`); the released forms
stay the default, the reference path and what GPUs and exported files run. Stage 2 on CPU is bound by eager
elementwise passes, the attention's tiny batched matmuls and per-op overhead: the linears run near the cores' fp32
peak and take a little over half of a step. Each form below removes passes or ops from the rest.

* ``gelu="sigmoid"``, :func:`sigmoid_gelu`: the tanh-GELU as x·σ(x·(A + B·x²)) through 0.5·(1 + tanh u) = σ(2u),
  with a hand-written backward (:class:`SigmoidGelu`). torch's tanh kernels were the slowest elementwise op of a
  small DiT on CPU. Without gradients it is two buffers updated in place instead of six fresh ones.
* ``attention="math"``, :func:`math_attention`: softmax(q·kᵀ/√d)·v as two batched matmuls, one copy for q, k and v
  and the 1/√d scale inside the first matmul; quicker than the CPU flash kernel for few tokens.
* ``fused=True``:

  - :func:`fused_block`: the adaLN modulation x·(1 + scale) + shift and the gated residual x + gate·f(x) each as one
    ``addcmul`` instead of two passes;
  - :func:`patch_embed_matmul`: the patch embedding as one matmul over patches flattened by ``pixel_unshuffle``
    instead of a strided convolution, whose backward alone cost more than a block's attention;
    :func:`final_layer_pixel_shuffle`: the final layer's output features taken in ``pixel_shuffle``'s order, which
    then places the patches. Both kernels were ~3.5× quicker than the 6-d permute copies they replace (64 digits
    latents: 240 → 70 µs and 170 → 50 µs), and so are their backwards;
  - :class:`FrozenBlock`: with frozen weights and a gradient wanted for the input only (stage 2), each block as one
    autograd node with a written-out backward;
  - :class:`ConditioningMemo`: the adaLN outputs per (timestep, label), computed once instead of for every image at
    every step.

Measured on the digits stage-2 forward and backward (batch 64, 2 threads, 50-60 alternating rounds in one process,
ratios of the fastest quarter): the block node 1.06–1.11×, the memo 1.03–1.05×, the GELU derivative saved in the
block node's forward 1.02–1.06×. Forward and input gradient stay within 1e-5 of the released forms
(``tests/test_dit.py``), and a stage-2 run in these forms ends within 2e-7 of the reference path's latents.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .dit import DiT, DiTBlock

# ----------------------------------------------------------------------------------------------------------------
# GELU

# tanh-GELU through the logistic identity 0.5·(1 + tanh(u)) = σ(2u): gelu(x) = x·σ(x·(A + B·x²)).
_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_B = _GELU_A * 0.044715


def _gelu_arg(x: torch.Tensor, b: float) -> torch.Tensor:
    """x·(A + b·x²) in two passes: one ``addcmul`` from a 0-dim A, then a multiply in place."""
    return torch.addcmul(torch.full((), _GELU_A, dtype=x.dtype, device=x.device), x, x, value=b).mul_(x)


class SigmoidGelu(torch.autograd.Function):
    """tanh-GELU as x·σ(u) with a hand-written backward of a few in-place passes. Saves x and σ(u) for the
    backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = _gelu_arg(x, _GELU_B).sigmoid_()
        ctx.save_for_backward(x, s)
        return torch.mul(x, s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        # d/dx [x·σ(u)] = σ + x·σ·(1 − σ)·du/dx with du/dx = A + 3B·x²; with d = x·du/dx that is σ·(1 + d − d·σ)
        d = _gelu_arg(x, 3.0 * _GELU_B)
        ds = torch.mul(d, s)
        return d.sub_(ds).add_(1.0).mul_(s).mul_(grad)


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    """The DiT's tanh-approximate GELU in the sigmoid form: :class:`SigmoidGelu` under autograd in eager mode, plain
    ops under autograd while compiling (the compiler fuses them and derives the backward), and one new buffer
    updated in place without gradients."""
    if torch.is_grad_enabled() and x.requires_grad:
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(x * (_GELU_A + _GELU_B * x * x))
        return SigmoidGelu.apply(x)
    return _gelu_arg(x, _GELU_B).sigmoid_().mul_(x)


# ----------------------------------------------------------------------------------------------------------------
# Attention


def math_attention(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√d)·v of a (3, B, H, N, d) view of stacked q, k, v, returned as (B, H, N, d), with what a
    backward needs: the contiguous (3, B·H, N, d) q, k, v and the probabilities. One copy makes all three
    contiguous, and the 1/√d scale rides in the first matmul (``baddbmm``'s alpha) instead of a pass over q.
    """
    _, b, h, n, dh = qkv.shape
    qkv = qkv.reshape(3, b * h, n, dh)
    q, k, v = qkv.unbind(0)
    scores = torch.baddbmm(q.new_empty(()).expand(b * h, n, n), q, k.transpose(1, 2), beta=0.0, alpha=dh**-0.5)
    p = torch.softmax(scores, dim=-1)
    return torch.bmm(p, v).view(b, h, n, dh), qkv, p


# ----------------------------------------------------------------------------------------------------------------
# Patches in and out


def patch_embed_matmul(proj: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patch convolution ``proj`` as one matmul: (N, C, H, W) latents -> (N, tokens, hidden)."""
    # each p×p patch flattened as (channel, row, column), the order of the conv's weight, which is pixel_unshuffle's
    # channel order (its kernel is several times quicker than a 6-d permute copy)
    patches = F.pixel_unshuffle(x, proj.kernel_size[0]).flatten(2).transpose(1, 2)
    return F.linear(patches, proj.weight.view(proj.out_channels, -1), proj.bias)


def final_layer_pixel_shuffle(dit: DiT, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """The final layer and unpatchify of ``dit``: the modulation as one ``addcmul``, each token's features ordered
    (channel, row, column) instead of (row, column, channel), which is ``pixel_shuffle``'s order, and
    ``pixel_shuffle`` placing the patches instead of a 6-d permute copy."""
    layer, p = dit.final_layer, dit.cfg.patch_size
    shift, scale = mod.unsqueeze(1).chunk(2, dim=2)
    h = torch.addcmul(shift, F.layer_norm(h, (layer.dim,), eps=layer.eps), 1 + scale)
    w, b = layer.linear.weight, layer.linear.bias
    w = w.view(p, p, -1, w.shape[1]).permute(2, 0, 1, 3).reshape(w.shape)
    out = F.linear(h, w, b.view(p, p, -1).permute(2, 0, 1).reshape(b.shape))
    side = dit.cfg.input_size // p
    return F.pixel_shuffle(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side), p)


# ----------------------------------------------------------------------------------------------------------------
# Blocks


def fused_block(block: DiTBlock, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """``block``'s forward with each modulation and gated residual as one ``addcmul``; as one :class:`FrozenBlock`
    node where :func:`runs_as_one_node` says so."""
    if runs_as_one_node(block, x, mod):
        return FrozenBlock.apply(x, mod, block)
    d = block.dim
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unsqueeze(1).chunk(6, dim=2)
    h = torch.addcmul(shift_a, F.layer_norm(x, (d,), eps=block.eps), 1 + scale_a)
    x = torch.addcmul(x, gate_a, block.attn(h))
    h = torch.addcmul(shift_m, F.layer_norm(x, (d,), eps=block.mlp_eps), 1 + scale_m)
    return torch.addcmul(x, gate_m, block.mlp(h))


def runs_as_one_node(block: DiTBlock, x: torch.Tensor, mod: torch.Tensor) -> bool:
    """Whether this forward of ``block`` runs as :class:`FrozenBlock`: gradients wanted for the input only (no weight
    or conditioning gradient), in the CPU forms it writes out, and not while torch.compile traces (the compiler
    derives its own backward)."""
    return (torch.is_grad_enabled() and x.requires_grad and not mod.requires_grad
            and block.attn.impl == "math" and block.mlp.gelu_form == "sigmoid"
            and not torch.compiler.is_compiling()
            and not any(m.weight.requires_grad or m.bias.requires_grad
                        for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)))


class FrozenBlock(torch.autograd.Function):
    """A :class:`~.dit.DiTBlock` in the CPU forms (sigmoid GELU, written-out attention, fused modulation) with frozen
    weights, as one autograd node whose backward computes the input's gradient only.

    Stage 2 differentiates with respect to the latent, never the weights. Composed from ops, a block is about thirty
    autograd nodes, each saving its inputs and allocating its own gradient buffers; here the backward is written
    out: in-place passes on buffers it owns, the layer norms' backward from their saved statistics, and the q, k, v
    gradients written by the batched matmuls straight into one buffer (one copy back to the fused linear's layout
    instead of a stack and a copy). The forward is the same op sequence as the composed block, so its output is the
    same to rounding. Saved: the block input, both layer norms' statistics, q/k/v, the attention probabilities, the
    residual after attention, and the GELU's derivative at the MLP's pre-activation (computed in the forward while
    its inputs are in cache, so the backward reads one tensor instead of two; 2 MB less per block at batch 64).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mod: torch.Tensor, block: DiTBlock) -> torch.Tensor:
        b, n, d = x.shape
        attn, mlp = block.attn, block.mlp
        heads = attn.heads
        dh = d // heads
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unsqueeze(1).chunk(6, dim=2)
        sa, sm = 1 + scale_a, 1 + scale_m
        ln, mean1, rstd1 = torch.native_layer_norm(x, (d,), None, None, block.eps)
        h = torch.addcmul(shift_a, ln, sa, out=ln)  # the normalised copy is not saved: modulate it in place
        qkv = torch.addmm(attn.qkv.bias, h.view(-1, d), attn.qkv.weight.t())
        o, qkv, p = math_attention(qkv.view(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4))
        o = o.transpose(1, 2).reshape(b * n, d)
        x1 = torch.addcmul(x, gate_a, torch.addmm(attn.proj.bias, o, attn.proj.weight.t()).view(b, n, d))
        ln, mean2, rstd2 = torch.native_layer_norm(x1, (d,), None, None, block.mlp_eps)
        h = torch.addcmul(shift_m, ln, sm, out=ln)
        z = torch.addmm(mlp.fc1.bias, h.view(-1, d), mlp.fc1.weight.t())
        s = _gelu_arg(z, _GELU_B).sigmoid_()
        f = torch.addmm(mlp.fc2.bias, torch.mul(z, s), mlp.fc2.weight.t())
        # the GELU's derivative σ·(1 + e·(1 − σ)), e = z·du/dz (see SigmoidGelu), while z and σ are still warm:
        # the backward then reads one saved tensor instead of two, once
        e = _gelu_arg(z, 3.0 * _GELU_B)
        slope = e.addcmul_(e, s, value=-1.0).add_(1.0).mul_(s)
        del z, s
        ctx.save_for_backward(x, mean1, rstd1, qkv, p, x1, mean2, rstd2, slope, sa, gate_a, sm, gate_m,
                              attn.qkv.weight, attn.proj.weight, mlp.fc1.weight, mlp.fc2.weight)
        return torch.addcmul(x1, gate_m, f.view(b, n, d))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, mean1, rstd1, qkv, p, x1, mean2, rstd2, slope, sa, gate_a, sm, gate_m, w_qkv, w_proj, w1, w2 = \
            ctx.saved_tensors
        b, n, d = x.shape
        _, bh, _, dh = qkv.shape
        only_input = [True, False, False]
        g = g.contiguous()
        gz = torch.mm(torch.mul(g, gate_m).view(-1, d), w2).mul_(slope)  # through the MLP and its GELU
        gh = torch.mm(gz, w1).view(b, n, d).mul_(sm)
        del gz
        gx1 = torch.ops.aten.native_layer_norm_backward(gh, x1, (d,), mean2, rstd2, None, None, only_input)[0]
        gx1.add_(g)
        # attention: dq = dS·k/√d, dk = dSᵀ·q/√d, dv = Pᵀ·dO, written into one (3, B·H, N, d/H) buffer
        go = torch.mm(torch.mul(gx1, gate_a).view(-1, d), w_proj)
        go = go.view(b, n, bh // b, dh).transpose(1, 2).reshape(bh, n, dh)
        q, k, v = qkv.unbind(0)
        gqkv = torch.empty_like(qkv)
        torch.bmm(p.transpose(1, 2), go, out=gqkv[2])
        ds = torch.ops.aten._softmax_backward_data(torch.bmm(go, v.transpose(1, 2)), p, -1, p.dtype)
        torch.baddbmm(gqkv[0], ds, k, beta=0.0, alpha=dh**-0.5, out=gqkv[0])
        torch.baddbmm(gqkv[1], ds.transpose(1, 2), q, beta=0.0, alpha=dh**-0.5, out=gqkv[1])
        gqkv = gqkv.view(3, b, bh // b, n, dh).permute(1, 3, 0, 2, 4).reshape(b * n, 3 * d)
        gh = torch.mm(gqkv, w_qkv).view(b, n, d).mul_(sa)
        gx = torch.ops.aten.native_layer_norm_backward(gh, x, (d,), mean1, rstd1, None, None, only_input)[0]
        return gx.add_(gx1), None, None


# ----------------------------------------------------------------------------------------------------------------
# Conditioning


class ConditioningMemo:
    """The adaLN outputs per (timestep, label after dropout), kept across forwards (used with the CPU forms).

    A stage-2 step draws each image's timestep from a few values ({1..t_max}) and the official recipe optimises
    under the null label, so a run of a hundred steps needs a few dozen distinct conditionings, yet the plain
    forward recomputes the timestep MLP and every block's adaLN linear for every image at every step. Here each
    distinct (t, label) is computed once and a forward gathers its rows. Entries are computed in batches of at
    least :attr:`MIN_ROWS` rows (padded by repetition), where a row's result does not depend on the rows beside it,
    so the gathered values equal those of a plain forward over any batch of that size or more.

    The memo empties itself when any conditioning weight changes (identity, storage or in-place version) and when it
    would pass :attr:`MAX_BYTES`; a forward with more distinct keys than that holds is computed without it. It serves
    only frozen conditioning weights and host tensors (the lookup reads the keys on the host). Lookups hold a lock,
    so threads may share a model; a copy or a pickle of the model starts with an empty memo.
    """

    MIN_ROWS = 16
    MAX_BYTES = 64 << 20

    def __init__(self):
        self._lock = threading.Lock()
        self._clear(None)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _clear(self, stamp) -> None:
        self.stamp, self.rows, self.tables = stamp, {}, []

    @staticmethod
    def _params(dit: DiT) -> list[torch.Tensor]:
        mods = [dit.t_embedder, dit.y_embedder, dit.final_layer.adaLN_modulation]
        mods += [block.adaLN_modulation for block in dit.blocks]
        return [p for m in mods for p in m.parameters()]

    def modulations(self, dit: DiT, t: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor] | None:
        """Each block's adaLN output, then the final layer's, for every row (as :meth:`.dit.DiT.conditioning`);
        None where the memo does not serve (device tensors, compiling, conditioning weights that want gradients) or
        the batch has more distinct keys than it may hold."""
        if t.device.type != "cpu" or labels.device.type != "cpu" or t.dim() != 1 or torch.compiler.is_compiling():
            return None
        params = self._params(dit)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        stamp = tuple((id(p), p.data_ptr(), p._version, p.dtype) for p in params)
        keys = list(zip(t.tolist(), labels.tolist()))
        with self._lock:
            if stamp != self.stamp:
                self._clear(stamp)
            new = [k for k in dict.fromkeys(keys) if k not in self.rows]
            if new and not self._add(dit, new, t.dtype):
                return None
            index = torch.tensor([self.rows[k] for k in keys])
            return [table.index_select(0, index) for table in self.tables]

    def _add(self, dit: DiT, new: list, t_dtype: torch.dtype) -> bool:
        pad = new + new[-1:] * (self.MIN_ROWS - len(new))
        with torch.no_grad():
            parts = dit.conditioning(torch.tensor([k[0] for k in pad], dtype=t_dtype),
                                     torch.tensor([k[1] for k in pad], dtype=torch.long))
        row_bytes = sum(m.shape[1] * m.element_size() for m in parts)
        if len(new) * row_bytes > self.MAX_BYTES:
            return False
        n = len(self.rows)
        if (n + len(new)) * row_bytes > self.MAX_BYTES:
            self._clear(self.stamp)
            n = 0
        if not self.tables or n + len(new) > self.tables[0].shape[0]:  # grow by doubling, within the cap
            rows = min(max(2 * (n + len(new)), self.MIN_ROWS), self.MAX_BYTES // row_bytes)
            grown = [m.new_empty(rows, m.shape[1]) for m in parts]
            for old, big in zip(self.tables, grown):
                big[:n] = old[:n]
            self.tables = grown
        for table, m in zip(self.tables, parts):
            table[n : n + len(new)] = m[: len(new)]
        self.rows.update(zip(new, range(n, n + len(new))))
        return True


__all__ = ["ConditioningMemo", "FrozenBlock", "SigmoidGelu", "final_layer_pixel_shuffle", "fused_block",
           "math_attention", "patch_embed_matmul", "runs_as_one_node", "sigmoid_gelu"]
