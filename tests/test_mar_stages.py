"""The MAR generator's two stages, batched, against per-image restatements of the released loops (SPEC of the MAR
variant, §2–3) written out here one candidate / one image at a time, given the same orders, mask rates, noises and
timesteps; and the MAR settings of a config.

The restatements use the model's encoder, decoder, DiffLoss net and training-loss terms (each checked against its
own float64 restatement in test_mar.py) and restate everything around them: the iteration schedule, what is revealed
when, guidance, the ancestral step (float64), stage 2's masks, condition, loss and torch's own Adam per image.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtri
from test_mar import restated_step

from cao2_fast.config import RECIPES, build_config
from cao2_fast.errors import UserError
from cao2_fast.generators import mar as G
from cao2_fast.models import mar as M
from cao2_fast.selection import select

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = M.MARConfig(img_size=64, vae_stride=16, patch_size=1, vae_embed_dim=4, buffer_size=3, encoder_embed_dim=16,
                  encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=12, decoder_depth=1, decoder_num_heads=3,
                  class_num=10, diffloss_d=1, diffloss_w=24, attn_dropout=0.0, proj_dropout=0.0)
L, C = CFG.seq_len, CFG.token_embed_dim
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return M.MAR(CFG).init_weights(torch.Generator().manual_seed(5), std=0.03).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Stage 1


def released_sample_one(model, label, order, init, steps, num_iter, cfg, temperature, diffusion, keep_after):
    """One candidate through the released loop (mar_imagenet1k.py's per-step calls of sample_token_single_step):
    float64 ancestral steps, guidance on all ε channels, tokens revealed from the end of the order."""
    keep = diffusion.timestep_map.tolist()
    tokens = torch.zeros(1, L, C)
    mask = torch.ones(1, L)
    cond = torch.cat([model.class_emb.weight[label][None], model.fake_latent])
    out = {}
    for step in range(num_iter):
        with torch.no_grad():
            z = model(torch.cat([tokens, tokens]), torch.cat([mask, mask]), cond)
        mask_len = math.floor(L * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = int(max(1, min(mask.sum().item() - 1, mask_len)))
        mask_next = torch.zeros(1, L)
        mask_next[0, order[:mask_len]] = 1
        pred = mask.bool() if step >= num_iter - 1 else torch.logical_xor(mask.bool(), mask_next.bool())
        mask = mask_next
        pos = pred[0].nonzero().flatten()
        scale = 1 + (cfg - 1) * (L - mask_len) / L
        x = init[pos].double()
        for i in reversed(range(diffusion.num_steps)):
            t = torch.full((len(pos),), keep[i])
            with torch.no_grad():
                oc = model.diffloss.net(x.float(), t, z[0, pos]).double()
                ou = model.diffloss.net(x.float(), t, z[1, pos]).double()
            eps = ou[:, :C] + scale * (oc[:, :C] - ou[:, :C])
            x = restated_step(torch.cat([eps, oc[:, C:]], 1), x, i, keep, steps[pos, i].double(), temperature)
        tokens = tokens.clone()
        tokens[0, pos] = x.float()
        if step in keep_after or step == num_iter - 1:
            out[step] = tokens[0].clone()
    return out


def test_batched_sampler_equals_the_released_loop_per_candidate(model):
    diffusion = M.MARDiffusion.create("6")
    noise = G.MARStage1Noise.cat([G.MARStage1Noise.draw(3, L, C, 6, torch.Generator().manual_seed(s))
                                  for s in (1, 2)])
    labels = torch.tensor([4, 4, 4, 7, 7, 7])
    num_iter, cfg, temp = 5, 2.9, 0.95
    got = G.sample_tokens(model, diffusion, model.class_embedding(labels), noise, num_iter, cfg, "linear", temp,
                          keep_after=(num_iter - 2,))
    assert sorted(got) == [num_iter - 2, num_iter - 1]
    for b in range(len(labels)):
        ref = released_sample_one(model, int(labels[b]), noise.orders[b], noise.init[b], noise.steps[b], num_iter,
                                  cfg, temp, diffusion, (num_iter - 2,))
        for step in ref:  # random nets sample far from the data (x̂0 is not clipped): relative to the values' scale
            assert (got[step][b] - ref[step]).abs().max() <= TOL * max(1.0, float(ref[step].abs().max())), (b, step)
    # the snapshot before the last iteration still has the last-revealed tokens at zero, the final one none
    last_count = G.revealed_counts(num_iter, L)[-1]
    assert int((got[num_iter - 2].abs().sum(-1) == 0).sum(1)[0]) == last_count
    assert bool((got[num_iter - 1].abs().sum(-1) > 0).all())


def test_released_schedule_of_32_iterations_over_256_tokens():
    counts = G.revealed_counts(32, 256)
    assert counts == [1, 1, 1, 2, 3, 4, 3, 5, 5, 6, 6, 7, 7, 8, 8, 8, 10, 9, 10, 10, 11, 11, 11, 12, 11, 12, 12, 13,
                      12, 12, 13, 12]
    assert sum(counts) == 256
    ramp = [float(M.linear_cfg(2.9, M.next_mask_len(s, 32, 256 - sum(counts[:s]), 256))) for s in range(31)]
    assert ramp[0] == pytest.approx(1 + 1.9 * 1 / 256, abs=1e-6) and max(ramp) < 2.9  # never reaches 2.9


def test_unguided_sampling_runs_the_conditional_rows_alone(model):
    diffusion = M.MARDiffusion.create("3")
    noise = G.MARStage1Noise.draw(2, L, C, 3, torch.Generator().manual_seed(3))
    emb = model.class_embedding(torch.tensor([1, 2]))
    one = G.sample_tokens(model, diffusion, emb, noise, 3, 1.0)[2]
    again = G.sample_tokens(model, diffusion, emb[:1], noise.slice(0, 1), 3, 1.0)[2]
    assert (one[:1] - again).abs().max() <= TOL * max(1.0, float(again.abs().max()))  # batching changes nothing


def test_stability_selection_rules():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    scores = torch.tensor([0.5, 0.99, 0.7, 0.95, 0.1])
    # released: the IPC most stable, in ascending order, whatever the class
    assert select(probs, 0, 2, "stability", scores=scores).tolist() == [3, 1]
    assert np.argsort(scores.numpy())[-2:].tolist() == [3, 1]
    # stable-correct: correct ones (argmax 0: 0, 2, 4) most stable first, then the others
    assert select(probs, 0, 4, "stable-correct", scores=scores).tolist() == [2, 0, 4, 1]
    valid = torch.tensor([True, False, True, True, True])
    assert select(probs, 0, 2, "stability", scores=scores, valid=valid).tolist() == [2, 3]
    with pytest.raises(ValueError):
        select(probs, 0, 2, "stability")


# ----------------------------------------------------------------------------------------------------------------
# Stage 2


def test_mask_rates_are_scipys_truncated_normal_and_the_counts_follow_the_rule():
    from scipy.stats import truncnorm

    u = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = truncnorm(a=-1.2, b=0.0, loc=1.0, scale=0.25).ppf(u.numpy())
    assert np.abs(G.mask_rates(u).numpy() - ref).max() < 1e-12
    counts = G.stage2_mask_counts(G.mask_rates(u), 256, "max")
    assert counts.min() >= 180 and counts.max() <= 256  # ⌈256·0.7⌉ = 180: the ¼ floor never binds
    assert (G.stage2_mask_counts(G.mask_rates(u), 256, "min") == 64).all()


def released_optimise_one(model, tokens, label, noise, steps, lr, lam, recipe):
    """One image as the release optimises it (a fresh torch Adam; the loss of mar_imagenet1k.py's stage 2)."""
    latent = torch.nn.Parameter(tokens.clone()[None])
    opt = torch.optim.Adam([latent], lr=lr)
    if recipe.mar_stage2_cond == "zero":
        cond = torch.zeros(1, CFG.class_num) @ model.class_emb.weight  # embed_linear(zeros)
    else:
        cond = model.class_emb.weight[label][None]
    losses = []
    for k in range(steps):
        opt.zero_grad()
        u = float(noise.u[k])
        a = 0.5 * math.erfc(1.2 / math.sqrt(2))  # Φ(−1.2)
        rate = 1 + 0.25 * ndtri(a + u * (0.5 - a))
        n = math.ceil(L * rate)
        n = max(n, int(L * 0.25)) if recipe.mar_mask_rule == "max" else min(n, int(L * 0.25))
        mask = torch.zeros(1, L)
        mask[0, noise.orders[k, :n]] = 1
        gt = latent if recipe.mar_target_grad == "attached" else latent.clone().detach()
        z = model(latent, mask, cond)
        terms = model.forward_loss(z, gt, noise.t[k], noise.eps[k], recipe.mar_stage2_vb)
        err = (terms["loss"][None] * mask).sum() / mask.sum()
        loss = err + lam * (terms["target"] - terms["model_output"]).abs().max()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return latent.detach()[0], losses


@pytest.mark.parametrize("recipe", ["official", "consistent"])
def test_batched_stage2_equals_each_image_optimised_alone(model, recipe):
    rec = RECIPES[recipe]
    g = torch.Generator().manual_seed(21)
    tokens = torch.randn(4, L, C, generator=g)
    labels = torch.tensor([1, 1, 6, 6])
    steps, lr, lam = 4, 0.05, 10.0
    noise = G.MARStage2Noise.cat([G.MARStage2Noise.draw(2, steps, L, C, torch.Generator().manual_seed(s))
                                  for s in (8, 9)])
    gen = G.MARGenerator.__new__(G.MARGenerator)
    gen.mar = model
    cfg = type("Cfg", (), {"recipe": rec})()
    res = G.optimise_tokens(model, tokens, gen.stage2_condition(cfg, labels), noise, steps, lr, lam,
                            rec.mar_mask_rule, rec.mar_target_grad == "attached", rec.mar_stage2_vb)
    assert res.finite.all() and res.steps_done.tolist() == [steps] * 4
    for b in range(4):
        with torch.enable_grad():
            one = G.MARStage2Noise(*(getattr(noise, f)[b] for f in ("orders", "u", "t", "eps")))  # step-major
            ref, losses = released_optimise_one(model, tokens[b], int(labels[b]), one, steps, lr, lam, rec)
        assert (res.tokens[b] - ref).abs().max() <= TOL, b
        assert res.loss_first[b] == pytest.approx(losses[0], rel=1e-5)
        assert res.loss_last[b] == pytest.approx(losses[-1], rel=1e-5)
        assert (res.tokens[b] - tokens[b]).abs().max() > 1e-3  # it did move


def test_official_stage2_moves_the_latent_only_through_visible_tokens(model):
    """Released: the noised target is detached, so a step whose every token is hidden gives no gradient."""
    noise = G.MARStage2Noise.draw(1, 1, L, C, torch.Generator().manual_seed(2))
    noise.u[:] = 0.999999  # rate ≈ 1: every token hidden
    tokens = torch.randn(1, L, C, generator=torch.Generator().manual_seed(3))
    cond = torch.zeros(1, CFG.encoder_embed_dim)
    res = G.optimise_tokens(model, tokens, cond, noise, 1, 0.1, 10.0, "max", False, True)
    assert torch.equal(res.tokens, tokens)
    moved = G.optimise_tokens(model, tokens, cond, noise, 1, 0.1, 10.0, "max", True, True)
    assert (moved.tokens - tokens).abs().max() > 1e-3  # attached: the noised tokens carry gradient


def test_a_non_finite_image_stops_and_the_others_go_on(model):
    noise = G.MARStage2Noise.draw(2, 3, L, C, torch.Generator().manual_seed(4))
    tokens = torch.randn(2, L, C, generator=torch.Generator().manual_seed(5))
    tokens[1, 0, 0] = float("nan")
    cond = torch.zeros(2, CFG.encoder_embed_dim)
    res = G.optimise_tokens(model, tokens, cond, noise, 3, 0.1, 10.0, "min", False, True)
    assert res.finite.tolist() == [True, False] and res.steps_done.tolist() == [3, 0]
    alone = G.optimise_tokens(model, tokens[:1], cond[:1], noise.slice(0, 1), 3, 0.1, 10.0, "min", False, True)
    assert (res.tokens[0] - alone.tokens[0]).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Config


def test_mar_settings_enter_only_a_mar_config_and_dit_fingerprints_hold():
    base = dict(class_ids=[0, 1], class_names=["a", "b"], num_model_classes=10)
    dit = build_config("digits", 2, "official", **base)
    gen = G.MARGenerator.__new__(G.MARGenerator)
    gen.mar = M.MAR.__new__(M.MAR)
    gen.mar.cfg = CFG
    mar = build_config("digits", 2, "official", family_defaults=gen.config_defaults, **base)
    assert (mar.family, mar.k, mar.sample_steps, mar.guidance_scale, mar.guidance_schedule, mar.token_steps,
            mar.selection) == ("mar", 2, 32, 2.9, "linear", 100, "stability")
    cons = build_config("digits", 2, "consistent", family_defaults=gen.config_defaults, **base)
    assert cons.selection == "stable-correct" and cons.recipe.mar_stage2_cond == "class"
    assert len({dit.fingerprint(), mar.fingerprint(), cons.fingerprint()}) == 3
    # a MAR recipe field changes a MAR fingerprint, never a DiT one
    import dataclasses

    other = dataclasses.replace(RECIPES["official"], mar_mask_rule="min")
    assert dataclasses.replace(dit, recipe=other).fingerprint() == dit.fingerprint()
    assert dataclasses.replace(mar, recipe=other).fingerprint() != mar.fingerprint()


@pytest.mark.parametrize("override, message", [
    (dict(temperature=0.9), "--temperature applies to the MAR generator only"),
    (dict(selection="stability"), "--selection stability applies to the MAR generator only"),
    (dict(guidance_schedule="linear"), "--guidance-schedule linear applies to the MAR generator only"),
])
def test_dit_configs_refuse_mar_settings(override, message):
    with pytest.raises(UserError, match=message):
        build_config("digits", 2, "official", class_ids=[0], class_names=["a"], **override)


@pytest.mark.parametrize("override, message", [
    (dict(early_reject_step=3, early_reject_keep=2), "apply to the DiT sampler only"),
    (dict(guidance_interval=(0.1, 1.0)), "applies to the DiT sampler only"),
    (dict(temperature=0.0), "--temperature must be above 0"),
    (dict(token_steps=0), "--token-steps must be a whole number from 1 to 1000"),
])
def test_mar_configs_refuse_what_mar_cannot_do(override, message):
    gen = G.MARGenerator.__new__(G.MARGenerator)
    gen.mar = type("M", (), {"cfg": CFG})()
    with pytest.raises(UserError, match=message):
        build_config("digits", 2, "official", class_ids=[0], class_names=["a"], family_defaults=gen.config_defaults,
                     **override)


def test_jpeg_teacher_view_is_the_released_file_round_trip(tmp_path):
    """The release saves each decode with torchvision's save_image as .jpg, reads it back through a DataLoader with
    Resize((224, 224)) and ToTensor: the same pixels as selection.jpeg_view."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.utils import save_image

    from cao2_fast.selection import jpeg_view

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1  # overshoots too
    expected = []
    for i, img in enumerate(images):
        save_image(img, tmp_path / f"{i}.jpg", normalize=True, value_range=(-1, 1))
        with Image.open(tmp_path / f"{i}.jpg") as f:
            expected.append(transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])(f.convert("RGB")))
    got = jpeg_view(images, 32)
    assert got.shape == (3, 3, 32, 32)
    assert torch.equal(got, torch.stack(expected))


def test_the_released_execution_computes_what_the_batched_stage_2_does(model):
    """The benchmark's baseline (batch 1, torch Adam, weight gradients on) is the same arithmetic."""
    noise = G.MARStage2Noise.draw(2, 3, L, C, torch.Generator().manual_seed(6))
    tokens = torch.randn(2, L, C, generator=torch.Generator().manual_seed(7))
    cond = model.class_embedding(torch.tensor([3, 8]))
    batched = G.optimise_tokens(model, tokens, cond, noise, 3, 0.05, 10.0, "max", False, True)
    for b in range(2):
        one = G.MARStage2Noise(*(getattr(noise, f)[b] for f in ("orders", "u", "t", "eps")))
        ref = G.released_stage2_image(model, tokens[b], cond[b:b + 1], one, 3, 0.05, 10.0, "max", False, True)
        assert (ref - batched.tokens[b]).abs().max() <= TOL
    assert not any(p.requires_grad for p in model.parameters())  # put back as it was
