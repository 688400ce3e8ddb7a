"""Engines: parity of compile and onnx with eager on odd batches, the engine cache (hits, misses, broken entries
rebuilt), the file the TensorRT builder reads, the CLI (export, info, engine errors) and whole runs that must select
the same candidates on ONNX Runtime as on eager PyTorch.

ONNX exports take seconds each, so the tiny models are exported once per module into one cache folder; tests that
must rebuild use the smallest export (the classifier).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import time

import pytest
import torch

from helpers import run_cli
from cao2_fast.config import build_config
from cao2_fast.engines import (BACKENDS, EngineCache, EngineSettings, build_engine, get_backend, onnx_ort, require,
                               stage1_engines, stage1_specs, stage2_engine, trt)
from cao2_fast.engines.onnx_ort import onnx_fields
from cao2_fast.engines.specs import ModelSpec, TensorSpec, classifier_spec
from cao2_fast.generators.dit import dit_spec
from cao2_fast.errors import UserError
from cao2_fast.models.dit import DiTConfig, save_dit
from cao2_fast.models.random import random_models
from cao2_fast.pipeline import Distiller, preset_dir
from cao2_fast.generators.dit import DiTGenerator

CFG = DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
CLF_INPUT = 224  # what Distiller.from_paths gives the classifier, so checkpoints of these models share entries
BATCHES = [1, 3, 17]
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def models():
    return random_models(CFG, classifier_input_size=CLF_INPUT)


@pytest.fixture(scope="module")
def specs(models):
    return stage1_specs(DiTGenerator(*models[:2]), models[2])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return EngineCache(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def onnx_engines(specs, cache):
    return {name: build_engine("onnx", spec, "cpu", cache=cache) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def compile_engines(specs):
    return {name: build_engine("compile", spec, "cpu") for name, spec in specs.items()}


@pytest.fixture
def exports(monkeypatch):
    """The models exported to ONNX during the test, in order."""
    calls = []
    real = onnx_ort.export_onnx

    def spy(spec, folder, opset=None):
        calls.append(spec.name)
        return real(spec, folder, opset)

    monkeypatch.setattr(onnx_ort, "export_onnx", spy)
    return calls


class Tiny(torch.nn.Module):
    """The cache does not care what it stores: a two-layer model exports in a fraction of the DiT's time."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 12), torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def tiny_spec(seed: int = 0) -> ModelSpec:
    torch.manual_seed(seed)
    return ModelSpec("tiny", Tiny().eval(), (TensorSpec("x", (6,)),), "out")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A spec, its own cache and its engine built there."""
    spec, cache = tiny_spec(), EngineCache(tmp_path_factory.mktemp("tiny-engines"))
    return spec, cache, build_engine("onnx", spec, "cpu", cache=cache)


def dit_inputs(n: int, seed: int):
    """Latents, int64 timesteps (as the sampler passes them) and labels including the null class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CFG.in_channels, CFG.input_size, CFG.input_size, generator=g)
    return x, torch.randint(0, 1000, (n,), generator=g), torch.randint(0, CFG.num_classes + 1, (n,), generator=g)


def assert_matches_eager(engines: dict, models, n: int, dit_only: bool = False) -> None:
    dit, vae, clf = models
    x, t, y = dit_inputs(n, seed=n)
    with torch.no_grad():
        want = dit(x, t, y)
        got = engines["dit"](x, t, y)
        assert got.shape == want.shape == (n, CFG.out_channels, CFG.input_size, CFG.input_size)
        assert got.dtype == want.dtype
        assert float((got - want).abs().max()) <= 1e-4
        if dit_only:
            return
        images = vae.decode(x)
        decoded = engines["vae_decode"](x)
        assert decoded.shape == images.shape and float((decoded - images).abs().max()) <= 1e-3
        logits = clf(images)
        scored = engines["classifier"](images)
        assert scored.shape == (n, CFG.num_classes)
        assert torch.equal(scored.argmax(1), logits.argmax(1))


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- registry --------------------------------------------------------------------------------------------------------


