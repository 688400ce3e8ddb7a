"""MAR and its KL-16 VAE at tiny sizes, against restatements of SPEC-MAR written out here row by row.

Every restatement runs in float64 from the model's float32 weights; the model runs in float32 and must agree to
1e-5. Nothing here reads the released code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cao2_fast.errors import UserError
from cao2_fast.models import mar as M
from cao2_fast.models import mar_vae as MV

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = M.MARConfig(img_size=64, vae_stride=16, patch_size=1, vae_embed_dim=4, buffer_size=3, encoder_embed_dim=16,
                   encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=12, decoder_depth=2, decoder_num_heads=3,
                   class_num=10, diffloss_d=2, diffloss_w=24, attn_dropout=0.0, proj_dropout=0.0)
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return M.random_mar(TINY, seed=3)


def P(model: nn.Module) -> dict:
    """Every parameter as a float64 tensor, by its checkpoint name."""
    return {k: v.detach().double() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Restatement of the MAE encoder and decoder (one sample at a time)


def ln(x, w=None, b=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if w is None else y * w + b


def lin(x, p, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def vit_block(x, p, pre, heads):
    n, d = x.shape
    h = ln(x, p[f"{pre}.norm1.weight"], p[f"{pre}.norm1.bias"])
    q, k, v = lin(h, p, f"{pre}.attn.qkv").split(d, dim=1)
    dh = d // heads
    out = torch.zeros(n, d, dtype=x.dtype)
    for i in range(heads):
        s = slice(i * dh, (i + 1) * dh)
        w = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(dh), dim=1)
        out[:, s] = w @ v[:, s]
    x = x + lin(out, p, f"{pre}.attn.proj")
    h = lin(ln(x, p[f"{pre}.norm2.weight"], p[f"{pre}.norm2.bias"]), p, f"{pre}.mlp.fc1")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return x + lin(h, p, f"{pre}.mlp.fc2")


def restated_mae(p, cfg, tokens, masked, class_row):
    """One sample: tokens [L, C] (float64), masked: set of masked positions, class_row [D] → z [L, Dd]."""
    nb, seq = cfg.buffer_size, cfg.seq_len
    x = lin(tokens, p, "z_proj")
    rows = torch.cat([class_row.expand(nb, -1), x]) + p["encoder_pos_embed_learned"][0]
    rows = ln(rows, p["z_proj_ln.weight"], p["z_proj_ln.bias"])
    keep = list(range(nb)) + [nb + i for i in range(seq) if i not in masked]  # buffer, then visible in order
    x = rows[keep]
    for b in range(cfg.encoder_depth):
        x = vit_block(x, p, f"encoder_blocks.{b}", cfg.encoder_num_heads)
    x = ln(x, p["encoder_norm.weight"], p["encoder_norm.bias"])
    y = lin(x, p, "decoder_embed")
    full = p["mask_token"][0, 0].repeat(nb + seq, 1)
    for j, r in enumerate(keep):
        full[r] = y[j]
    x = full + p["decoder_pos_embed_learned"][0]
    for b in range(cfg.decoder_depth):
        x = vit_block(x, p, f"decoder_blocks.{b}", cfg.decoder_num_heads)
    x = ln(x, p["decoder_norm.weight"], p["decoder_norm.bias"])
    return x[nb:] + p["diffusion_pos_embed_learned"][0]


def orders_for(n, seed):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([rng.permutation(TINY.seq_len) for _ in range(n)]))


@pytest.mark.parametrize("counts", [(10, 10, 10), (4, 16, 9)])
def test_mae_forward_equals_the_per_sample_restatement(model, counts):
    """Equal masked counts (the released case) and unequal ones (padding masked out of attention)."""
    g = torch.Generator().manual_seed(0)
    b = len(counts)
    tokens = torch.randn(b, TINY.seq_len, TINY.token_embed_dim, generator=g)
    orders = orders_for(b, 1)
    mask = M.mask_by_order(torch.tensor(counts), orders)
    labels = torch.tensor([1, 7, 3])
    with torch.no_grad():
        z = model(tokens, mask.float(), model.class_embedding(labels))
    p = P(model)
    for i in range(b):
        masked = set(orders[i, :counts[i]].tolist())
        ref = restated_mae(p, TINY, tokens[i].double(), masked, p["class_emb.weight"][labels[i]])
        assert (z[i].double() - ref).abs().max() <= TOL
    assert z.shape == (b, TINY.seq_len, TINY.decoder_embed_dim)


def test_label_drop_in_training_takes_the_given_draw(model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, TINY.seq_len, TINY.token_embed_dim, generator=g)
    mask = M.mask_by_order(5, orders_for(2, 2))
    ce = model.class_embedding(torch.tensor([2, 4]))
    model.train()
    try:
        with torch.no_grad():
            z = model(tokens, mask, ce, drop=torch.tensor([True, False]))
    finally:
        model.eval()
    p = P(model)
    for i, row in enumerate([p["fake_latent"][0], p["class_emb.weight"][4]]):
        masked = set(mask[i].nonzero().flatten().tolist())
        assert (z[i].double() - restated_mae(p, TINY, tokens[i].double(), masked, row)).abs().max() <= TOL
    with torch.no_grad():  # eval mode never drops, whatever is passed
        z_eval = model(tokens, mask, ce, drop=torch.tensor([True, False]))
    masked = set(mask[0].nonzero().flatten().tolist())
    ref = restated_mae(p, TINY, tokens[0].double(), masked, p["class_emb.weight"][2])
    assert (z_eval[0].double() - ref).abs().max() <= TOL


def test_class_embedding_of_ids_label_vectors_and_none(model):
    w = model.class_emb.weight
    soft = torch.softmax(torch.randn(2, TINY.class_num, generator=torch.Generator().manual_seed(4)), 1)
    assert torch.equal(model.class_embedding(torch.tensor([3])), w[3:4])
    assert (model.class_embedding(soft).double() - soft.double() @ w.double()).abs().max() <= TOL
    assert torch.equal(model.class_embedding(torch.zeros(1, TINY.class_num)), torch.zeros(1, TINY.encoder_embed_dim))
    assert torch.equal(model.class_embedding(None, 3), model.fake_latent.expand(3, -1))
    with pytest.raises(ValueError):
        model.class_embedding(torch.zeros(1, TINY.class_num + 1))


def test_sdpa_attention_computes_the_same(model):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(3, TINY.seq_len, TINY.token_embed_dim, generator=g)
    mask = M.mask_by_order(torch.tensor([3, 12, 7]), orders_for(3, 6))
    ce = model.class_embedding(torch.tensor([0, 1, 2]))
    with torch.no_grad():
        a = model(tokens, mask, ce)
        b = model.set_attention("sdpa")(tokens, mask, ce)
    model.set_attention("math")
    assert (a - b).abs().max() <= TOL


def test_gradient_reaches_visible_tokens_only(model):
    tokens = torch.randn(1, TINY.seq_len, TINY.token_embed_dim, generator=torch.Generator().manual_seed(7),
                         requires_grad=True)
    mask = M.mask_by_order(11, orders_for(1, 8))
    model(tokens, mask, model.class_embedding(torch.tensor([5]))).square().sum().backward()
    touched = tokens.grad.abs().sum(-1)[0] > 0
    assert torch.equal(touched, ~mask[0])


# ----------------------------------------------------------------------------------------------------------------
# DiffLoss MLP


def restated_net(p, x, t, c, depth):
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], 1)
    silu = F.silu
    y = lin(silu(lin(t_freq, p, "diffloss.net.time_embed.mlp.0")), p, "diffloss.net.time_embed.mlp.2")
    y = y + lin(c, p, "diffloss.net.cond_embed")
    h = lin(x, p, "diffloss.net.input_proj")
    for i in range(depth):
        pre = f"diffloss.net.res_blocks.{i}"
        shift, scale, gate = lin(silu(y), p, f"{pre}.adaLN_modulation.1").chunk(3, 1)
        u = ln(h, p[f"{pre}.in_ln.weight"], p[f"{pre}.in_ln.bias"]) * (1 + scale) + shift
        u = lin(silu(lin(u, p, f"{pre}.mlp.0")), p, f"{pre}.mlp.2")
        h = h + gate * u
    shift, scale = lin(silu(y), p, "diffloss.net.final_layer.adaLN_modulation.1").chunk(2, 1)
    return lin(ln(h) * (1 + scale) + shift, p, "diffloss.net.final_layer.linear")


def test_diffloss_net_equals_the_restatement(model):
    g = torch.Generator().manual_seed(9)
    n = 7
    x = torch.randn(n, TINY.token_embed_dim, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    c = torch.randn(n, TINY.decoder_embed_dim, generator=g)
    with torch.no_grad():
        out = model.diffloss.net(x, t, c)
    ref = restated_net(P(model), x.double(), t, c.double(), TINY.diffloss_d)
    assert out.shape == (n, 2 * TINY.token_embed_dim)
    assert (out.double() - ref).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------------------------
# The DiffLoss diffusion


def restated_schedule(keep=None):
    """(β, ᾱ) in float64 of the 1000-step cosine schedule, respaced to the timesteps ``keep``."""
    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / 1000) / abar(i / 1000), 0.999) for i in range(1000)]
    ac = np.cumprod(1 - np.array(betas))
    if keep is None:
        return np.array(betas), ac
    new = [1 - ac[keep[0]]] + [1 - ac[k] / ac[j] for j, k in zip(keep, keep[1:])]
    return np.array(new), np.cumprod(1 - np.array(new))


def test_cosine_schedule_and_respaced_timesteps():
    diff = M.MARDiffusion.create(None)
    betas, _ = restated_schedule()
    assert np.allclose(diff.tables64["betas"], betas, rtol=1e-12, atol=0)
    assert betas.max() == 0.999 and diff.tables64["betas"][-1] == 0.999
    gen = M.MARDiffusion.create("100")
    expected = [round(i * 999 / 99) for i in range(100)]
    assert gen.timestep_map.tolist() == expected
    assert expected[:3] == [0, 10, 20] and expected[-2:] == [989, 999]
    new_betas, _ = restated_schedule(expected)
    assert np.allclose(gen.tables64["betas"], new_betas, rtol=1e-10, atol=0)
    with pytest.raises(UserError):
        M.MARDiffusion.create("1001")


def restated_step(out, x, i, keep, noise, temperature):
    """x_{t−1} in float64 from the net output at respaced step i: ε-prediction, learned-range variance."""
    betas, ac = restated_schedule(keep)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    min_log = math.log(post_var[1] if i == 0 else post_var[i])
    max_log = math.log(betas[i])
    c = x.shape[1]
    eps, v = out[:, :c], out[:, c:]
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    x0 = math.sqrt(1 / ac[i]) * x - math.sqrt(1 / ac[i] - 1) * eps
    mean = (betas[i] * math.sqrt(ac_prev[i]) / (1 - ac[i])) * x0 \
        + ((1 - ac_prev[i]) * math.sqrt(1 - betas[i]) / (1 - ac[i])) * x
    return mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * log_var) * noise * temperature


@pytest.fixture(scope="module")
def strong():
    """Larger weights: the variance values then move the step noticeably."""
    return M.MAR(TINY).init_weights(torch.Generator().manual_seed(8), std=0.1).eval().requires_grad_(False)


@pytest.mark.parametrize("i", [1, 57, 0])
def test_guided_p_sample_step_equals_the_float64_posterior(strong, i):
    model = strong
    g = torch.Generator().manual_seed(11 + i)
    n, c = 5, TINY.token_embed_dim
    x = torch.randn(n, c, generator=g)
    zc = torch.randn(n, TINY.decoder_embed_dim, generator=g)
    zu = torch.randn(n, TINY.decoder_embed_dim, generator=g)
    noise = torch.randn(n, c, generator=g)
    scale = torch.tensor([1.5, 2.9, 1.0, 4.0, 2.0])
    temp = torch.tensor([1.0, 0.9, 1.1, 0.5, 1.0])
    diff, net = model.diffloss.gen_diffusion, model.diffloss.net
    with torch.no_grad():
        got = M.p_sample(net, diff, x, i, zc, noise, temp, scale, zu)
        t_orig = torch.full((n,), diff.timestep_map[i].item())
        oc = net(x, t_orig, zc).double()
        ou = net(x, t_orig, zu).double()
    eps = ou[:, :c] + scale.double()[:, None] * (oc[:, :c] - ou[:, :c])  # all ε channels guided
    out = torch.cat([eps, oc[:, c:]], 1)  # variance values: the conditional row's own
    ref = restated_step(out, x.double(), i, diff.timestep_map.tolist(), noise.double(), temp.double()[:, None])
    assert (got.double() - ref).abs().max() <= TOL
    with torch.no_grad():  # unguided: the net's own output
        plain = M.p_sample(net, diff, x, i, zc, noise, 0.7)
    ref = restated_step(oc, x.double(), i, diff.timestep_map.tolist(), noise.double(), 0.7)
    assert (plain.double() - ref).abs().max() <= TOL


def test_sampling_a_batch_equals_sampling_its_parts(model):
    g = torch.Generator().manual_seed(13)
    n, c = 6, TINY.token_embed_dim
    z = torch.randn(n, TINY.decoder_embed_dim, generator=g)
    zu = torch.randn(n, TINY.decoder_embed_dim, generator=g)
    noise = torch.randn(n, c, generator=g)
    steps = torch.randn(100, n, c, generator=g)
    whole = model.diffloss.sample(z, noise, steps, 0.9, 2.5, zu)
    parts = [model.diffloss.sample(z[s], noise[s], lambda i, s=s: steps[i, s], 0.9, 2.5, zu[s])
             for s in (slice(0, 2), slice(2, 6))]
    assert (whole - torch.cat(parts)).abs().max() <= TOL
    assert torch.isfinite(whole).all() and not torch.equal(whole, noise)


def test_training_loss_terms_equal_the_restatement(model):
    g = torch.Generator().manual_seed(17)
    n, c = 6, TINY.token_embed_dim
    x0 = torch.randn(n, c, generator=g) * 0.5
    z = torch.randn(n, TINY.decoder_embed_dim, generator=g)
    noise = torch.randn(n, c, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    terms = model.diffloss(x0, z, t, noise)
    betas, ac = restated_schedule()
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_log = np.log(np.append(post_var[1], post_var[1:]))
    x0d, nd = x0.double(), noise.double()
    for r, ti in enumerate(t.tolist()):
        xt = math.sqrt(ac[ti]) * x0d[r] + math.sqrt(1 - ac[ti]) * nd[r]
        out = model.diffloss.net(xt[None].float(), t[r:r + 1], z[r:r + 1]).double()[0]
        eps, v = out[:c], out[c:]
        mse = ((nd[r] - eps) ** 2).mean()
        log_var = (v + 1) / 2 * math.log(betas[ti]) + (1 - (v + 1) / 2) * post_log[ti]
        x0_hat = math.sqrt(1 / ac[ti]) * xt - math.sqrt(1 / ac[ti] - 1) * eps
        c1 = betas[ti] * math.sqrt(ac_prev[ti]) / (1 - ac[ti])
        c2 = (1 - ac_prev[ti]) * math.sqrt(1 - betas[ti]) / (1 - ac[ti])
        mean = c1 * x0_hat + c2 * xt
        true_mean = c1 * x0d[r] + c2 * xt
        if ti == 0:  # the discretised decoder NLL in bits: the bin of x0 (open-ended beyond ±0.999)
            def cdf(u):
                return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
            inv = torch.exp(-0.5 * log_var)
            upper = cdf(inv * (x0d[r] - mean + 1 / 255))
            lower = cdf(inv * (x0d[r] - mean - 1 / 255))
            prob = torch.where(x0d[r] < -0.999, upper, torch.where(x0d[r] > 0.999, 1 - lower, upper - lower))
            vb = -torch.log(prob.clamp(min=1e-12)).mean() / math.log(2)
        else:  # KL(q ‖ p) in bits
            kl = 0.5 * (-1 + log_var - post_log[ti] + np.exp(post_log[ti]) / torch.exp(log_var)
                        + (true_mean - mean) ** 2 / torch.exp(log_var))
            vb = kl.mean() / math.log(2)
        assert abs(terms["mse"][r].item() - mse.item()) <= TOL
        assert abs(terms["vb"][r].item() - vb.item()) <= 1e-4 * max(1.0, abs(vb.item()))
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])
    assert torch.equal(terms["target"], noise)
    assert torch.equal(model.diffloss(x0, z, t, noise, include_vb=False)["loss"], terms["mse"])


def test_vb_term_trains_the_variance_only(model):
    m = M.random_mar(TINY, seed=5)
    m.requires_grad_(True)
    g = torch.Generator().manual_seed(19)
    x0 = torch.randn(4, TINY.token_embed_dim, generator=g)
    z = torch.randn(4, TINY.decoder_embed_dim, generator=g)
    terms = m.diffloss(x0, z, torch.tensor([3, 40, 700, 999]), torch.randn(4, TINY.token_embed_dim, generator=g))
    terms["vb"].sum().backward()
    w = m.diffloss.net.final_layer.linear.weight.grad
    c = TINY.token_embed_dim
    assert w[:c].abs().max() == 0 and w[c:].abs().max() > 0  # the ε rows get no gradient from vb


# ----------------------------------------------------------------------------------------------------------------
# Masking and layout


def test_mask_by_order_masks_the_first_entries_of_each_order():
    orders = orders_for(3, 21)
    mask = M.mask_by_order(torch.tensor([0, 5, 16]), orders)
    for row, k in enumerate([0, 5, 16]):
        assert set(mask[row].nonzero().flatten().tolist()) == set(orders[row, :k].tolist())
    assert torch.equal(M.mask_by_order(5, orders)[1], mask[1])


def test_sampler_schedule_counts_and_guidance_match_the_spec():
    n_masked, counts, scales = 256, [], []
    for step in range(32):
        keep = M.next_mask_len(step, 32, n_masked, 256)
        counts.append(n_masked if step == 31 else n_masked - keep)
        scales.append(float(M.linear_cfg(2.9, keep, 256)))
        n_masked = keep
    assert counts == [1, 1, 1, 2, 3, 4, 3, 5, 5, 6, 6, 7, 7, 8, 8, 8, 10, 9, 10, 10, 11, 11, 11, 12, 11, 12, 12, 13,
                      12, 12, 13, 12]
    assert sum(counts) == 256
    assert scales[0] == pytest.approx(1 + 1.9 / 256) and scales[-1] == pytest.approx(1 + 1.9 * 255 / 256)


def test_random_masking_counts():
    orders = torch.stack([torch.from_numpy(np.random.default_rng(s).permutation(256)) for s in (1, 2)])
    m = M.random_masking(orders, 0.7, floor_ratio=0.25)
    assert m.dtype == torch.float32 and m.sum(1).tolist() == [180, 180]  # ⌈179.2⌉
    assert set(m[0].nonzero().flatten().tolist()) == set(orders[0, :180].tolist())
    assert M.random_masking(orders, 0.1, floor_ratio=0.25).sum(1).tolist() == [64, 64]  # the floor
    assert M.random_masking(orders, 0.1).sum(1).tolist() == [26, 26]


def test_random_orders_are_permutations_from_the_given_generator():
    a = M.random_orders(3, 16, np.random.RandomState(0))
    b = M.random_orders(3, 16, np.random.RandomState(0))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert all(sorted(r.tolist()) == list(range(16)) for r in a)


def test_patchify_layout_and_inverse():
    g = torch.Generator().manual_seed(23)
    lat = torch.randn(2, 16, 4, 4, generator=g)
    tok = M.patchify(lat)
    assert tok.shape == (2, 16, 16)
    assert tok[1, 2 * 4 + 3, 5] == lat[1, 5, 2, 3]  # row-major positions, channels last
    assert torch.equal(M.unpatchify(tok, 16), lat)
    lat2 = torch.randn(1, 3, 4, 4, generator=g)
    tok2 = M.patchify(lat2, 2)
    assert tok2.shape == (1, 4, 12) and tok2[0, 3, 1 * 4 + 2 * 1 + 0] == lat2[0, 1, 3, 2]
    assert torch.equal(M.unpatchify(tok2, 3, 2), lat2)


def test_flops_and_params_of_mar_base():
    cfg = M.MARConfig.named("mar_base")
    assert M.param_count(cfg) == 207_924_768  # 207.9 M
    assert cfg.decoder_flops() == pytest.approx(58.1e9, rel=1e-3)
    assert cfg.encoder_flops(64 + 34) == pytest.approx(17.0e9, rel=1e-2)
    assert cfg.diffloss_flops_per_row_step() == pytest.approx(71.4e6, rel=1e-3)
    assert M.param_count(TINY) == sum(p.numel() for p in M.MAR(TINY).parameters())


# ----------------------------------------------------------------------------------------------------------------
# load_mar / save_mar


def _checkpoint(tmp_path, model_sd, ema_sd, args=None, name="checkpoint-last.pth"):
    first = next(iter(model_sd.values()))
    torch.save({"model": model_sd, "model_ema": ema_sd,
                "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(first)}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]},
                "epoch": 399, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
                "args": argparse.Namespace(model="mar_tiny", diffloss_d=2) if args is None else args},
               tmp_path / name)
    return tmp_path / name


def _same_heads():
    return replace_cfg(encoder_num_heads=2, decoder_num_heads=2, decoder_embed_dim=12)


def replace_cfg(**kw):
    from dataclasses import replace

    return replace(TINY, **kw)


def test_load_mar_takes_the_ema_weights_and_infers_the_size(tmp_path):
    cfg = _same_heads()
    raw, ema = M.random_mar(cfg, seed=1), M.random_mar(cfg, seed=2)
    _checkpoint(tmp_path, raw.state_dict(), ema.state_dict())
    loaded = M.load_mar(tmp_path, num_heads=2)
    assert loaded.cfg == replace_cfg(encoder_num_heads=2, decoder_num_heads=2, attn_dropout=0.1, proj_dropout=0.1)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k
    plain = M.load_mar(tmp_path / "checkpoint-last.pth", num_heads=2, ema=False)
    assert all(torch.equal(v, raw.state_dict()[k]) for k, v in plain.state_dict().items())
    with pytest.raises(UserError, match="fits none of mar_base"):
        M.load_mar(tmp_path, ema=False)


def test_named_sizes_are_inferred_from_shapes_alone():
    for name in M.NAMED_SIZES:
        cfg = M.MARConfig.named(name, diffloss_d=3, diffloss_w=256)
        with torch.device("meta"):
            sd = M.MAR(cfg).state_dict()
        got = M.infer_config(sd)
        assert got == cfg and got.size_name == name


def test_load_mar_refuses_a_pickled_payload_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    cfg = _same_heads()
    sd = M.random_mar(cfg).state_dict()
    path = _checkpoint(tmp_path, sd, sd, args=Payload())
    with pytest.raises(UserError) as e:
        M.load_mar(path, num_heads=2)
    assert re.search(r"global (builtins\.)?exec\b", str(e.value)) and "\n" not in str(e.value)
    assert not marker.exists()


def test_load_mar_refuses_sizes_beyond_what_the_file_holds(tmp_path):
    cfg = _same_heads()
    sd = dict(M.random_mar(cfg).state_dict())
    sd["decoder_blocks.4000.norm1.weight"] = torch.ones(12)  # declares 4001 decoder blocks
    _checkpoint(tmp_path, sd, sd)
    with pytest.raises(UserError, match="declares a MAR .* but the weights hold only"):
        M.load_mar(tmp_path, num_heads=2)
    # save_mar's metadata is checked against the safetensors header before any tensor is read
    from safetensors.torch import save_file

    good = M.random_mar(cfg, seed=4)
    M.save_mar(good, tmp_path / "m.safetensors")
    back = M.load_mar(tmp_path / "m.safetensors")
    assert back.cfg == cfg and all(torch.equal(v, good.state_dict()[k]) for k, v in back.state_dict().items())
    meta = dict(dataclasses.asdict(cfg), encoder_depth=100_000)
    small = {k: v.contiguous() for k, v in good.state_dict().items()}
    save_file(small, str(tmp_path / "big.safetensors"), metadata={"mar_config": json.dumps(meta)})
    with pytest.raises(UserError, match="declares a MAR"):
        M.load_mar(tmp_path / "big.safetensors")


def test_load_mar_refuses_a_checkpoint_without_ema_or_with_wrong_shapes(tmp_path):
    cfg = _same_heads()
    sd = M.random_mar(cfg).state_dict()
    torch.save({"model": sd, "args": argparse.Namespace()}, tmp_path / "checkpoint-last.pth")
    with pytest.raises(UserError, match="no 'model_ema'"):
        M.load_mar(tmp_path, num_heads=2)
    assert M.load_mar(tmp_path, num_heads=2, ema=False).cfg.encoder_depth == 2
    bad = dict(sd)
    bad["fake_latent"] = torch.zeros(1, 5)
    _checkpoint(tmp_path, sd, bad, name="other.pth")
    with pytest.raises(UserError, match="fake_latent"):
        M.load_mar(tmp_path / "other.pth", num_heads=2)


# ----------------------------------------------------------------------------------------------------------------
# The KL-16 VAE: an LDM-layout restatement, the key conversion, decode


G = 4  # GroupNorm groups of the tiny restatement (LDM uses 32)


def norm(c):
    return nn.GroupNorm(G, c, eps=1e-6)


class LdmResnet(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class LdmAttn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=2)  # queries i, keys j
        out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class LdmDown(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class LdmUp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LdmMid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = LdmResnet(c, c), LdmAttn(c), LdmResnet(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


CH, MULT, NRB, Z = 8, (1, 1, 2, 2, 4), 2, 16


class LdmEncoder(nn.Module):
    """Levels of NRB residual blocks, attention after each block of the last level, a downsample between levels."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, CH, 3, padding=1)
        self.down = nn.ModuleList()
        cin = CH
        for i, m in enumerate(MULT):
            level = nn.Module()
            level.block = nn.ModuleList(LdmResnet(cin if j == 0 else CH * m, CH * m) for j in range(NRB))
            level.attn = nn.ModuleList(LdmAttn(CH * m) for _ in range(NRB if i == len(MULT) - 1 else 0))
            if i < len(MULT) - 1:
                level.downsample = LdmDown(CH * m)
            self.down.append(level)
            cin = CH * m
        self.mid = LdmMid(cin)
        self.norm_out, self.conv_out = norm(cin), nn.Conv2d(cin, 2 * Z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class LdmDecoder(nn.Module):
    """up[i] is level i (up[0] the full-resolution level) with NRB+1 residual blocks; run from the last level."""

    def __init__(self):
        super().__init__()
        top = CH * MULT[-1]
        self.conv_in = nn.Conv2d(Z, top, 3, padding=1)
        self.mid = LdmMid(top)
        ups = []
        cin = top
        for i in reversed(range(len(MULT))):
            level = nn.Module()
            level.block = nn.ModuleList(LdmResnet(cin if j == 0 else CH * MULT[i], CH * MULT[i])
                                        for j in range(NRB + 1))
            level.attn = nn.ModuleList()
            if i > 0:
                level.upsample = LdmUp(CH * MULT[i])
            ups.insert(0, level)
            cin = CH * MULT[i]
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(MULT))):
            for block in self.up[i].block:
                h = block(h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LdmKL(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = LdmEncoder(), LdmDecoder()
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1), nn.Conv2d(Z, Z, 1)


@pytest.fixture(scope="module")
def ldm():
    torch.manual_seed(0)
    m = LdmKL().eval()
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def expected_ldm_name(key: str) -> str:
    """The LDM key a diffusers AutoencoderKL key must come from, written from the module structure."""
    n = len(MULT)
    res = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    att = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    parts = key.split(".")
    part, rest, kind = parts[0], parts[1:-1], parts[-1]
    if part in ("quant_conv", "post_quant_conv"):
        return key
    if rest[0] == "conv_norm_out":
        return f"{part}.norm_out.{kind}"
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "mid_block":
        group, idx, sub = rest[1], int(rest[2]), ".".join(rest[3:])
        if group == "attentions":
            return f"{part}.mid.attn_1.{att[sub]}.{kind}"
        return f"{part}.mid.block_{idx + 1}.{res[sub]}.{kind}"
    level = int(rest[1])
    ldm_level = level if part == "encoder" else n - 1 - level
    prefix = f"encoder.down.{ldm_level}" if part == "encoder" else f"decoder.up.{ldm_level}"
    group, idx, sub = rest[2], rest[3], ".".join(rest[4:])
    if group == "downsamplers":
        return f"{prefix}.downsample.conv.{kind}"
    if group == "upsamplers":
        return f"{prefix}.upsample.conv.{kind}"
    if group == "attentions":
        return f"{prefix}.attn.{idx}.{att[sub]}.{kind}"
    return f"{prefix}.block.{idx}.{res[sub]}.{kind}"


def test_ldm_keys_convert_name_by_name(ldm):
    from diffusers import AutoencoderKL

    init = dict(MV.KL16_INIT, block_out_channels=tuple(CH * m for m in MULT), norm_num_groups=G)
    target = AutoencoderKL(**init).state_dict()
    sd = ldm.state_dict()
    converted = MV.ldm_to_diffusers({**sd, "loss.logvar": torch.zeros(())})  # a training loss's key is dropped
    assert set(converted) == set(target)
    used = set()
    for key, want in target.items():
        src = expected_ldm_name(key)
        used.add(src)
        value = sd[src]
        if value.dim() == 4 and want.dim() == 2:  # 1×1 attention projections become linear weights
            value = value[:, :, 0, 0]
        assert converted[key].shape == want.shape, key
        assert torch.equal(converted[key], value), (key, src)
    assert used == set(sd)  # every LDM weight is used, none twice
    assert MV.infer_init(sd, G) == {**init, "in_channels": 3, "out_channels": 3}


def test_kl16_decode_equals_the_ldm_restatement(ldm, tmp_path):
    torch.save({"model": ldm.state_dict(), "epoch": 5}, tmp_path / "kl16.ckpt")
    vae = MV.load_kl16(tmp_path, norm_num_groups=G)
    cfg = vae.autoencoder.config
    assert list(cfg.down_block_types) == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert list(cfg.up_block_types) == ["UpDecoderBlock2D"] * 5 and cfg.latent_channels == 16
    assert vae.scaling_factor == 0.2325 and vae.downsample == 16
    tokens = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(37))
    latents = M.unpatchify(tokens, 16)  # [2, 16, 2, 2]
    with torch.no_grad():
        img = vae.decode(latents)
        ref = ldm.decoder(ldm.post_quant_conv(latents / 0.2325))
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(41)) * 2 - 1
        mean = ldm.quant_conv(ldm.encoder(x))[:, :Z] * 0.2325
        enc = vae.encode(x)
    assert img.shape == (2, 3, 32, 32)
    assert (img - ref).abs().max() <= TOL
    assert (enc - mean).abs().max() <= TOL


def test_load_kl16_refuses_unknown_or_missing_keys(ldm, tmp_path):
    sd = dict(ldm.state_dict())
    torch.save({"model": {**sd, "encoder.down.0.block.0.temb_proj.weight": torch.zeros(8, 4)}}, tmp_path / "a.ckpt")
    with pytest.raises(UserError, match="temb_proj"):
        MV.load_kl16(tmp_path / "a.ckpt", norm_num_groups=G)
    sd.pop("decoder.up.2.upsample.conv.weight")
    torch.save({"model": sd}, tmp_path / "b.ckpt")
    with pytest.raises(UserError, match="upsamplers"):
        MV.load_kl16(tmp_path / "b.ckpt", norm_num_groups=G)
