"""The lean DiT against diffusers and the original checkpoint layout, its embeddings, sizes and loader errors, and
its CPU execution forms against the released ones."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from cao2_fast.errors import UserError
from cao2_fast.models import dit_cpu
from cao2_fast.models.dit import (
    DiT,
    DiTConfig,
    diffusers_to_original,
    infer_config,
    load_dit,
    sincos_pos_embed,
    timestep_embedding,
)

from helpers import (
    diffusers_forward,
    mae_2d_sincos,
    original_layout_from_diffusers,
    reference_timestep_embedding,
    set_diffusers_freq_shift_,
    tiny_diffusers_dit,
)

NUM_CLASSES = 10
NULL = NUM_CLASSES


pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(batch: int, timesteps, labels, seed: int = 0, channels: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    return x, torch.tensor(timesteps, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def _ours_from_diffusers(dm, freq_shift: int = 1) -> DiT:
    c = dm.config
    hidden = c.num_attention_heads * c.attention_head_dim
    cfg = DiTConfig(
        input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels, hidden_size=hidden,
        depth=c.num_layers, num_heads=c.num_attention_heads, num_classes=c.num_embeds_ada_norm,
        learn_sigma=(c.out_channels or c.in_channels) == 2 * c.in_channels, norm_eps=1e-6,
        mlp_norm_eps=c.norm_eps, freq_shift=freq_shift,
    )
    model = DiT(cfg)
    missing, unexpected = model.load_state_dict(diffusers_to_original(dm.state_dict(), c.num_layers), strict=False)
    assert not missing and not unexpected
    return model.eval()


@pytest.fixture(scope="module")
def dm():
    return tiny_diffusers_dit(seed=0)


@pytest.fixture(scope="module")
def ours(dm):
    return _ours_from_diffusers(dm)


# ---------------------------------------------------------------------------------------------------------------
# diffusers equivalence


@pytest.mark.parametrize(
    "timesteps,labels",
    [
        ([0], [3]),
        ([999], [NULL]),
        ([0, 999, 500], [0, NULL, 9]),
        ([1, 250, 998, 17, 640], [NULL, 4, 4, 7, NULL]),
    ],
)
def test_matches_diffusers(dm, ours, timesteps, labels):
    x, t, y = _inputs(len(timesteps), timesteps, labels, seed=len(timesteps))
    ref = diffusers_forward(dm, x, t, y)
    with torch.no_grad():
        out = ours(x, t, y)
    assert out.shape == ref.shape == (len(timesteps), 8, 8, 8)
    assert ref.abs().max() > 0.05  # the comparison is not between near-zero outputs
    assert (out - ref).abs().max().item() <= 1e-5


def test_matches_diffusers_patch4_no_sigma_and_deeper():
    dm = tiny_diffusers_dit(seed=3, heads=4, head_dim=8, layers=3, sample_size=16, patch=4, out_channels=None,
                            num_classes=7, norm_eps=1e-5)
    ours = _ours_from_diffusers(dm)
    assert ours.cfg.out_channels == 4 and not ours.cfg.learn_sigma
    x, t, y = _inputs(3, [0, 321, 999], [7, 0, 6], seed=5, size=16)
    ref = diffusers_forward(dm, x, t, y)
    with torch.no_grad():
        out = ours(x, t, y)
    assert out.shape == ref.shape == (3, 4, 16, 16)
    assert (out - ref).abs().max().item() <= 1e-5


def test_matches_diffusers_large_weights_and_mlp_eps(tmp_path):
    dm = tiny_diffusers_dit(seed=5, std=0.2, norm_eps=1e-2)
    dm.save_pretrained(tmp_path)
    model = load_dit(tmp_path)
    x, t, y = _inputs(3, [0, 500, 999], [1, NULL, 3], seed=6)
    ref = diffusers_forward(dm, x, t, y)
    with torch.no_grad():
        out = model(x, t, y)
    scale = max(1.0, ref.abs().max().item())
    assert ref.abs().max() > 1.0
    assert (out - ref).abs().max().item() <= 1e-5 * scale


def test_batch_rows_are_independent(ours):
    x, t, y = _inputs(3, [5, 600, 999], [1, NULL, 2], seed=9)
    with torch.no_grad():
        full = ours(x, t, y)
        rows = torch.cat([ours(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(3)])
    assert (full - rows).abs().max().item() <= 1e-5


def test_timestep_and_label_matter(ours):
    x, _, _ = _inputs(1, [0], [0], seed=11)
    with torch.no_grad():
        a = ours(x, torch.tensor([10]), torch.tensor([2]))
        b = ours(x, torch.tensor([11]), torch.tensor([2]))
        c = ours(x, torch.tensor([10]), torch.tensor([NULL]))
    assert (a - b).abs().max() > 1e-4
    assert (a - c).abs().max() > 1e-4


def test_freq_shift_selects_the_convention(dm):
    ours0 = _ours_from_diffusers(dm, freq_shift=0)
    x, t, y = _inputs(2, [37, 999], [1, 2], seed=1)
    ref = diffusers_forward(dm, x, t, y)
    with torch.no_grad():
        out0 = ours0(x, t, y)
    assert (out0 - ref).abs().max() > 1e-4


def test_load_dit_diffusers_dir_and_pipeline_root(dm, tmp_path):
    dm.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    x, t, y = _inputs(3, [0, 480, 999], [NULL, 5, 0], seed=2)
    ref = diffusers_forward(dm, x, t, y)
    for where in (tmp_path / "transformer", tmp_path):
        model = load_dit(where)
        assert model.cfg.freq_shift == 1
        assert model.cfg.depth == 2 and model.cfg.hidden_size == 32 and model.cfg.num_heads == 2
        assert model.cfg.num_classes == NUM_CLASSES and model.cfg.learn_sigma
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            out = model(x, t, y)
        assert (out - ref).abs().max().item() <= 1e-5


def test_load_dit_rejects_differing_embedder_copies(tmp_path):
    dm = tiny_diffusers_dit(seed=4)
    with torch.no_grad():
        dm.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight[0, 0] += 0.01
    with pytest.raises(UserError, match="block 1"):
        diffusers_to_original(dm.state_dict(), 2)
    dm.save_pretrained(tmp_path)
    with pytest.raises(UserError):
        load_dit(tmp_path)


def test_load_dit_rejects_differing_class_embedder_copy(tmp_path):
    dm = tiny_diffusers_dit(seed=4, layers=3)
    with torch.no_grad():
        dm.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[NULL, 1] -= 0.01
    with pytest.raises(UserError, match="block 2"):
        diffusers_to_original(dm.state_dict(), 3)


# ---------------------------------------------------------------------------------------------------------------
# Original checkpoint layout


@pytest.fixture(scope="module")
def orig_pair():
    """A diffusers DiT in the original convention (pre-MLP LayerNorm eps 1e-6, shift 0) and its original-layout
    state dict written independently."""
    dm = tiny_diffusers_dit(seed=7, heads=2, head_dim=64, layers=2, sample_size=8, patch=2, norm_eps=1e-6)
    sd = original_layout_from_diffusers(dm.state_dict(), depth=2, grid=4)
    return dm, sd


@pytest.mark.parametrize("wrap", [None, "ema", "model"])
def test_load_original_pt(orig_pair, tmp_path, wrap):
    dm, sd = orig_pair
    path = tmp_path / "DiT-tiny.pt"
    torch.save(sd if wrap is None else {wrap: sd, "other": 1}, path)
    model = load_dit(path)
    cfg = model.cfg
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (2, 128, 2, 2)
    assert (cfg.num_classes, cfg.learn_sigma, cfg.in_channels, cfg.input_size) == (NUM_CLASSES, True, 4, 8)
    assert cfg.freq_shift == 0

    x, t, y = _inputs(3, [0, 999, 123], [NULL, 3, 9], seed=8)
    with torch.no_grad():
        out = model(x, t, y)
    dm.save_pretrained(tmp_path / "diffusers")
    as_original = load_dit(tmp_path / "diffusers", freq_shift=0)
    with torch.no_grad():
        ref = as_original(x, t, y)
    assert out.abs().max() > 0.05
    assert (out - ref).abs().max().item() <= 1e-5


def test_load_original_training_checkpoint(orig_pair, tmp_path):
    import argparse

    dm, sd = orig_pair
    other = {k: v + 1.0 for k, v in sd.items()}
    ckpt = {"model": other, "ema": sd, "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="DiT-XL/2", image_size=256, lr=1e-4)}
    path = tmp_path / "0400000.pt"
    torch.save(ckpt, path)
    model = load_dit(path)
    torch.save(sd, tmp_path / "plain.pt")
    plain = load_dit(tmp_path / "plain.pt")
    x, t, y = _inputs(2, [0, 999], [4, NULL], seed=16)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), plain(x, t, y))  # the "ema" weights, not "model"


def test_original_convention_matches_diffusers_with_shift0(orig_pair, tmp_path):
    dm, sd = orig_pair
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    model = load_dit(path)
    x, t, y = _inputs(2, [0, 999], [4, NULL], seed=12)
    shifted = tiny_diffusers_dit(seed=7, heads=2, head_dim=64, layers=2, sample_size=8, patch=2, norm_eps=1e-6)
    set_diffusers_freq_shift_(shifted, 0)
    ref = diffusers_forward(shifted, x, t, y)
    with torch.no_grad():
        out = model(x, t, y)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (ref - diffusers_forward(dm, x, t, y)).abs().max() > 1e-4  # the conventions do differ at t=999


def test_load_original_patch4_without_sigma(tmp_path):
    dm = tiny_diffusers_dit(seed=13, heads=2, head_dim=64, layers=3, sample_size=16, patch=4, out_channels=None,
                            num_classes=5, norm_eps=1e-6)
    sd = original_layout_from_diffusers(dm.state_dict(), depth=3, grid=4)
    torch.save({"model": sd}, tmp_path / "p4.pt")
    model = load_dit(tmp_path / "p4.pt")
    cfg = model.cfg
    assert (cfg.depth, cfg.patch_size, cfg.num_classes, cfg.learn_sigma, cfg.input_size) == (3, 4, 5, False, 16)
    set_diffusers_freq_shift_(dm, 0)
    x, t, y = _inputs(1, [999], [5], seed=14, size=16)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (1, 4, 16, 16)
    assert (out - diffusers_forward(dm, x, t, y)).abs().max().item() <= 1e-5


def test_load_original_freq_shift_override(orig_pair, tmp_path):
    dm, sd = orig_pair
    torch.save(sd, tmp_path / "c.pt")
    model = load_dit(tmp_path / "c.pt", freq_shift=1)
    assert model.cfg.freq_shift == 1
    shifted = tiny_diffusers_dit(seed=7, heads=2, head_dim=64, layers=2, sample_size=8, patch=2, norm_eps=1e-6)
    x, t, y = _inputs(2, [3, 999], [4, NULL], seed=15)
    with torch.no_grad():
        out = model(x, t, y)
    assert (out - diffusers_forward(shifted, x, t, y)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,hidden,heads,depth", [("S", 384, 6, 12), ("B", 768, 12, 12), ("L", 1024, 16, 24),
                                                     ("XL", 1152, 16, 28)])
def test_infer_config_named_sizes(name, hidden, heads, depth):
    shape = lambda *s: torch.zeros(()).expand(*s)  # noqa: E731  (shapes only, no memory)
    sd = {
        "x_embedder.proj.weight": shape(hidden, 4, 2, 2),
        "pos_embed": shape(1, 256, hidden),
        "y_embedder.embedding_table.weight": shape(1001, hidden),
        "final_layer.linear.weight": shape(2 * 2 * 8, hidden),
        "blocks.0.mlp.fc1.weight": shape(4 * hidden, hidden),
        f"blocks.{depth - 1}.attn.qkv.weight": shape(3 * hidden, hidden),
    }
    cfg = infer_config(sd)
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth) == (hidden, heads, depth)
    assert (cfg.num_classes, cfg.input_size, cfg.patch_size, cfg.learn_sigma, cfg.mlp_ratio) == (1000, 32, 2, True, 4.0)
    assert cfg == DiTConfig.named(f"DiT-{name}/2")


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dim", [256, 64, 7])
def test_timestep_embedding_formula(shift, dim):
    t = np.array([0, 1, 2, 17.5, 250, 500, 998, 999])
    ours = timestep_embedding(torch.tensor(t), dim, freq_shift=shift).double().numpy()
    ref = reference_timestep_embedding(t, dim, shift)
    assert ours.shape == (len(t), dim)
    assert np.abs(ours - ref).max() <= 2e-4
    half = dim // 2
    assert np.allclose(ours[0, :half], 1.0) and np.allclose(ours[0, half : 2 * half], 0.0)  # [cos, sin] at t=0
    if dim % 2:
        assert np.all(ours[:, -1] == 0)


def test_timestep_embedding_conventions_differ_and_match_references():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 3, 100, 999])
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    dit_original = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    assert (timestep_embedding(t, 256, 0) - dit_original).abs().max() <= 1e-6
    diff_ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert (timestep_embedding(t, 256, 1) - diff_ref).abs().max() <= 1e-6
    assert (timestep_embedding(t, 256, 0) - timestep_embedding(t, 256, 1)).abs().max() > 0.1


@pytest.mark.parametrize("dim,grid", [(32, 4), (128, 4), (64, 2), (1152, 16)])
def test_sincos_pos_embed_matches_mae(dim, grid):
    ours = sincos_pos_embed(dim, grid)
    assert ours.shape == (1, grid * grid, dim)
    ref = mae_2d_sincos(dim, grid)
    assert np.abs(ours[0].double().numpy() - ref).max() <= 1e-6


def test_model_pos_embed_is_the_mae_table(ours):
    ref = mae_2d_sincos(32, 4)
    assert np.abs(ours.pos_embed[0].double().numpy() - ref).max() <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Sizes and cost


@pytest.mark.parametrize("size,depth,hidden,heads", [("S", 12, 384, 6), ("B", 12, 768, 12), ("L", 24, 1024, 16),
                                                      ("XL", 28, 1152, 16)])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_named_configs(size, depth, hidden, heads, patch):
    for name in (f"DiT-{size}/{patch}", f"dit-{size.lower()}-{patch}", f"{size}/{patch}"):
        cfg = DiTConfig.named(name)
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, patch)
        assert cfg.num_tokens == (32 // patch) ** 2
        assert cfg.out_channels == 8 and cfg.num_classes == 1000
    assert DiTConfig.named(f"DiT-{size}/{patch}", num_classes=10, input_size=8).num_classes == 10


@pytest.mark.parametrize("bad", ["DiT-M/2", "DiT-XL/3", "XL", "", "DiT-XL/16"])
def test_named_config_rejects_unknown(bad):
    with pytest.raises(UserError):
        DiTConfig.named(bad)


def test_flops_xl2_256():
    cfg = DiTConfig.named("DiT-XL/2")
    assert cfg.num_tokens == 256
    assert abs(cfg.flops_per_forward() / 2 - 118.6e9) / 118.6e9 < 0.002
    assert abs(cfg.flops_per_forward() - 237e9) / 237e9 < 0.005
    t, d = 256, 1152
    attn = 28 * 2 * t * t * d
    assert 0.03 < attn / (cfg.flops_per_forward() / 2) < 0.05  # "attention is ~4 % of it"


def test_flops_count_matches_hooked_macs():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=2, num_classes=10)
    model = DiT(cfg).eval()
    macs = [0]

    def count(mod, inp, out):
        rows = inp[0].numel() // inp[0].shape[-1]
        macs[0] += rows * mod.in_features * mod.out_features

    for block in model.blocks:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(count)
    x, t, y = _inputs(1, [5], [1], size=8)
    with torch.no_grad():
        model(x, t, y)
    tokens, d = cfg.num_tokens, cfg.hidden_size
    macs_total = macs[0] + cfg.depth * 2 * tokens * tokens * d  # QK^T and AV
    assert cfg.flops_per_forward() == pytest.approx(2 * macs_total, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Loader errors


def test_load_dit_missing_path(tmp_path):
    p = tmp_path / "nope" / "DiT-XL-2-256x256.pt"
    with pytest.raises(UserError, match="DiT-XL-2-256x256.pt"):
        load_dit(p)


def test_load_dit_non_dit_state_dict(tmp_path):
    vae_like = {
        "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "encoder.conv_in.bias": torch.zeros(8),
        "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
        "quant_conv.weight": torch.zeros(8, 8, 1, 1),
    }
    p = tmp_path / "vae_weights.pt"
    torch.save(vae_like, p)
    with pytest.raises(UserError) as e:
        load_dit(p)
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_load_dit_truncated_file(orig_pair, tmp_path):
    _, sd = orig_pair
    p = tmp_path / "trunc.pt"
    torch.save(sd, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_dit(p)
    assert str(p) in str(e.value)


def test_load_dit_not_a_state_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(UserError) as e:
        load_dit(p)
    assert str(p) in str(e.value)


def test_load_dit_original_with_missing_block_key(orig_pair, tmp_path):
    _, sd = orig_pair
    broken = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    p = tmp_path / "broken.pt"
    torch.save(broken, p)
    with pytest.raises(UserError) as e:
        load_dit(p)
    assert str(p) in str(e.value)


def test_load_dit_dir_wrong_class_or_no_weights(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UserError, match="AutoencoderKL"):
        load_dit(tmp_path / "vae")
    (tmp_path / "tr").mkdir()
    (tmp_path / "tr" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    with pytest.raises(UserError, match="tr"):
        load_dit(tmp_path / "tr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_dit(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# Label dropout


def _small_dit(dropout: float) -> DiT:
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=NUM_CLASSES,
                    class_dropout_prob=dropout)
    return DiT(cfg).init_weights(torch.Generator().manual_seed(0), std=0.05)


def test_explicit_drop_in_train_mode():
    model = _small_dit(0.1)
    x, t, y = _inputs(3, [10, 20, 30], [1, 2, 3], seed=21)
    model.eval()
    with torch.no_grad():
        labelled = model(x, t, y)
        nulled = model(x, t, torch.full_like(y, NULL))
    model.train()
    with torch.no_grad():
        out = model(x, t, y, drop=torch.tensor([True, False, True]))
        kept = model(x, t, y, drop=torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(out[0], nulled[0], atol=1e-6) and torch.allclose(out[2], nulled[2], atol=1e-6)
    assert torch.allclose(out[1], labelled[1], atol=1e-6)
    assert torch.allclose(kept, labelled, atol=1e-6)
    assert (labelled - nulled).abs().max() > 1e-4


def test_dropout_only_in_train_mode():
    model = _small_dit(1.0)
    x, t, y = _inputs(2, [10, 900], [4, 5], seed=22)
    ref = _small_dit(1.0).eval()
    with torch.no_grad():
        labelled = ref(x, t, y)
        nulled = ref(x, t, torch.full_like(y, NULL))
        model.eval()
        assert torch.allclose(model(x, t, y), labelled, atol=1e-6)
        model.train()
        assert torch.allclose(model(x, t, y), nulled, atol=1e-6)


def test_dropout_rate():
    model = _small_dit(0.1).train()
    torch.manual_seed(0)
    y = torch.randint(0, NUM_CLASSES, (20000,))
    with torch.no_grad():
        emb = model.y_embedder(y)
    null_row = model.y_embedder.embedding_table.weight[NULL]
    dropped = (emb == null_row).all(dim=1).float().mean().item()
    assert 0.09 < dropped < 0.11
    model.eval()
    with torch.no_grad():
        assert not (model.y_embedder(y) == null_row).all(dim=1).any()


def test_load_dit_returns_eval_mode_without_dropout(orig_pair, tmp_path):
    _, sd = orig_pair
    torch.save(sd, tmp_path / "c.pt")
    model = load_dit(tmp_path / "c.pt")
    x, t, y = _inputs(2, [10, 20], [1, 2], seed=23)
    with torch.no_grad():
        a = model(x, t, y)
        b = model(x, t, y)
    assert not model.training and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Kernel forms: the CPU forms (models/dit_cpu.py) compute the released maths


def test_sigmoid_gelu_matches_torch_tanh_gelu_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 257, generator=g) * 4).double()  # tails to ±16: σ saturates where tanh does
    assert torch.autograd.gradcheck(dit_cpu.SigmoidGelu.apply, (x[:3, :7].clone().requires_grad_(),))
    up = torch.randn(64, 257, generator=g, dtype=torch.float64)
    gelus = {"tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"), "sigmoid": dit_cpu.sigmoid_gelu}
    xs = {}
    for form, gelu in gelus.items():
        xf = x.float().clone().requires_grad_(True)
        y = gelu(xf)
        y.backward(up.float())
        xs[form] = (y.detach(), xf.grad)
    x64 = x.clone().requires_grad_(True)
    y64 = torch.nn.functional.gelu(x64, approximate="tanh")
    y64.backward(up)
    for form, (y, gx) in xs.items():  # both fp32 forms are within a few ulps of the float64 truth
        assert (y.double() - y64).abs().max() <= 2e-6, form
        assert (gx.double() - x64.grad).abs().max() <= 2e-5, form
    with torch.no_grad():  # the traced/no-grad spelling is the same function
        torch.testing.assert_close(dit_cpu.sigmoid_gelu(x.float()), xs["tanh"][0], rtol=1e-5, atol=2e-6)


def test_cpu_kernels_match_released_forward_and_input_gradient():
    from cao2_fast.models.dit import RELEASED_KERNELS, DiTKernels, fast_kernels, random_dit

    dit = random_dit(DiTConfig(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=NUM_CLASSES), seed=4)
    assert fast_kernels("cpu") == DiTKernels("sigmoid", "math", fused=True)
    assert fast_kernels("cuda") == RELEASED_KERNELS
    x, t, y = _inputs(5, [1, 7, 30, 500, 999], [0, 3, NULL, 9, 1], seed=12)
    conv_calls = []
    dit.x_embedder.proj.register_forward_hook(lambda *a: conv_calls.append(1))
    outs = {}
    for kernels in (RELEASED_KERNELS, DiTKernels("sigmoid", "sdpa"), DiTKernels("tanh", "math"),
                    DiTKernels("tanh", "sdpa", fused=True), fast_kernels("cpu")):
        dit.set_kernels(kernels)
        assert dit.kernels == kernels
        xg = x.clone().requires_grad_(True)
        conv_calls.clear()
        out = dit(xg, t, y)
        assert len(conv_calls) == (0 if kernels.fused else 1), kernels  # fused: the patch embedding is a matmul
        (gx,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), xg)
        outs[kernels] = (out.detach(), gx)
    base_out, base_gx = outs.pop(RELEASED_KERNELS)
    for kernels, (out, gx) in outs.items():
        assert (out - base_out).abs().max() <= 1e-5 * base_out.abs().max(), kernels
        assert (gx - base_gx).abs().max() <= 1e-5 * base_gx.abs().max(), kernels
        assert not torch.equal(out, base_out) or kernels.gelu == "tanh"  # the sigmoid form really ran
    with torch.no_grad():  # the patch matmul takes any strides, as the convolution does
        channels_last = x.contiguous(memory_format=torch.channels_last)
        assert not channels_last.is_contiguous()
        torch.testing.assert_close(dit(channels_last, t, y), outs[fast_kernels("cpu")][0], rtol=0, atol=1e-6)
    dit.set_kernels(RELEASED_KERNELS)
    assert dit.kernels == RELEASED_KERNELS and not dit.x_embedder.as_matmul


def test_released_forms_run_nothing_of_the_cpu_module(monkeypatch):
    """In RELEASED_KERNELS the forward and its gradient are the model of models/dit.py alone: every CPU form fails
    here if called."""
    from cao2_fast.models.dit import RELEASED_KERNELS, random_dit

    dit = random_dit(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES), seed=3)
    assert dit.kernels == RELEASED_KERNELS
    for name in dit_cpu.__all__:
        if name == "ConditioningMemo":
            monkeypatch.setattr(dit_cpu.ConditioningMemo, "modulations", lambda *a: pytest.fail("memo consulted"))
        else:
            monkeypatch.setattr(dit_cpu, name, lambda *a, name=name: pytest.fail(f"{name} called"))
    x, t, y = _inputs(2, [3, 900], [1, NULL], seed=4)
    xg = x.requires_grad_(True)
    (gx,) = torch.autograd.grad(dit(xg, t, y).square().sum(), xg)
    assert gx.abs().max() > 0


def _graph_nodes(out: torch.Tensor) -> list[str]:
    seen, todo, names = set(), [out.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_frozen_blocks_are_one_node_each_with_the_composed_blocks_gradient(monkeypatch):
    """With frozen weights and the CPU forms each block is one autograd node whose written-out backward gives the
    composed block's input gradient; wanting weight gradients, or other forms, keeps the composed block."""
    from cao2_fast.models.dit import DiTKernels, fast_kernels, random_dit

    dit = random_dit(DiTConfig(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=NUM_CLASSES), seed=5)
    dit.set_kernels(fast_kernels("cpu"))
    x, t, y = _inputs(6, [1, 7, 30, 500, 999, 3], [0, 3, NULL, 9, 1, 3], seed=13)
    w = torch.linspace(-1, 1, 6 * 8 * 8 * 8).view(6, 8, 8, 8)

    def run():
        xg = x.clone().requires_grad_(True)
        out = dit(xg, t, y)
        return out.detach(), torch.autograd.grad((out * w).sum(), xg)[0], _graph_nodes(out)

    out, gx, nodes = run()
    assert nodes.count("FrozenBlockBackward") == 3
    with monkeypatch.context() as m:
        m.setattr(dit_cpu, "runs_as_one_node", lambda block, x, mod: False)
        ref_out, ref_gx, ref_nodes = run()
    assert "FrozenBlockBackward" not in ref_nodes and len(ref_nodes) > len(nodes) + 3 * 20
    assert (out - ref_out).abs().max() <= 1e-6 * ref_out.abs().max()
    assert (gx - ref_gx).abs().max() <= 1e-6 * ref_gx.abs().max()
    assert gx.abs().max() > 0

    dit.blocks[1].mlp.fc2.weight.requires_grad_(True)  # a weight gradient is wanted: that block stays composed
    out2, gx2, nodes2 = run()
    assert nodes2.count("FrozenBlockBackward") == 2
    assert (gx2 - ref_gx).abs().max() <= 1e-6 * ref_gx.abs().max()
    dit.requires_grad_(False)
    dit.set_kernels(DiTKernels("tanh", "math", fused=True))  # forms the node does not write out
    assert "FrozenBlockBackward" not in run()[2]


