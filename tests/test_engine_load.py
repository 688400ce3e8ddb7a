"""An engine built in one process, loaded by path in another without the PyTorch model, equals eager."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from cao2_fast.engines import EngineCache, build_engine, load, stage1_specs
from cao2_fast.errors import UserError
from cao2_fast.models.dit import DiTConfig
from cao2_fast.models.random import random_models


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    dit, vae, clf = random_models(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    specs = stage1_specs(dit, vae, clf)
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


@pytest.mark.parametrize("call,message", [
    (lambda d: d(torch.zeros(2, 4, 8)), "takes 3 inputs"),
    (lambda d: d(torch.zeros(2, 4, 6, 6), torch.zeros(2), torch.zeros(2, dtype=torch.long)), "expected (N, 4, 8, 8)"),
    (lambda d: d(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2)), "y must be an integer tensor"),
    (lambda d: d(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.tensor([0, 6])), "class ids must lie in 0..5"),
    (lambda d: d(torch.zeros(2, 4, 8, 8), torch.tensor([0.0, 1000.0]), torch.tensor([0, 1])), "in [0, 1000)"),
])
def test_a_wrong_call_is_one_line(built, call, message):
    d = load(built[1]["dit"].artefact.parent)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(d)


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
