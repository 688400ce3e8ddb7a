"""An engine built in one process, loaded by path in another without the PyTorch model, equals eager."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cao2_fast.engines import EngineCache, build_engine, load, stage1_specs
from cao2_fast.errors import UserError
from cao2_fast.models.dit import DiTConfig
from cao2_fast.models.random import random_models
from cao2_fast.generators.dit import DiTGenerator


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    dit, vae, clf = random_models(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    specs = stage1_specs(DiTGenerator(dit, vae), clf)
    engines = {m: build_engine("onnx", s, "cpu", cache=EngineCache(root)) for m, s in specs.items()}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t, y = torch.tensor([1.0, 250.0, 999.0]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        want = {"dit": dit(x, t, y), "vae_decode": vae.decode(x)}
        want["classifier"] = clf(want["vae_decode"].clamp(-1, 1))
    torch.save({"x": x, "t": t, "y": y, "want": want}, root / "io.pt")
    return root, engines


def test_loaded_by_path_in_a_fresh_process_equals_eager(built):
    root, engines = built
    script = textwrap.dedent(f"""
        import json, sys, torch
        from cao2_fast.engines import load
        io = torch.load({str(root / 'io.pt')!r})
        d = load({str(engines['dit'].artefact.parent)!r})
        v = load({str(engines['vae_decode'].artefact)!r})        # the .onnx file itself
        c = load({str(engines['classifier'].artefact.parent)!r})
        imgs = io["want"]["vae_decode"].clamp(-1, 1)
        imgs = torch.nn.functional.interpolate(imgs, size=(32, 32), mode="bilinear", align_corners=False)  # contract:
        # the classifier engine takes images at its own size; the (antialiased when shrinking) resize is the caller's
        out = {{"dit": float((d(io["x"], io["t"], io["y"]) - io["want"]["dit"]).abs().max()),
               "vae": float((v(io["x"]) - io["want"]["vae_decode"]).abs().max()),
               "clf": float((c(imgs) - io["want"]["classifier"]).abs().max()),
               "torch_model_loaded": "cao2_fast.models.dit" in sys.modules,
               "contract": d.contract.to_json()}}
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dit"] <= 1e-4 and out["vae"] <= 1e-3 and out["clf"] <= 1e-3
    assert out["torch_model_loaded"] is False  # no PyTorch model was built or loaded
    c = out["contract"]
    assert [i["name"] for i in c["inputs"]] == ["x", "t", "y"]
    assert c["inputs"][0]["shape"] == ["N", 4, 8, 8] and c["inputs"][2]["dtype"] == "int64"
    assert "5 is the null class" in c["inputs"][2]["meaning"] and "training schedule" in c["inputs"][1]["meaning"]
    assert c["outputs"][0]["meaning"].startswith("8 channels: the predicted noise eps in the first 4")
    assert c["built_from"]["weights"] == json.loads((built[1]["dit"].artefact.parent / "meta.json").read_text()
                                                    )["fields"]["weights"]


X = torch.zeros(2, 4, 8, 8)


@pytest.mark.parametrize("call,message", [
    (lambda d: d(torch.zeros(2, 4, 8)), "takes 3 inputs"),
    (lambda d: d(torch.zeros(2, 4, 6, 6), torch.zeros(2), torch.zeros(2, dtype=torch.long)), "expected (N, 4, 8, 8)"),
    (lambda d: d(X, torch.zeros(2), torch.zeros(2)), "y must be an integer tensor"),
    (lambda d: d(X, torch.zeros(2), torch.tensor([0, 6])), "class ids must lie in 0..5"),
    (lambda d: d(X, torch.tensor([0.0, 1000.0]), torch.tensor([0, 1])), "in [0, 1000)"),
    (lambda d: d(X, torch.tensor([0.0, float("nan")]), 1), "finite"),
    (lambda d: d(X, np.zeros(2), 1), "t must be a torch tensor or a Python number (got numpy.ndarray)"),
    (lambda d: d(X.numpy(), 1, 1), "x must be a torch tensor (got numpy.ndarray)"),
    (lambda d: d(X, [3, 4], 1), "t must be a torch tensor or a Python number (got list)"),
    (lambda d: d(torch.zeros(0, 4, 8, 8), 1, 1), "the batch is empty"),
    (lambda d: d(X, torch.zeros(3), 1), "x and t must share the batch size, got x 2, t 3"),
    (lambda d: d(X, 1, 1, timestep=1), "t is given twice (as argument 2 and as timestep=)"),
    (lambda d: d(X, 1, label=1), "no input called 'label'; it takes x (or hidden_states), t (or timestep), y"),
    (lambda d: d(X, 1), "got 2; missing y"),
    (lambda d: d(X.long(), 1, 1), "x must be a floating-point tensor"),
])
def test_a_wrong_call_is_one_line(built, call, message, capfd):
    d = load(built[1]["dit"].artefact.parent)
    capfd.readouterr()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as e:
        call(d)
    assert "\n" not in str(e.value) and capfd.readouterr().err == ""  # ONNX Runtime never saw it, nor printed