def test_frozen_block_backward_passes_gradcheck():
    from cao2_fast.models.dit import fast_kernels, random_dit

    dit = random_dit(DiTConfig(input_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=NUM_CLASSES), seed=6)
    dit = dit.double().set_kernels(fast_kernels("cpu"))
    block = dit.blocks[0]
    g = torch.Generator().manual_seed(2)
    mod = torch.randn(2, 6 * 16, generator=g, dtype=torch.float64) * 0.5
    x = torch.randn(2, 4, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: dit_cpu.FrozenBlock.apply(v, mod, block), (x,))


def test_conditioning_memo_gathers_what_the_plain_forward_computes(monkeypatch):
    """With the CPU forms the adaLN outputs come from a memo per (timestep, label after dropout): computed once,
    equal to the plain forward's, refilled when a conditioning weight changes, unused when its weights want
    gradients."""
    from cao2_fast.models.dit import fast_kernels, random_dit

    dit = random_dit(DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=NUM_CLASSES), seed=7)
    dit.set_kernels(fast_kernels("cpu"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 4, 8, 8, generator=g)
    t = torch.randint(1, 4, (20,), generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    drop = torch.rand(20, generator=g) < 0.3

    def plain(*args):
        with monkeypatch.context() as m:
            m.setattr(dit_cpu.ConditioningMemo, "modulations", lambda self, dit, t, labels: None)
            return dit(*args)

    def close(a, b):
        return (a - b).abs().max() <= 1e-6 * b.abs().max()

    with torch.no_grad():
        out = dit(x, t, y, drop)
        keys = set(zip(t.tolist(), torch.where(drop, NULL, y).tolist()))
        assert len(dit._memo.rows) == len(keys) < 20
        assert close(out, plain(x, t, y, drop))
        tables = dit._memo.tables
        assert close(dit(x[:5], t[:5], y[:5], drop[:5]), out[:5]) and dit._memo.tables is tables  # all hits
        dit.blocks[1].adaLN_modulation[1].weight.mul_(1.5)  # an in-place change empties the memo
        changed = dit(x, t, y, drop)
        assert not close(changed, out) and close(changed, plain(x, t, y, drop))
        dit.train()  # label dropout drawn inside: the same draws as the plain forward
        torch.manual_seed(11)
        trained = dit(x, t, y)
        torch.manual_seed(11)
        assert close(trained, plain(x, t, y))
        dit.eval()
    with torch.no_grad():  # more keys over several forwards: the tables grow and keep every earlier row
        before = len(dit._memo.rows)
        for lo in (100, 200, 400):
            tt = torch.arange(lo, lo + 20)
            assert close(dit(x, tt, y, drop), plain(x, tt, y, drop))
        now = plain(x, t, y, drop)
        assert len(dit._memo.rows) == before + 60 and close(dit(x, t, y, drop), now)
        copied = copy.deepcopy(dit)  # a copy starts empty and fills its own
        assert not copied._memo.rows and close(copied(x, t, y, drop), now) and copied._memo.rows
        row_bytes = sum(table[0].nbytes for table in dit._memo.tables)
        monkeypatch.setattr(dit_cpu.ConditioningMemo, "MAX_BYTES", (len(keys) - 1) * row_bytes)
        copied._memo.rows.clear()
        assert close(copied(x, t, y, drop), now)  # more distinct keys than the cap holds: computed without it
        assert not copied._memo.rows
    dit.t_embedder.requires_grad_(True)  # conditioning gradients wanted: the plain path, with its gradient
    dit._memo.rows.clear()
    out = dit(x, t, y, drop)
    assert not dit._memo.rows
    (gw,) = torch.autograd.grad(out.square().sum(), dit.t_embedder.mlp[0].weight)
    assert gw.abs().max() > 0


def test_set_kernels_rejects_unknown_forms():
    from cao2_fast.models.dit import DiTKernels

    with pytest.raises(ValueError, match="GELU form"):
        DiTKernels("erf", "sdpa")
    with pytest.raises(ValueError, match="attention"):
        DiTKernels("tanh", "flash")