def test_registry_picks_by_name_and_lists_the_valid_names():
    assert get_backend("onnx") is BACKENDS["onnx"]
    with pytest.raises(UserError, match="tensorrt'.*eager, compile, onnx, trt"):
        get_backend("tensorrt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        BACKENDS["eager"].supports_gradients = False
    assert {n for n, b in BACKENDS.items() if b.supports_gradients} == {"eager", "compile"}
    assert BACKENDS["trt"].devices == ("cuda",)


def test_a_missing_backend_asked_for_fails_loudly(monkeypatch):
    with pytest.raises(UserError, match="--engine onnx runs float32, not bfloat16"):
        require("onnx", "cpu", "bfloat16")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UserError, match="--engine onnx needs the onnxruntime package"):
        require("onnx", "cpu")


def test_stage2_refuses_engines_without_backward(models):
    for name in ("onnx", "trt"):
        with pytest.raises(UserError, match=f"--stage2-engine {name}: .* no backward pass"):
            stage2_engine(name, models[0], "cpu")


def test_stage2_eager_engine_differentiates_like_the_model(models):
    dit = models[0]
    x, t, y = dit_inputs(3, seed=5)
    engine = stage2_engine(None, dit, "cpu")
    assert engine.backend.name == "eager"  # the CPU default
    grads = []
    for fn in (engine, dit):
        xt = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xt, t, y, None)[:, :4].square().sum(), xt)
        grads.append(g)
    assert torch.equal(grads[0], grads[1]) and float(grads[0].abs().max()) > 0


# -- parity ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", BATCHES)
def test_onnx_matches_eager(onnx_engines, models, n):
    assert all(e.details["providers"] == ["CPUExecutionProvider"] for e in onnx_engines.values())
    assert_matches_eager(onnx_engines, models, n)


@pytest.mark.parametrize("n", BATCHES)
def test_compile_matches_eager(compile_engines, models, n):
    """The DiT (compiled for stage 1 and stage 2) at every batch size; the VAE and the classifier at batch 3 only:
    Inductor compiles again for batch 1 and again above 15, and on two CPU cores each compile of those two models
    costs tens of seconds."""
    assert_matches_eager(compile_engines, models, n, dit_only=n != 3)
    assert all(e.details["compile_mode"] == "default" for e in compile_engines.values())
    dit = compile_engines["dit"]  # the first call compiled: it is timed apart and dwarfs a steady call
    x, t, y = dit_inputs(n, seed=n)
    with torch.no_grad():
        t0 = time.perf_counter()
        dit(x, t, y)
        steady = time.perf_counter() - t0
    assert dit.first_call_seconds > 10 * steady


def test_onnx_export_records_the_dynamo_exporter(onnx_engines):
    for e in onnx_engines.values():
        meta = json.loads((e.artefact.parent / "meta.json").read_text())
        assert meta["exporter"] == "dynamo" and meta["fields"]["precision"] == "float32"
        assert meta["check_max_abs_diff"] <= 1e-4
        assert meta["fields"]["versions"]["torch"] == torch.__version__


def test_a_dit_in_cpu_kernels_exports_the_released_graph(models, onnx_engines, tmp_path):
    """The file does not depend on the machine that exported it (its cache key does not say which): a DiT running
    the CPU's quicker forms (sigmoid GELU, written-out attention, fused patch embedding) exports the released graph,
    and keeps its own forms."""
    import onnx

    from cao2_fast.models.dit import fast_kernels

    dit = copy.deepcopy(models[0]).set_kernels(fast_kernels("cpu"))
    onnx_ort.export_onnx(dit_spec(dit), tmp_path)
    assert dit.kernels == fast_kernels("cpu")
    # the key names the forms the file holds (an entry exported with a CPU's forms, keyed without them, misses)
    assert dit_spec(dit).identity() == dit_spec(models[0]).identity()
    assert dit_spec(dit).signature["forms"] == {"gelu": "tanh", "attention": "sdpa", "fused": False}

    def op_counts(path):
        graph = onnx.load(str(path), load_external_data=False).graph
        return sorted((op, sum(n.op_type == op for n in graph.node)) for op in {n.op_type for n in graph.node})

    released = op_counts(onnx_engines["dit"].artefact)
    assert op_counts(tmp_path / onnx_ort.MODEL_FILE) == released
    assert {"Gelu", "Conv"} <= {op for op, _ in released}  # the CPU forms have neither: they export differently