def test_a_loaded_dit_is_called_like_a_dit(built):
    io = torch.load(built[0] / "io.pt")
    x, t, y, want = io["x"], io["t"], io["y"], io["want"]["dit"]
    d = load(built[1]["dit"].artefact.parent)
    for out in (d(x, t, y), d(x, t.long(), y.int()), d(x, t.int(), y=y), d(x, y=y, t=t),
                d(hidden_states=x, timestep=t, class_labels=y)):  # diffusers' names
        assert out.dtype == torch.float32 and float((out - want).abs().max()) <= 1e-4
    one = d(x, torch.full((3,), 250.0), torch.full((3,), 4))
    assert torch.equal(d(x, 250, 4), one) and torch.equal(d(x, torch.tensor(250), torch.tensor(4, dtype=torch.int32)),
    one)
    for dtype in (torch.float16, torch.bfloat16):  # the output comes back in x's dtype
        out = d(x.to(dtype), t, y)
        assert out.dtype == dtype and float((out.float() - want).abs().max()) <= 0.1
    c = d.contract.to_json()
    assert c["outputs"][0]["dtype"] == "same as x" and c["outputs"][0]["shape"] == ["N", 8, 8, 8]
    x_, t_, y_ = c["inputs"]
    assert x_["aliases"] == ["hidden_states"] and {"float16", "bfloat16"} <= set(x_["accepts"]) and not x_["broadcast"]
    assert t_["broadcast"] and {"int64", "int32", "float32"} <= set(t_["accepts"]) and y_["accepts"] == ["int64",
    "int32"]


def test_vae_and_classifier_take_their_inputs_by_name(built):
    x = torch.load(built[0] / "io.pt")["x"]
    v, c = load(built[1]["vae_decode"].artefact.parent), load(built[1]["classifier"].artefact.parent)
    images = v(x)
    assert torch.equal(v(latents=x), images) and torch.equal(v(z=x), images) and v(x.half()).dtype == torch.float16
    with pytest.raises(UserError, match="no input called 'sample'; it takes latents \\(or z\\)"):
        v(sample=x)
    size = c.contract.inputs[0].shape[2:]
    small = torch.nn.functional.interpolate(images.clamp(-1, 1), size=size, mode="bilinear", align_corners=False)
    assert torch.equal(c(images=small), c(small))


def _contract_json(engine) -> dict:
    return {k: v for k, v in engine.contract.to_json().items() if k != "path"}


def _copy_bare(entry, folder, name="dit.onnx"):
    """The entry's ONNX file copied out on its own, with the weights file it references beside it."""
    folder.mkdir()
    shutil.copy(entry / "model.onnx", folder / name)
    shutil.copy(entry / "model.onnx.data", folder / "model.onnx.data")
    return folder / name


def test_the_exported_onnx_file_keeps_the_guards_in_its_entry_and_copied_out(built, tmp_path):
    import onnx

    io = torch.load(built[0] / "io.pt")
    entry = built[1]["dit"].artefact.parent
    by_folder, by_file = load(entry), load(entry / "model.onnx")
    bare = load(_copy_bare(entry, tmp_path / "elsewhere"))
    assert _contract_json(by_file) == _contract_json(by_folder) == _contract_json(bare)
    assert bare.contract.built_from["signature"]["config"]["num_classes"] == 5
    props = {p.key: p.value for p in onnx.load(str(bare.artefact), load_external_data=False).metadata_props}
    weights = json.loads((entry / "meta.json").read_text())["fields"]["weights"]
    assert json.loads(props["cao2_fast.identity"])["weights"] == weights
    for d in (by_file, bare):
        assert torch.equal(d(io["x"], io["t"], io["y"]), by_folder(io["x"], io["t"], io["y"]))
        with pytest.raises(UserError, match="class ids must lie in 0..5 \\(5 is the null class\\)"):
            d(io["x"], 1, 6)


def _scale_weights(data_file, n=5000, factor=3.0):
    raw = bytearray(data_file.read_bytes())
    w = np.frombuffer(raw, dtype=np.float32, count=n)
    w *= factor
    data_file.write_bytes(bytes(raw))


