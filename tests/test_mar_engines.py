"""MAR on engines: the fixed-shape MAE form, the MAE and DiffLoss-head engines against eager, the sampler and the
generator on them, stage 2's objective compiled, the CUDA-graph head loop's buffer handling, and the engines loaded
by path with their contracts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cao2_fast.engines import EngineCache, build_engine, load, stage2_engine
from cao2_fast.errors import UserError
from cao2_fast.generators.mar import (HeadLoop, MARGenerator, MARStage1Noise, MARStage2Noise, Stage2Objective,
                                      mask_rates, optimise_tokens, sample_tokens, stage2_mask_counts)
from cao2_fast.models import mar as M
from cao2_fast.models.random import random_vae

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = M.MARConfig(img_size=8, vae_stride=2, patch_size=1, vae_embed_dim=4, buffer_size=2, encoder_embed_dim=16,
                  encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=12, decoder_depth=1, decoder_num_heads=3,
                  class_num=10, diffloss_d=1, diffloss_w=24, attn_dropout=0.0, proj_dropout=0.0,
                  num_sampling_steps="5")
L, C = CFG.seq_len, CFG.token_embed_dim


@pytest.fixture(scope="module")
def gen():
    model = M.MAR(CFG).init_weights(torch.Generator().manual_seed(3), std=0.05).eval().requires_grad_(False)
    return MARGenerator(model, random_vae(tiny=True))


@pytest.fixture(scope="module")
def onnx_engines(gen, tmp_path_factory):
    cache = EngineCache(tmp_path_factory.mktemp("engines"))
    specs = gen.engine_specs()
    return {n: build_engine("onnx", specs[n], "cpu", cache=cache) for n in ("mar_mae", "mar_head")}


def masks(n: int, seed: int = 0) -> torch.Tensor:
    """Masks of every kind: nothing hidden, all hidden, and counts in between (float, 1 = hidden)."""
    orders = M.random_orders(n, L, np.random.default_rng(seed))
    counts = torch.tensor([0, L, *np.random.default_rng(seed + 1).integers(1, L, n - 2).tolist()])
    return M.mask_by_order(counts, orders).float()


def test_the_fixed_shape_form_equals_the_released_one(gen):
    """Masking hidden tokens out of attention instead of dropping them changes nothing but rounding."""
    x, mask = torch.randn(7, L, C), masks(7)
    cond = gen.mar.class_embedding(torch.arange(7) % 10)
    with torch.no_grad():
        want = gen.mar(x, mask, cond)
        got = gen.mar.forward_static(x, mask, cond)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - gen.mar.forward_static(x, masks(7, seed=9), cond)).abs().max() > 1e-3  # the mask matters


@pytest.mark.parametrize("n", [1, 5])
def test_the_onnx_engines_equal_eager(gen, onnx_engines, n):
    x, mask = torch.randn(n, L, C), masks(max(n, 2))[:n]
    cond = gen.mar.class_embedding(torch.arange(n) % 10)
    rows, t, z = torch.randn(n * 3, C), torch.randint(0, 1000, (n * 3,)), torch.randn(n * 3, CFG.decoder_embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(onnx_engines["mar_mae"](x, mask, cond), gen.mar(x, mask, cond), atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(onnx_engines["mar_head"](rows, t.float(), z), gen.mar.diffloss.net(rows, t, z),
                                   atol=1e-5, rtol=1e-4)


def stage1_noise(n: int, steps: int) -> MARStage1Noise:
    return MARStage1Noise.draw(n, L, C, steps, torch.Generator().manual_seed(4))


def test_the_sampler_on_engines_equals_eager(gen, onnx_engines):
    diffusion = M.MARDiffusion.create("5")
    cond = gen.mar.class_embedding(torch.tensor([1, 4, 4]))
    noise = stage1_noise(3, 5)
    run = dict(num_iter=4, guidance=2.5, keep_after=(2,))
    want = sample_tokens(gen.mar, diffusion, cond, noise, **run)
    got = sample_tokens(gen.mar, diffusion, cond, noise, mae=onnx_engines["mar_mae"], head=onnx_engines["mar_head"],
                        **run)
    assert sorted(got) == sorted(want) == [2, 3]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4)


def test_the_generator_runs_stage_1_on_the_engines_it_is_given(gen, onnx_engines, monkeypatch):
    """``use_engines`` routes the MAE and the head to the engines (eager keeps the model's own calls)."""
    calls = {"mar_mae": 0, "mar_head": 0}

    class Counted:
        def __init__(self, name):
            self.name, self.backend = name, onnx_engines[name].backend

        def __call__(self, *a):
            calls[self.name] += 1
            return onnx_engines[self.name](*a)

    eager = SimpleNamespace(backend=SimpleNamespace(name="eager"))
    g = MARGenerator(gen.mar, gen.vae)
    g.use_engines({"mar_mae": eager, "mar_head": eager, "vae_decode": gen.vae.decode}, eager)
    assert g.mae_call is None and g.head_call is None and g.stage2_call is None
    g.use_engines({"mar_mae": Counted("mar_mae"), "mar_head": Counted("mar_head"), "vae_decode": gen.vae.decode},
                  eager)
    cfg = SimpleNamespace(num_candidates=2, sample_steps=3, guidance_scale=2.0, guidance_schedule="linear",
                          temperature=1.0, token_steps=5, stage1_batch=4, seed=0,
                          recipe=SimpleNamespace(mar_teacher_io="tensor", mar_autocast=False))

    def score(latents, io):
        images = gen.vae.decode(latents)
        return images, torch.softmax(images.flatten(1)[:, :10], 1), torch.ones(len(latents), dtype=torch.bool)

    got = g.sample([2, 6], cfg, score, None, "cpu", torch.float32)
    want = gen.sample([2, 6], cfg, score, None, "cpu", torch.float32)
    assert calls == {"mar_mae": 3, "mar_head": 3 * 5}  # one batch: a guided call per iteration and per head step
    for c in (2, 6):
        torch.testing.assert_close(got[c].latents, want[c].latents, atol=1e-4, rtol=1e-4)


def test_the_head_loop_replays_the_steps_with_each_calls_inputs(gen):
    """The CUDA-graph loop's buffers, checked on CPU with a stand-in graph that re-runs the captured function into
    the same output tensor: every call sees its own inputs, each row count gets its own graph, and the result is
    the stepped loop's."""
    diffusion = M.MARDiffusion.create("5")
    captured = []

    def stand_in(fn, device):
        out = fn()
        captured.append(out.shape)
        return (lambda: out.copy_(fn())), out

    loop = HeadLoop(gen.mar.diffloss.net, diffusion, guided=True, capture=stand_in)
    g = torch.Generator().manual_seed(1)
    for rows in (6, 6, 4):
        x, noise = torch.randn(rows, C, generator=g), torch.randn(rows, 5, C, generator=g)
        z, zu = torch.randn(rows, CFG.decoder_embed_dim, generator=g), torch.randn(rows, CFG.decoder_embed_dim,
                                                                                    generator=g)
        want = x
        with torch.no_grad():
            for i in reversed(range(5)):
                want = M.p_sample(gen.mar.diffloss.net, diffusion, want, i, z, noise[:, i], 0.9, 2.5, zu)
            got = loop(x, z, zu, noise, 0.9, 2.5)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert captured == [(6, C), (4, C)]

    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    fallback = HeadLoop(gen.mar.diffloss.net, diffusion, guided=True, capture=broken)
    with torch.no_grad():
        torch.testing.assert_close(fallback(x, z, zu, noise, 0.9, 2.5), want, atol=1e-6, rtol=1e-6)
    assert fallback.failed == "operation not permitted when stream is capturing" and not fallback.graphs


def test_padded_encoder_rows_change_nothing_but_rounding(gen):
    """The bucketed rows a compiled stage 2 gets (padding left out of attention, dropped by the decoder) give the
    exact rows' z, for masks of every kind; the buckets are few at any size."""
    x, mask = torch.randn(7, L, C), masks(7)
    cond = gen.mar.class_embedding(torch.arange(7) % 10)
    index, valid = gen.mar.kept_rows(mask, bucketed=True)
    assert index.shape[1] == valid.shape[1] == 18 and valid.sum(1).tolist() == (2 + (mask == 0).sum(1)).tolist()
    with torch.no_grad():
        torch.testing.assert_close(gen.mar(x, mask, cond, rows=(index, valid)), gen.mar(x, mask, cond),
                                   atol=1e-5, rtol=1e-5)
    assert [gen.mar.row_bucket(k) for k in (2, 8, 9, 17, 18)] == [8, 8, 16, 18, 18]
    base = M.MARConfig.named("mar_base")
    total = base.buffer_size + base.seq_len
    buckets = {M.MAR.row_bucket(SimpleNamespace(cfg=base), k) for k in range(base.buffer_size, total + 1)}
    assert len(buckets) <= 8 and max(buckets) == total and all(b % 8 == 0 for b in buckets if b < total)


def test_stage_2_compiled_equals_eager(gen):
    """Adam steps of a batch through the compiled objective (what ``--stage2-engine compile`` runs), against eager.
    The steps see different counts of visible tokens in one bucket: one compiled graph serves them all (each
    compilation is about a minute on two busy cores)."""
    from torch._dynamo.utils import counters

    tokens = torch.randn(3, L, C)
    cond = gen.mar.class_embedding(torch.tensor([0, 5, 9]))
    noise = MARStage2Noise.draw(3, 3, L, C, torch.Generator().manual_seed(2))
    run = dict(steps=3, lr=0.05, lam=10.0, rule="max", attached=True, include_vb=True)
    want = optimise_tokens(gen.mar, tokens, cond, noise, **run)
    compiled = stage2_engine("compile", Stage2Objective(gen.mar), "cpu")
    counters.clear()
    got = optimise_tokens(gen.mar, tokens, cond, noise, objective=compiled, **run)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss_last, want.loss_last, atol=1e-5, rtol=1e-5)
    assert (got.tokens - tokens).abs().max() > 1e-3  # the steps moved the tokens
    visible = [int(gen.mar.kept_rows(M.mask_by_order(c, o).float())[0].shape[1]) for c, o in
               zip(stage2_mask_counts(mask_rates(noise.u), L, "max").T, noise.orders.transpose(0, 1))]
    assert len(set(visible)) > 1  # the steps' exact row counts differ ...
    assert counters["stats"]["unique_graphs"] == 1  # ... and one graph served them
    assert len(compiled.first_calls) == 1