def test_torchscript_exporter_only_when_dynamo_fails(specs, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo exporter unavailable")

    monkeypatch.setattr(onnx_ort, "_export_dynamo", broken)
    with caplog.at_level(logging.WARNING, logger="cao2_fast.engines"):
        engine = build_engine("onnx", specs["classifier"], "cpu", cache=EngineCache(tmp_path))
    meta = json.loads((engine.artefact.parent / "meta.json").read_text())
    assert meta["exporter"] == "torchscript" and "dynamo exporter unavailable" in meta["dynamo_error"]
    assert engine.details["exporter"] == "torchscript"
    assert [r.getMessage() for r in caplog.records if "TorchScript" in r.getMessage()]
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        spec = specs["classifier"]
        assert torch.equal(engine(images).argmax(1), spec.module(spec.prepare(images)).argmax(1))


def test_a_failed_export_leaves_no_entry(specs, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter broken")

    monkeypatch.setattr(onnx_ort, "_export_dynamo", broken)
    monkeypatch.setattr(onnx_ort, "_export_torchscript", broken)
    with pytest.raises(UserError, match="failed with both exporters .*--engine eager or compile"):
        build_engine("onnx", specs["classifier"], "cpu", cache=EngineCache(tmp_path))
    assert list(tmp_path.iterdir()) == []


# -- cache -----------------------------------------------------------------------------------------------------------


def test_second_build_hits_the_cache_without_exporting(models, cache, onnx_engines, exports):
    assert all(e.cache_hit is False and e.build_seconds > 0 for e in onnx_engines.values())
    fresh = stage1_specs(DiTGenerator(*models[:2]), models[2])  # new specs: the weights digest is computed again
    again = {name: build_engine("onnx", spec, "cpu", cache=cache) for name, spec in fresh.items()}
    assert exports == []
    for name, e in again.items():
        assert e.cache_hit is True and e.build_seconds == 0 and e.artefact == onnx_engines[name].artefact


def test_changed_weights_shapes_or_settings_miss_the_cache(models, specs, cache, onnx_engines, exports):
    dit, _, clf = models
    settings = EngineSettings()

    def state(spec, s=settings):
        return cache.lookup("onnx", spec.name, onnx_fields(spec, s))[1]

    assert all(state(spec) is None for spec in specs.values())
    other = copy.deepcopy(dit)
    with torch.no_grad():
        other.blocks[1].mlp.fc2.bias[0] += 1e-3
    assert state(dit_spec(other)) == "absent"
    assert state(classifier_spec(clf, (3, 24, 24))) is None  # resized in torch first: the graph is the same
    clf_larger = copy.deepcopy(clf)
    clf_larger.input_size += 8
    assert state(classifier_spec(clf_larger, (3, 16, 16))) == "absent"
    assert state(specs["dit"], EngineSettings(opset=18)) == "absent"
    clf_normalised = copy.deepcopy(clf)
    clf_normalised.normalize = True
    assert state(classifier_spec(clf_normalised, (3, 16, 16))) == "absent"



def test_changed_weights_are_exported_again_never_served_stale(tiny, exports):
    spec, cache, engine = tiny
    changed = tiny_spec(seed=1)
    rebuilt = build_engine("onnx", changed, "cpu", cache=cache)
    assert exports == ["tiny"] and rebuilt.cache_hit is False and rebuilt.artefact != engine.artefact
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert float((rebuilt(x) - changed.module(x)).abs().max()) <= 1e-5
        assert float((engine(x) - spec.module(x)).abs().max()) <= 1e-5
        assert float((rebuilt(x) - engine(x)).abs().max()) > 1e-3


def test_tensorrt_keys_cover_profile_precision_gpu_and_version(specs):
    spec, s = specs["dit"], EngineSettings()
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    base = EngineCache.key(trt.trt_fields(spec, s, "float16", trt.batch_profile(8), gpu, "10.9.0"))
    variants = [
        trt.trt_fields(spec, s, "float16", trt.batch_profile((1, 8, 16)), gpu, "10.9.0"),
        trt.trt_fields(spec, s, "bfloat16", trt.batch_profile(8), gpu, "10.9.0"),
        trt.trt_fields(spec, s, "float16", trt.batch_profile(8), {**gpu, "compute_capability": "8.0"}, "10.9.0"),
        trt.trt_fields(spec, s, "float16", trt.batch_profile(8), gpu, "10.10.0"),
        trt.trt_fields(spec, EngineSettings(trt_optimization_level=5), "float16", trt.batch_profile(8), gpu, "10.9.0"),
    ]
    keys = {EngineCache.key(v) for v in variants}
    assert base not in keys and len(keys) == len(variants)
    assert EngineCache.key(trt.trt_fields(spec, s, "float16", trt.batch_profile((1, 8, 8)), gpu, "10.9.0")) == base
    with pytest.raises(UserError, match="min <= opt <= max"):
        trt.batch_profile((4, 2, 8))


def _largest_file(entry):
    return max((f for f in entry.iterdir() if f.name != "meta.json"), key=lambda f: f.stat().st_size)


def _truncate(entry):
    f = _largest_file(entry)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt(entry):
    f = _largest_file(entry)
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 16])
    f.write_bytes(bytes(data))


