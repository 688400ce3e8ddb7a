"""Early candidate rejection and the guidance interval in stage 1 (tiny random models, seconds each).

Tolerance for survivors: a survivor samples on its own pre-drawn noise with the full run's arithmetic; only the batch
it shares changes (fewer candidates after the check). On CPU fp32 a row's matmul result may depend on how the
batch is blocked, so survivors' latents are held to 1e-5 absolute against the full run (observed: 0).
"""

from __future__ import annotations

import pytest
import torch

from cao2_fast import selection, stage1
from cao2_fast.config import build_config
from cao2_fast.diffusion import Diffusion, guided_steps, sample
from cao2_fast.errors import UserError
from cao2_fast.models.dit import DiTConfig, random_dit
from cao2_fast.models.random import random_models
from cao2_fast.pipeline import Distiller
from cao2_fast.generators.dit import DiTGenerator
from helpers import run_cli

SURVIVOR_ATOL = 1e-5
CLASSES = (0, 2, 4)


def make_distiller(ipc=2, k=4, **kw):
    dit, vae, clf = random_models(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    opts = dict(k=k, stage1_batch=16, stage2_batch=3, stage2_steps=0, sample_steps=8, t_max=2,
                classifier_input_size=32)
    opts.update(kw)
    cfg = build_config("custom", ipc, "official", class_ids=list(CLASSES), num_model_classes=5, **opts)
    return Distiller(DiTGenerator(dit, vae), clf, cfg)


def run_stage1(d):
    out = {}
    for g in d.groups():
        out.update(d.stage1(g))
    return out


class Counted:
    def __init__(self, fn):
        self.fn, self.images = fn, 0

    def __call__(self, x, *a):
        self.images += x.shape[0]
        return self.fn(x, *a)


@pytest.fixture(scope="module")
def exact(single_thread):
    return run_stage1(make_distiller())


# -- the ranking --------------------------------------------------------------------------------------------------

PROBS = torch.tensor([[0.70, 0.20, 0.10],   # 0: correct (target 0), 0.70
                      [0.30, 0.60, 0.10],   # 1: wrong, p(target) 0.30
                      [0.90, 0.05, 0.05],   # 2: correct, 0.90
                      [0.10, 0.10, 0.80],   # 3: wrong, p(target) 0.10, most confident wrong
                      [0.50, 0.25, 0.25],   # 4: correct, 0.50
                      [0.45, 0.55, 0.00]])  # 5: wrong, p(target) 0.45


@pytest.mark.parametrize("order,expected", [("desc", [2, 0, 4, 5, 1, 3]), ("asc", [4, 0, 2, 5, 1, 3])])
def test_confident_ranking_keeps_the_rule_order_for_correct_ones_then_the_nearest_wrong_ones(order, expected):
    assert selection.early_rank(PROBS, 0, "confident", order).tolist() == expected
    # its first IPC are select's picks whenever enough are correct
    assert selection.early_rank(PROBS, 0, "confident", order)[:3].tolist() == selection.select(PROBS, 0, 3, "confident",
    order).tolist()


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_el2n_ranking_is_selects_order(order):
    assert selection.early_rank(PROBS, 0, "el2n", order).tolist() == selection.select(PROBS, 0, 6, "el2n", order).tolist()


def test_random_ranking_is_the_permutation_select_draws():
    ranked = selection.early_rank(PROBS, 0, "random", generator=torch.Generator().manual_seed(7))
    picks = selection.select(PROBS, 0, 2, "random", generator=torch.Generator().manual_seed(7))
    assert sorted(ranked.tolist()) == list(range(6)) and ranked[:2].tolist() == picks.tolist()


def test_non_finite_candidates_rank_last():
    valid = torch.tensor([True, True, False, True, True, True])
    assert selection.early_rank(PROBS, 0, "confident", "desc", valid=valid).tolist() == [0, 4, 5, 1, 3, 2]


# -- sampling hooks: off is bitwise the old path --------------------------------------------------------------------

def test_split_sampling_equals_one_run_bitwise():
    dit = random_dit(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5), seed=1)
    diffusion = Diffusion.create(respacing=8)
    g = torch.Generator().manual_seed(0)
    noise = stage1.Stage1Noise.draw(6, (4, 8, 8), 8, g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    args = (dit, diffusion)
    full = sample(*args, noise.initial, y, 5, 2.7, 3, step_noise=noise.steps)
    x, x0 = sample(*args, noise.initial, y, 5, 2.7, 3, step_noise=noise.steps, stop=5, return_x0=True)
    rest = sample(*args, x, y, 5, 2.7, 3, step_noise=noise.steps, start=5)
    assert torch.equal(rest, full)
    assert x0.shape == x.shape and not torch.equal(x0, x)
    # an interval that holds every step's noise level is the released every-step guidance, bit for bit
    assert guided_steps(diffusion, (0.0, 1e3)).all()
    assert torch.equal(sample(*args, noise.initial, y, 5, 2.7, 3, step_noise=noise.steps,
                              guidance_interval=(0.0, 1e3)), full)


def test_off_is_the_default_and_keeps_the_fingerprint():
    d = make_distiller(k=2, stage1_batch=8, sample_steps=6)
    cfg = d.config
    assert cfg.early_reject_step is None and cfg.early_reject_keep is None and cfg.guidance_interval is None
    # the same config before these fields existed had this fingerprint (output folders stay valid)
    assert cfg.fingerprint() == "4b17537db6f82db9"
    on = make_distiller(k=2, stage1_batch=8, sample_steps=6, early_reject_step=3, early_reject_keep=3)
    assert on.config.fingerprint() != cfg.fingerprint()


# -- survivors follow the exact trajectory --------------------------------------------------------------------------

@pytest.mark.parametrize("step,keep", [(2, 4), (6, 2), (1, 7)])
def test_survivors_latents_equal_the_full_runs(exact, step, keep):
    early = run_stage1(make_distiller(early_reject_step=step, early_reject_keep=keep))
    shared = 0
    for c, r in exact.items():
        a, b = r["candidate_index"].tolist(), early[c]["candidate_index"].tolist()
        for i, cand in enumerate(a):
            if cand in b:
                shared += 1
                diff = (r["latents"][i] - early[c]["latents"][b.index(cand)]).abs().max()
                assert diff <= SURVIVOR_ATOL
    assert shared > 0  # some picks survived, so the comparison ran


def test_when_the_early_ranking_is_right_the_picks_are_the_exact_ones(exact, monkeypatch):
    # an oracle ranking: each class's final exact picks first (as a perfect early score would rank them)
    d = make_distiller(early_reject_step=3, early_reject_keep=2)
    picks = {j: exact[c]["candidate_index"] for j, c in enumerate(CLASSES)}
    real_rank = selection.early_rank
    seen = []

    def oracle(probs, target, rule="confident", order="desc", generator=None, valid=None):
        j = list(d._target_index.values()).index(target)
        seen.append(j)
        n = probs.shape[0]
        first = picks[j].tolist()
        return torch.tensor(first + [i for i in real_rank(probs, target, rule, order).tolist() if i not in first][:n -
        len(first)])

    monkeypatch.setattr(selection, "early_rank", oracle)
    early = run_stage1(d)
    assert sorted(seen) == [0, 1, 2]
    for c in CLASSES:
        assert sorted(early[c]["candidate_index"].tolist()) == sorted(exact[c]["candidate_index"].tolist())
        order = torch.argsort(early[c]["candidate_index"])
        ref = torch.argsort(exact[c]["candidate_index"])
        assert (early[c]["latents"][order] - exact[c]["latents"][ref]).abs().max() <= SURVIVOR_ATOL


@pytest.mark.parametrize("step,keep", [(1, 2), (5, 3)])
def test_random_selection_keeps_the_exact_picks_at_any_check(single_thread, step, keep):
    a = run_stage1(make_distiller(selection="random"))
    b = run_stage1(make_distiller(selection="random", early_reject_step=step, early_reject_keep=keep))
    for c in CLASSES:
        assert b[c]["candidate_index"].tolist() == a[c]["candidate_index"].tolist()


# -- the cost model ----------------------------------------------------------------------------------------------

def test_forward_count_arithmetic():
    assert stage1.dit_forwards(40, 50) == 40 * 50 * 2
    assert stage1.dit_forwards(40, 50, guidance_scale=1.0) == 40 * 50
    assert stage1.dit_forwards(40, 50, [(10, 20)]) == 40 * 10 * 2 + 20 * 40 * 2
    assert stage1.dit_forwards(40, 50, [(5, 30), (15, 15)]) == 2 * (40 * 5 + 30 * 10 + 15 * 35)
    guided = torch.zeros(50, dtype=torch.bool)
    guided[:20] = True  # the 20 lowest-noise steps, which are the last 20 taken
    assert stage1.dit_forwards(40, 50, [(40, 10)], guided=guided) == 40 * 30 + 40 * 10 * 2 + 10 * 10 * 2


@pytest.mark.parametrize("opts", [dict(early_reject_step=3, early_reject_keep=3),
                                  dict(early_reject_step=(2, 5), early_reject_keep=(6, 3)),
                                  dict(guidance_interval=(0.0, 1.0)),
                                  dict(early_reject_step=4, early_reject_keep=2, guidance_interval=(0.5, 200.0))])
def test_counted_dit_and_decode_calls_match_the_model(single_thread, opts):
    d = make_distiller(**opts)
    d.generator.sampler, d.generator.decoder = Counted(d.generator.sampler), Counted(d.generator.decoder)
    run_stage1(d)
    assert d.generator.sampler.images == len(CLASSES) * d.generator.stage1_forwards(d.config)
    checks = selection.early_checks(d.config.early_reject_step, d.config.early_reject_keep)
    scored = d.config.num_candidates + sum(k for _, k in checks)  # every check scores the live ones, then the end
    assert d.generator.decoder.images == len(CLASSES) * scored
    assert d.generator.stage1_forwards(d.config) < d.config.num_candidates * 8 * 2  # less than the exact run's


# -- configuration and CLI -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts,message", [
    (dict(early_reject_step=3), "needs both --early-reject STEP and --early-keep M"),
    (dict(early_reject_keep=3), "needs both"),
    (dict(early_reject_step=0, early_reject_keep=3), "after 1 to 7 of the 8 sampling steps"),
    (dict(early_reject_step=8, early_reject_keep=3), "after 1 to 7"),
    (dict(early_reject_step=3, early_reject_keep=1), r"keep between IPC \(2\) and K·IPC \(8\)"),
    (dict(early_reject_step=3, early_reject_keep=9), r"keep between IPC \(2\) and K·IPC \(8\)"),
    (dict(early_reject_step=(2, 5), early_reject_keep=(3,)), "equally many"),
    (dict(early_reject_step=(5, 2), early_reject_keep=(6, 3)), "each check must come later"),
    (dict(early_reject_step=(2, 5), early_reject_keep=(3, 6)), "keep no more than the one before"),
    (dict(early_reject_step=True, early_reject_keep=3), "one integer each"),
    (dict(guidance_interval=(5.0, 1.0)), "need 0 <= lo < hi"),
    (dict(guidance_interval=(1.0,)), "give two noise levels"),
])
def test_bad_settings_are_one_line_errors(opts, message):
    with pytest.raises(UserError, match=message):
        make_distiller(**opts)