def test_the_engines_load_by_path_with_their_contracts(gen, onnx_engines):
    mae = load(onnx_engines["mar_mae"].artefact.parent)
    head = load(onnx_engines["mar_head"].artefact)
    assert (mae.contract.model, head.contract.model) == ("mar_mae", "mar_head")
    assert [t.name for t in mae.contract.inputs] == ["tokens", "mask", "cond"]
    assert [t.name for t in head.contract.inputs] == ["x", "t", "z"]
    assert all(t.meaning for t in (*mae.contract.inputs, *head.contract.inputs, *mae.contract.outputs))
    assert mae.contract.outputs[0].shape == ("N", L, CFG.decoder_embed_dim)
    x, mask = torch.randn(2, L, C), masks(2)
    cond = gen.mar.class_embedding(torch.tensor([3, 3]))
    with torch.no_grad():
        torch.testing.assert_close(mae(cond=cond, tokens=x, mask=mask), gen.mar(x, mask, cond), atol=1e-5, rtol=1e-4)
        rows, z = torch.randn(4, C), torch.randn(4, CFG.decoder_embed_dim)
        torch.testing.assert_close(head(rows, 999, z), gen.mar.diffloss.net(rows, torch.full((4,), 999), z),
                                   atol=1e-5, rtol=1e-4)  # one timestep for the whole batch
    with pytest.raises(UserError, match=r"input tokens has shape \(2, 3, 4\), expected \(N, 16, 4\)"):
        mae(torch.randn(2, 3, C), mask, cond)
    with pytest.raises(UserError, match="timesteps must be finite and in"):
        head(rows, torch.full((4,), 1000.0), z)


