"""Bad input found by a hostile run: each case is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from test_cli import ckpts, real_args  # noqa: F401  (the tiny real-checkpoint fixture)

from helpers import run_cli

from cao2_fast.cli.distill import parse_classes
from cao2_fast.errors import UserError


def one_line_exit_2(code, err, message):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("text,message", [
    ("5-2,1", "the range runs backwards"),
    ("1_0", "expected comma-separated class ids"),
    ("\u0661\u0662", "expected comma-separated class ids"),  # Arabic-Indic digits: int() would take them
    ("\uff11", "expected comma-separated class ids"),  # a full-width 1
    ("0-1000000000", "more than 100000 class ids"),
    ("3,,4, ", None),
])
def test_class_lists_are_ascii_ids_and_ranges_that_run_forwards(text, message):
    if message is None:
        assert parse_classes(text) == [3, 4]
        return
    with pytest.raises(UserError, match=message):
        parse_classes(text)


def test_a_binary_class_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "ids.bin"
    f.write_bytes(bytes(range(256)))
    code, _, err = run_cli(["distill", "--classes", f"@{f}", "--out", str(tmp_path / "o")], capsys)
    one_line_exit_2(code, err, "not a text file")
    assert not (tmp_path / "o").exists()


def test_a_class_beyond_the_digits_preset_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["distill", "--classes", "10", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    one_line_exit_2(code, err, "class id 10 is not in the digits preset (valid: 0..9)")
    assert not (tmp_path / "o").exists()


def test_a_dit_checkpoint_with_a_wrong_tensor_shape_is_one_line(ckpts, tmp_path, capsys):  # noqa: F811
    sd = torch.load(ckpts / "dit.pt")["ema"]
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:-1]
    torch.save(sd, tmp_path / "bad.pt")
    args = real_args(ckpts, tmp_path / "o", "--classes", "1")
    args[args.index("--dit") + 1] = str(tmp_path / "bad.pt")
    code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, "bad.pt: DiT weights do not fit: final_layer.linear.weight")
    assert not (tmp_path / "o").exists()


def test_a_classifier_checkpoint_with_a_wrong_tensor_shape_is_one_line(ckpts, tmp_path, capsys):  # noqa: F811
    sd = torch.load(ckpts / "clf.pth")["state_dict"]
    key = next(k for k in sd if k.endswith("conv1.weight"))
    sd[key] = torch.zeros(1, 1, 1, 1)
    torch.save(sd, tmp_path / "clf.pth")
    args = real_args(ckpts, tmp_path / "o", "--classes", "1")
    args[args.index("--classifier") + 1] = f"test_resnet:{tmp_path / 'clf.pth'}"
    code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, f"weights do not fit: {key.removeprefix('module.')} (1, 1, 1, 1) vs")


@pytest.mark.parametrize("kind", ["legacy-numpy", "raw-pickle"])
def test_a_checkpoint_that_needs_pickled_code_is_one_whole_line(ckpts, tmp_path, capsys, kind):  # noqa: F811
    f = tmp_path / "legacy.pt"
    if kind == "legacy-numpy":
        torch.save({"w": np.zeros(3)}, f, _use_new_zipfile_serialization=False)
        expect = "loading it needs the global numpy."
    else:
        f.write_bytes(pickle.dumps({"w": np.zeros(3)}, protocol=4))
        expect = "not a plain tensor checkpoint"
    args = real_args(ckpts, tmp_path / "o", "--classes", "1")
    args[args.index("--dit") + 1] = str(f)
    code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, expect)
    assert err.strip().endswith("(or .safetensors)")  # the line is whole, not cut mid-word


def test_an_engine_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(["distill", "--classes", "0", "--ipc", "1", "--engine", "onnx", "--engine-dir",
                            str(tmp_path / "afile"), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    one_line_exit_2(code, err, "engine cache folder is a file, not a folder")
    assert not (tmp_path / "o").exists()


def test_an_unwritable_engine_dir_is_one_line(tmp_path, monkeypatch):
    import tempfile

    from cao2_fast.engines.cache import EngineCache

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # root ignores mode bits, and chattr +i needs a real fs
    cache = EngineCache(tmp_path / "engines")
    with pytest.raises(UserError, match="engine cache folder is not writable \\(Permission denied\\)"):
        cache.get_or_build("onnx", "dit", {"a": 1}, build=lambda p: None, load=lambda e: e)


def test_a_decompression_bomb_in_eval_is_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image

    (tmp_path / "d" / "0").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "d" / "0" / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit: PIL raises, as for a bomb
    code, _, err = run_cli(["eval", "--distilled", str(tmp_path / "d"), "--dataset", "digits"], capsys)
    one_line_exit_2(code, err, "could be decompression bomb")