def _mismatch(entry):
    meta = json.loads((entry / "meta.json").read_text())
    meta["fields"]["weights"] = "0" * 64
    (entry / "meta.json").write_text(json.dumps(meta))


def _interrupted(entry):
    (entry / "meta.json").unlink()


def _unloadable(entry):
    """Garbage whose sizes and checksums are recorded as if it were the artefact: only loading it can tell."""
    from cao2_fast.engines.cache import file_sha256

    f = entry / "model.onnx"
    f.write_bytes(b"not an onnx model" * 100)
    meta = json.loads((entry / "meta.json").read_text())
    meta["files"]["model.onnx"] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate, _corrupt, _mismatch, _interrupted, _unloadable],
                         ids=["truncated", "corrupt", "mismatched-meta", "no-meta", "ort-cannot-load"])
def test_a_broken_entry_is_reported_in_one_line_and_rebuilt(damage, tiny, exports, caplog):
    spec, cache, first = tiny
    entry = first.artefact.parent
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="cao2_fast.engines"):
        engine = build_engine("onnx", spec, "cpu", cache=cache)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and str(entry) in warned[0] and "rebuilding" in warned[0] and "\n" not in warned[0]
    assert exports == ["tiny"] and engine.cache_hit is False and engine.artefact.parent == entry
    assert cache.lookup("onnx", spec.name, onnx_fields(spec, EngineSettings()))[1] is None
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert float((engine(x) - spec.module(x)).abs().max()) <= 1e-5


def test_build_false_serves_the_cache_and_refuses_a_miss(models, cache, onnx_engines, tmp_path, exports):
    specs, batches = stage1_specs(DiTGenerator(*models[:2]), models[2]), {"dit": 64, "vae_decode": 64, "classifier": 64}
    got = stage1_engines("onnx", specs, batches, "cpu", cache_dir=cache.root, build=False)
    assert exports == [] and all(e.cache_hit for e in got.values())
    offline = tmp_path / "offline"
    with pytest.raises(UserError) as e:
        stage1_engines("onnx", specs, batches, "cpu", cache_dir=offline, build=False)
    msg = str(e.value)
    assert msg.startswith(f"the engine cache at {offline} has no onnx engine for the dit model") and "\n" not in msg
    assert f"cao2-fast export --engine onnx --engine-dir {offline} and the same models" in msg
    assert exports == [] and not offline.exists()  # nothing exported, nothing written


def test_build_false_never_rebuilds_a_broken_entry(tiny, exports):
    spec, cache, first = tiny
    entry = first.artefact.parent
    largest = _largest_file(entry)
    intact = largest.read_bytes()
    _truncate(entry)
    before = sorted((f.name, f.stat().st_size) for f in entry.iterdir())
    try:
        with pytest.raises(UserError, match=f"its entry {entry.name} would have to be rebuilt: .*truncated.* and "
                                            "building is off"):
            build_engine("onnx", spec, "cpu", cache=cache, build=False)
        assert exports == [] and sorted((f.name, f.stat().st_size) for f in entry.iterdir()) == before  # left alone
    finally:
        largest.write_bytes(intact)
    assert build_engine("onnx", spec, "cpu", cache=cache, build=False).cache_hit is True


def _write_artefact(folder):
    (folder / "model.onnx").write_bytes(b"an artefact")