@pytest.mark.parametrize("backend, graphs, looped", [("eager", False, True), ("compile", False, True),
                                                     ("compile", True, False), ("onnx", False, False),
                                                     ("trt", False, False)])
def test_on_cuda_the_head_steps_replay_from_a_graph_unless_the_engine_has_its_own(gen, backend, graphs, looped):
    """Which head call stage 1 makes (the routing only: no CUDA here). A head compiled with CUDA graphs of its own
    is not captured again (graphs do not nest), and ONNX Runtime and TensorRT heads are called step by step."""
    def engine(name, cuda_graphs=False):
        return SimpleNamespace(backend=SimpleNamespace(name=name), details={"cuda_graphs": cuda_graphs})

    g = MARGenerator(gen.mar, gen.vae)
    g.use_engines({"mar_mae": engine(backend), "mar_head": engine(backend, graphs), "vae_decode": None},
                  engine("eager"))
    cfg = SimpleNamespace(token_steps=5, guidance_scale=2.9)
    on_cuda = g._head(cfg, "cuda")
    assert isinstance(on_cuda, HeadLoop) == looped and (looped or on_cuda is g.head_call)
    assert g._head(cfg, "cpu") is g.head_call  # on the CPU never a graph
    if looped:
        assert g._head(cfg, "cuda") is on_cuda  # a loop is made once per (head steps, guidance)
        g.use_engines({"mar_mae": engine(backend), "mar_head": engine(backend, graphs), "vae_decode": None},
                      engine("eager"))
        again = g._head(cfg, "cuda")  # new engines: the loop holding the old head is gone
        assert isinstance(again, HeadLoop) and again is not on_cuda
    g.graph_head_steps = False  # what the benchmark's released execution sets
    assert g._head(cfg, "cuda") is g.head_call


def test_the_head_loop_copies_nothing_from_the_host_once_warm(gen):
    """What a CUDA-graph capture forbids, checked without CUDA: after one warm-up call (which fills the schedule's
    device tables), the loop run on the meta device touches no tensor elsewhere (a host tensor would be a copy
    during the capture) and reads no value back (``.item()`` cannot run on meta)."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.elsewhere = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if any(isinstance(a, torch.Tensor) and a.device.type != "meta" for a in tree_leaves((args, kwargs))):
                self.elsewhere.append(str(func))
            return func(*args, **kwargs)

    net = copy.deepcopy(gen.mar.diffloss.net).to("meta")
    loop = HeadLoop(net, M.MARDiffusion.create("5"), guided=True)
    w = CFG.decoder_embed_dim
    buf = {"x": torch.empty(3, C, device="meta"), "z": torch.empty(3, w, device="meta"),
           "zu": torch.empty(3, w, device="meta"), "noise": torch.empty(3, 5, C, device="meta"),
           "temperature": torch.empty(3, device="meta"), "scale": torch.empty(3, device="meta")}
    with torch.no_grad():
        loop._loop(buf)  # the warm-up
        with Watch() as watch:
            out = loop._loop(buf)
    assert watch.elsewhere == [] and out.shape == (3, C) and out.device.type == "meta"