def test_changed_weights_are_refused_naming_the_file(built, tmp_path):
    entry = built[1]["dit"].artefact.parent
    copy = tmp_path / entry.name
    shutil.copytree(entry, copy)
    bare = _copy_bare(entry, tmp_path / "bare")
    load(copy)  # an untouched copy loads
    for data in (copy / "model.onnx.data", bare.parent / "model.onnx.data"):
        _scale_weights(data)
    for target in (copy, copy / "model.onnx"):
        with pytest.raises(UserError) as e:
            load(target)
        msg = str(e.value)
        assert msg.startswith(f"engine file {copy / 'model.onnx.data'} does not match the checksum recorded when it "
                              "was built; rebuild the entry") and "cao2-fast export --engine onnx" in msg
        assert "\n" not in msg
    with pytest.raises(UserError, match="model.onnx.data does not match the checksum recorded when dit.onnx was "
                                        "exported"):
        load(bare)
    meta = json.loads((copy / "meta.json").read_text())
    meta["fields"]["signature"]["config"]["num_classes"] = 50  # a wider class range written into the metadata
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json does not match the key it was built under"):
        load(copy)


@pytest.mark.parametrize("files", [[], {}], ids=["list", "dict"])
def test_an_entry_that_lists_no_files_is_refused_and_listed_as_broken(built, tmp_path, capsys, files):
    from helpers import run_cli

    entry = built[1]["classifier"].artefact.parent
    root = tmp_path / "cache"
    shutil.copytree(entry, root / entry.name)
    meta = json.loads((root / entry.name / "meta.json").read_text())
    meta["files"] = files
    (root / entry.name / "meta.json").write_text(json.dumps(meta))
    for target in (root / entry.name, root / entry.name / "model.onnx"):
        with pytest.raises(UserError, match="meta.json lists no files, so nothing in it can be verified"):
            load(target)
    code, out, err = run_cli(["info", "--engine-dir", str(root)], capsys)
    assert code == 0 and "broken: meta.json lists no files" in out, err
    code, out, err = run_cli(["info", "--json", "--engine-dir", str(root)], capsys)
    row = json.loads(out)["engines"]["entries"][0]
    assert code == 0 and row["state"] == "broken: meta.json lists no files" and row["contract"] is None
    assert "lists no files" in row["problem"]


def _emptied(f):
    f.write_bytes(b"")


def _truncated(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(f):
    f.write_bytes(b"not an onnx model" * 100)


@pytest.mark.parametrize("where", ["bare", "entry"])
@pytest.mark.parametrize("damage", [_emptied, _truncated, _garbage], ids=["empty", "truncated", "corrupt"])
def test_an_unreadable_onnx_file_is_one_line(built, tmp_path, capfd, damage, where):
    from cao2_fast.engines.cache import file_sha256

    entry = built[1]["dit"].artefact.parent
    if where == "bare":
        target = _copy_bare(entry, tmp_path / "bare")
        damage(target)
    else:  # sizes and checksums recorded as if the file were the export: only reading it can tell
        shutil.copytree(entry, tmp_path / entry.name)
        target = tmp_path / entry.name / "model.onnx"
        damage(target)
        meta = json.loads((target.parent / "meta.json").read_text())
        meta["files"]["model.onnx"] = {"bytes": target.stat().st_size, "sha256": file_sha256(target)}
        (target.parent / "meta.json").write_text(json.dumps(meta))
    capfd.readouterr()
    with pytest.raises(UserError) as e:
        load(target if where == "bare" else target.parent)
    msg = str(e.value)
    assert msg.startswith(str(target)) and "\n" not in msg and capfd.readouterr().err == ""
    assert ("is empty" if damage is _emptied else "not a readable ONNX model") in msg


def test_a_path_that_is_not_an_engine_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such engine"):
        load(tmp_path / "nope.onnx")
    (tmp_path / "entry").mkdir()
    with pytest.raises(UserError, match="not a complete engine-cache entry"):
        load(tmp_path / "entry")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not an engine"):
        load(tmp_path / "w.bin")


def test_info_json_lists_each_engine_with_its_contract(built, capsys):
    from helpers import run_cli

    code, stdout, _ = run_cli(["info", "--json", "--engine-dir", str(built[0])], capsys)
    assert code == 0
    listed = json.loads(stdout)["engines"]["entries"]
    dit = next(e for e in listed if e["model"] == "dit")
    assert dit["backend"] == "onnx" and dit["precision"] == "float32" and dit["path"].endswith(".onnx")
    assert [i["name"] for i in dit["contract"]["inputs"]] == ["x", "t", "y"]
    assert dit["built_from"]["signature"]["config"]["num_classes"] == 5