@pytest.mark.parametrize("args,message", [
    (["--early-reject", "10"], "needs both"),
    (["--early-reject", "10", "--early-keep", "5"], "--early-keep 5: keep between IPC (10) and K·IPC (20)"),
    (["--early-reject", "ten", "--early-keep", "15"], "--early-reject 'ten': expected a whole number"),
    (["--guidance-interval", "5"], "--guidance-interval '5': expected LO,HI"),
])
def test_cli_rejects_bad_early_options_with_exit_2(capsys, args, message):
    code, _, err = run_cli(["distill", "--dry-run", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_dry_run_counts_the_saved_work(capsys):
    import json

    _, out, _ = run_cli(["distill", "--dry-run", "--k", "4"], capsys)
    _, out_early, _ = run_cli(["distill", "--dry-run", "--k", "4", "--early-reject", "10", "--early-keep", "20"],
    capsys)
    full, early = json.loads(out), json.loads(out_early)
    # 40 candidates: 10 steps on all 40, 40 steps on 20 -> 2400 of 4000 forwards
    assert early["tflop_stage1"] == pytest.approx(full["tflop_stage1"] * 2400 / 4000, rel=1e-3)
    assert early["config"]["early_reject_step"] == 10 and early["fingerprint"] != full["fingerprint"]
