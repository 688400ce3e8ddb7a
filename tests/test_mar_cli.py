"""``cao2-fast distill`` on a MAR checkpoint: one small run (a random MAR with the digits VAE and classifier) read by
many assertions — the folder, the manifest's MAR settings, resume, the plan — and the MAR options' bad input."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from cao2_fast.models.mar import MARConfig, random_mar, save_mar
from cao2_fast.pipeline import preset_dir

pytestmark = pytest.mark.usefixtures("single_thread")

DIGITS = preset_dir("digits")
TINY = MARConfig(img_size=16, vae_stride=2, vae_embed_dim=4, buffer_size=4, encoder_embed_dim=32, encoder_depth=1,
                 encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=10,
                 diffloss_d=1, diffloss_w=32, num_sampling_steps="10")


@pytest.fixture(scope="module")
def mar_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mar") / "mar.safetensors"
    save_mar(random_mar(TINY, seed=1), path)
    return path


def args(mar_file, *extra):
    return ["distill", "--mar", str(mar_file), "--vae", str(DIGITS / "vae"), "--classifier",
            f"test_resnet:{DIGITS / 'classifier.safetensors'}", "--classes", "2-5", "--ipc", "1", "--sample-steps", "4",
            "--token-steps", "5", "--stage2-steps", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def run(mar_file, tmp_path_factory):
    """One distilled folder, made through the CLI, and the output of a second identical command."""
    out = tmp_path_factory.mktemp("run") / "set"
    from cao2_fast.cli.main import main  # a module fixture has no capsys: the runs print where they print

    codes = []
    for _ in range(2):
        with pytest.raises(SystemExit) as exc:
            main(args(mar_file, "--out", str(out), "--json"))
            raise SystemExit(0)
        codes.append(exc.value.code)
    return out, codes


def test_the_run_writes_a_complete_set_with_every_mar_setting_recorded(run):
    out, codes = run
    assert codes == [0, 0]
    m = json.loads((out / "manifest.json").read_text())
    cfg = m["config"]
    assert cfg["family"] == "mar"
    assert (cfg["sample_steps"], cfg["token_steps"], cfg["temperature"], cfg["guidance_scale"],
            cfg["guidance_schedule"], cfg["selection"], cfg["k"]) == (4, 5, 1.0, 2.9, "linear", "stability", 2)
    assert {k: v for k, v in cfg["recipe"].items() if k.startswith("mar_")} == {
        "mar_stage2_cond": "zero", "mar_target_grad": "detached", "mar_mask_rule": "max", "mar_select": "stability",
        "mar_teacher_io": "jpeg", "mar_stage2_vb": True, "mar_autocast": True}
    assert set(cfg["models"]) >= {"mar", "vae", "classifier"}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0002", "0003", "0004", "0005"]
    images = [r for c in m["classes"] for r in c["images"]]
    assert len(images) == 4 and all(-1.0 <= r["stage1_score"] <= 1.0 for r in images)
    assert all(r["stage2_steps"] == 2 and r["stage2_status"] == "ok" for r in images)
    assert (out / "contact_sheet.png").is_file()


def test_the_same_command_again_finds_the_set_complete(run, mar_file, capsys, tmp_path):
    out, _ = run
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    code, stdout, err = run_cli(args(mar_file, "--out", str(out)), capsys)
    assert code == 0 and "already complete" in stdout
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before
    # another MAR setting is another set: refused without --overwrite, nothing touched
    code, _, err = run_cli(args(mar_file, "--out", str(out), "--temperature", "0.9"), capsys)
    assert code == 2 and err.count("\n") == 1 and "different config" in err
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before


def test_dry_run_plans_mar_flops(mar_file, capsys):
    from cao2_fast.generators.mar import MARGenerator, revealed_counts
    from cao2_fast.models.mar import load_mar
    from cao2_fast.models.vae import load_vae

    code, stdout, _ = run_cli(args(mar_file, "--dry-run"), capsys)
    assert code == 0
    plan = json.loads(stdout)
    assert plan["generator"] == "mar" and plan["out"].endswith("custom-mar-ipc1")
    gen = MARGenerator(load_mar(mar_file), load_vae(DIGITS / "vae"))
    c = TINY
    per_candidate = 0.0
    visible = 0
    for n in revealed_counts(4, c.seq_len):  # the cost model, restated: guided MAE passes and DiffLoss steps
        per_candidate += 2 * (c.encoder_flops(c.buffer_size + visible) + c.decoder_flops())
        per_candidate += 2 * n * 5 * c.diffloss_flops_per_row_step()
        visible += n
    assert gen.stage1_flops(type("C", (), {"sample_steps": 4, "token_steps": 5, "guidance_scale": 2.9,
                                           "num_candidates": 2})()) == pytest.approx(2 * per_candidate)
    assert plan["tflop_stage1"] == pytest.approx(round(4 * 2 * per_candidate / 1e12, 3))


@pytest.mark.parametrize("extra, message", [
    (["--dit", "x"], "--dit and --mar exclude each other"),
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--early-reject", "2", "--early-keep", "1"], "apply to the DiT sampler only"),
    (["--sample-steps", "65"], "at most 64 iterations"),
    (["--engine", "trt", "--device", "cpu"], "--engine trt needs"),
    (["--backbone", "dit"], "--backbone dit with a --mar checkpoint"),
])
def test_bad_mar_input_is_one_line_and_exit_2(mar_file, capsys, tmp_path, extra, message):
    code, _, err = run_cli(args(mar_file, "--out", str(tmp_path / "o"), *extra), capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_a_missing_mar_checkpoint_or_vae_is_one_line(mar_file, capsys, tmp_path):
    code, _, err = run_cli(["distill", "--mar", str(tmp_path / "none"), "--vae", str(DIGITS / "vae"),
                            "--classifier", "random:test_resnet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "none" in err
    code, _, err = run_cli(["distill", "--mar", str(mar_file), "--classifier", "random:test_resnet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "needs its VAE" in err