@pytest.mark.parametrize("squatter", ["file", "link"])
def test_a_file_at_an_entry_name_is_reported_and_replaced(squatter, tmp_path, caplog):
    # the cache folder is cao2-fast's own: whatever sits at an entry's exact name and is not a sound entry is
    # replaced by the rebuilt entry (a link to a folder that is no entry: the link is removed, never its target)
    cache, fields = EngineCache(tmp_path / "engines"), {"model": "tiny"}
    path, _ = cache.lookup("onnx", "tiny", fields)
    path.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the cache's")
    path.write_text("not an engine") if squatter == "file" else path.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="cao2_fast.engines"):
        got, entry = cache.get_or_build("onnx", "tiny", fields, _write_artefact, lambda e: e.file("model.onnx"))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and str(path) in warned[0] and "rebuilding" in warned[0]
    assert ("not an entry folder" if squatter == "file" else "no meta.json") in warned[0]
    assert path.is_dir() and not path.is_symlink() and got.read_bytes() == b"an artefact" and entry.hit is False
    assert cache.lookup("onnx", "tiny", fields)[1] is None and (elsewhere / "keep.txt").is_file()


@pytest.mark.parametrize("when", ["export", "meta.json"])
def test_a_full_disk_while_building_is_one_line_and_leaves_nothing(when, tmp_path, monkeypatch):
    import errno

    from cao2_fast.engines import cache as cache_module

    full = OSError(errno.ENOSPC, "No space left on device")
    fallbacks = []
    root = tmp_path / "engines"
    with pytest.raises(UserError) as e:
        if when == "export":  # the exporter's own error, caused by the full disk
            def dynamo(module, args, spec, path, opset):
                path.write_bytes(b"half an onnx file")
                raise RuntimeError("the exporter could not save the model") from full

            monkeypatch.setattr(onnx_ort, "_export_dynamo", dynamo)
            monkeypatch.setattr(onnx_ort, "_export_torchscript", lambda *a, **k: fallbacks.append(a))
            build_engine("onnx", tiny_spec(), "cpu", cache=EngineCache(root))
        else:  # the artefact fitted, its meta.json did not
            def atomic_write(path, data, mode=0o644):
                path.write_bytes(data[: len(data) // 2])
                raise full

            monkeypatch.setattr(cache_module, "atomic_write", atomic_write)
            EngineCache(root).get_or_build("onnx", "tiny", {"model": "tiny"}, _write_artefact, lambda e: e)
    msg = str(e.value)
    assert msg.startswith(f"the engine cache at {root} ran out of space while building the tiny onnx engine")
    assert "--engine-dir" in msg and "--engine " not in msg and "eager" not in msg and "\n" not in msg
    assert fallbacks == [] and list(root.iterdir()) == []  # no other exporter tried, nothing half-written left


def test_trt_builds_from_the_onnx_file_onnx_runtime_runs(specs, cache, onnx_engines, exports):
    for name, spec in specs.items():
        path = trt.onnx_input(spec, cache, EngineSettings())
        assert path == onnx_engines[name].artefact and path.is_file()
    assert exports == []


# -- CLI -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    dit, vae, clf = models
    save_dit(dit, root / "dit.safetensors")
    vae.autoencoder.save_pretrained(root / "vae")
    torch.save(clf.model.state_dict(), root / "clf.pth")
    return root


def real_models(ckpts):
    return ["--dit", str(ckpts / "dit.safetensors"), "--vae", str(ckpts / "vae"), "--classifier",
            f"test_resnet:{ckpts / 'clf.pth'}"]


@pytest.mark.parametrize("command", ["distill", "export"])
def test_engine_trt_without_tensorrt_or_cuda_is_one_line_exit_2(command, tmp_path, capsys):
    if HAVE_TRT:
        pytest.skip("TensorRT and CUDA are both present")
    code, _, err = run_cli([command, "--engine", "trt", "--engine-dir", str(tmp_path / "e"), "--out", str(tmp_path /
    "o")]
                           if command == "distill" else [command, "--engine", "trt", "--engine-dir", str(tmp_path /
                           "e")],
                           capsys)
    msg = lines(err)
    assert code == 2 and len(msg) == 1 and msg[0].startswith("error: --engine trt needs"), err
    if importlib.util.find_spec("tensorrt") is None:
        assert 'pip install "cao2-fast[trt]"' in msg[0]
    if not torch.cuda.is_available():
        assert "a CUDA device" in msg[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("name", ["onnx", "trt"])
def test_stage2_engine_without_backward_is_one_line_exit_2(name, tmp_path, capsys):
    # the CLI does not offer them (its choice lists eager and compile only); the library refuses them with the reason
    code, _, err = run_cli(["distill", "--stage2-engine", name, "--device", "cpu", "--out", str(tmp_path / "o")],
    capsys)
    msg = lines(err)
    assert code == 2 and len(msg) == 1 and f"'{name}' is not one of 'eager', 'compile'" in msg[0], err
    assert not (tmp_path / "o").exists()
    from cao2_fast.engines import check_engines
    from cao2_fast.errors import UserError

    with pytest.raises(UserError, match="no backward pass.*eager or compile"):
        check_engines("eager", name, "cpu", "float32")


def test_export_info_and_distill_share_the_cache(ckpts, cache, onnx_engines, tmp_path, capsys, exports):
    args = ["export", "--engine", "onnx", *real_models(ckpts), "--device", "cpu", "--engine-dir", str(cache.root),
            "--json"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    rows = {r["model"]: r for r in map(json.loads, lines(out))}
    assert set(rows) == {"dit", "vae_decode", "classifier"}
    for name, row in rows.items():  # the same weights read from files land on the same entries
        assert row["artefact"] == str(onnx_engines[name].artefact) and row["cache_hit"] is True
    assert exports == []

    code, out, _ = run_cli(["info", "--json", "--engine-dir", str(cache.root)], capsys)
    listed = json.loads(out)["engines"]
    assert listed["dir"] == str(cache.root)
    by_name = {row["name"]: row for row in listed["entries"]}
    for e in onnx_engines.values():
        row = by_name[e.artefact.parent.name]
        assert row["state"] == "ok" and row["path"] == str(e.artefact) and row["contract"]["inputs"]

    out_dir = tmp_path / "run"
    code, out, err = run_cli(["distill", *real_models(ckpts), "--classes", "1,4", "--ipc", "1", "--k", "2",
                              "--sample-steps", "3", "--stage2-steps", "1", "--t-max", "2", "--no-progress",
                              "--device", "cpu", "--engine", "onnx", "--engine-dir", str(cache.root),
                              "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert exports == [] and (out_dir / "manifest.json").is_file()


# -- whole runs ------------------------------------------------------------------------------------------------------


def _candidates(manifest: dict) -> list[tuple[int, int]]:
    return [(r["class_id"], r["candidate_index"]) for c in manifest["classes"] for r in c["images"]]


def test_onnx_stage1_selects_the_same_candidates_as_eager(models, cache, onnx_engines, tmp_path, exports):
    dit, vae, clf = models
    cfg = build_config("custom", 2, "official", class_ids=[0, 3, 7, 9], num_model_classes=CFG.num_classes, k=3,
                       stage1_batch=6, stage2_batch=8, stage2_steps=1, sample_steps=5, t_max=2,
                       classifier_input_size=CLF_INPUT)
    picked, probs = {}, {}
    for engine in ("eager", "onnx"):
        d = Distiller(DiTGenerator(dit, vae), clf, cfg)
        built = d.use_engines(engine, "eager", cache.root)
        manifest = d.run(tmp_path / engine)
        assert built["dit"].calls > 0 and built["classifier"].calls > 0
        picked[engine] = _candidates(manifest)
        probs[engine] = torch.tensor([r["prob_before"] for c in manifest["classes"] for r in c["images"]])
    assert exports == []
    assert picked["onnx"] == picked["eager"] and len(picked["eager"]) == 8
    assert float((probs["onnx"] - probs["eager"]).abs().max()) <= 1e-5


DIGITS = preset_dir("digits") / "preset.json"


@pytest.mark.slow
@pytest.mark.skipif(not DIGITS.is_file(), reason="the digits preset weights are not installed")
def test_digits_distill_on_onnx_selects_the_same_candidates_as_eager(cache, tmp_path):
    picked = {}
    for engine in ("eager", "onnx"):
        d = Distiller.from_preset("digits", ipc=2, sample_steps=12, stage2_steps=2)
        built = d.use_engines(engine, "eager", cache.root)
        picked[engine] = _candidates(d.run(tmp_path / engine))
        assert built["dit"].backend.name == engine and built["dit"].calls > 0
    assert picked["onnx"] == picked["eager"] and len(picked["eager"]) == 2 * 10


# -- GPU -------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_with_cuda_graphs_matches_eager_and_keeps_outputs(models):
    dit = copy.deepcopy(models[0]).cuda()
    engine = build_engine("compile", dit_spec(dit), "cuda")
    assert engine.details["cuda_graphs"] is True
    for n in (3, 17):
        a = [v.cuda() for v in dit_inputs(n, seed=1)]
        b = [v.cuda() for v in dit_inputs(n, seed=2)]
        with torch.no_grad():
            first = engine(*a)
            for _ in range(3):
                engine(*b)
            assert float((first - dit(*a)).abs().max()) <= 1e-4  # a later replay did not overwrite it


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a CUDA device")
def test_trt_matches_eager_and_is_cached_per_profile(specs, cache, onnx_engines, models, exports):
    engines = {name: build_engine("trt", spec, "cuda", cache=cache, batch=(1, 17, 34)) for name, spec in specs.items()}
    assert exports == []
    for name, e in engines.items():
        assert e.details["onnx_file"] == str(onnx_engines[name].artefact)
    for n in BATCHES:
        dit, vae, clf = models
        x, t, y = dit_inputs(n, seed=n)
        with torch.no_grad():
            assert float((engines["dit"](x.cuda(), t.cuda(), y.cuda()).cpu() - dit(x, t, y)).abs().max()) <= 1e-4
            images = vae.decode(x)
            assert float((engines["vae_decode"](x.cuda()).cpu() - images).abs().max()) <= 1e-3
            assert torch.equal(engines["classifier"](images.cuda()).cpu().argmax(1), clf(images).argmax(1))
    again = build_engine("trt", specs["dit"], "cuda", cache=cache, batch=(1, 17, 34))
    assert again.cache_hit and again.artefact == engines["dit"].artefact
    other = build_engine("trt", specs["dit"], "cuda", cache=cache, batch=(1, 8, 8))
    assert not other.cache_hit and other.artefact != engines["dit"].artefact


def _ort_cuda() -> bool:
    import onnxruntime

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _ort_cuda(), reason="needs a CUDA device and onnxruntime-gpu")
def test_onnx_on_cuda_runs_the_same_file_and_matches_eager(specs, cache, onnx_engines, models, exports):
    engines = {name: build_engine("onnx", spec, "cuda", cache=cache) for name, spec in specs.items()}
    assert exports == [] and all(e.artefact == onnx_engines[n].artefact for n, e in engines.items())
    assert all(e.details["providers"][0] == "CUDAExecutionProvider" for e in engines.values())
    dit, vae, _ = models
    for n in BATCHES:
        x, t, y = dit_inputs(n, seed=n)
        with torch.no_grad():
            got = engines["dit"](x.cuda(), t.cuda(), y.cuda())
            assert got.device.type == "cuda" and float((got.cpu() - dit(x, t, y)).abs().max()) <= 1e-4
            assert float((engines["vae_decode"](x.cuda()).cpu() - vae.decode(x)).abs().max()) <= 1e-3


def test_ort_falling_back_to_cpu_on_a_cuda_device_is_one_line_not_a_crash(specs, cache, onnx_engines, monkeypatch):
    """ORT silently runs on CPU when its CUDA provider cannot load; binding CUDA pointers then would be wrong."""
    import onnxruntime

    from cao2_fast.engines.onnx_ort import OrtRunner

    seen = {}

    class FallbackSession:
        def __init__(self, path, options, providers):
            seen["providers"] = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                         "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FallbackSession)
    with pytest.raises(UserError, match="could not load its CUDA provider .*fell back to CPUExecutionProvider"):
        OrtRunner(onnx_engines["dit"].artefact, specs["dit"], torch.device("cuda"))
    name, opts = seen["providers"][0]
    assert name == "CUDAExecutionProvider" and opts["use_tf32"] == "0"  # strict fp32, stated explicitly


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime", "tensorrt"])
def test_trt_names_each_missing_package_in_one_line(missing, monkeypatch):
    import importlib.util

    from cao2_fast.engines import require

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(UserError, match=f"--engine trt needs the .*{missing}.*cao2-fast\\[trt\\]"):
        require("trt", "cuda")
