"""Hostile model files and names: each is refused in one line naming what is wrong, before anything blocks, runs
pickled code, touches the network, or allocates what the file merely declares. Every file is built here, small."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import zipfile

import pytest
import torch

from helpers import run_cli, tiny_autoencoder, tiny_diffusers_dit
from test_cli import ckpts, real_args  # noqa: F401  (the tiny real-checkpoint fixture)

from cao2_fast.errors import UserError
from cao2_fast.models import dit as dit_module
from cao2_fast.models.classifier import load_classifier
from cao2_fast.models.dit import DiT, DiTConfig, load_dit, param_count, random_dit, save_dit
from cao2_fast.models.vae import load_vae, min_params


def one_line_exit_2(code, err, *parts):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], err
    assert "Traceback" not in err and "Warning" not in err


def refused(fn, *parts) -> str:
    """Call ``fn``: it must raise one ``UserError`` line containing every part; the message is returned."""
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for part in parts:
        assert str(part) in msg, msg
    return msg


@contextlib.contextmanager
def no_hang(seconds: int = 30):
    """Fail (instead of hanging the suite) if the body blocks, e.g. on opening a FIFO nobody writes."""
    def stop(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    before = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


class Payload:
    """Pickles as a call of ``os.system``: if any loader ran pickled code, ``marker`` would appear."""

    def __init__(self, marker):
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.cmd,)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, offline mode on, and every socket connection recorded (and
    refused): a test fails if anything tries the network."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))  # read once at import: set the module's copy too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield home / "hub"
    assert attempts == [], f"network was tried: {attempts[:3]}"


# ---------------------------------------------------------------------------------------------------------------
# A timm name without weights is never a random classifier


def test_a_bare_timm_name_offline_is_one_line_and_touches_no_network(ckpts, tmp_path, capsys, offline_hub):  # noqa: F811
    out = tmp_path / "o"
    args = real_args(ckpts, out, "--classes", "1")
    args[args.index("--classifier") + 1] = "resnet18"
    code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, "classifier 'resnet18'", "NAME:CHECKPOINT", "HF_HUB_OFFLINE", str(offline_hub))
    assert not out.exists()


@pytest.mark.parametrize("name", ["resnet18.tv_in1k", "hf-hub:timm/resnet18.a1_in1k"])
def test_pretrained_names_offline_are_one_line(name, offline_hub):
    refused(lambda: load_classifier(name), f"classifier {name!r}", "not cached", "NAME:CHECKPOINT")


def test_a_teacher_without_weights_offline_is_one_line(offline_hub):
    from cao2_fast.eval.teacher import load_teacher

    refused(lambda: load_teacher("resnet18", 10, 32), "teacher 'resnet18'", "NAME:CHECKPOINT")


def test_a_name_without_pretrained_weights_or_model_is_one_line(offline_hub):
    refused(lambda: load_classifier("test_resnet.no_such_tag"), "no pretrained weights", "random:test_resnet")
    refused(lambda: load_classifier("no_such_net"), "timm has no model of that name")


def test_random_weights_only_when_asked_for_by_name(offline_hub):
    a = load_classifier("random:test_resnet", input_size=32, num_classes=5)
    b = load_classifier("random:test_resnet", input_size=32, num_classes=5)
    assert a.num_classes == 5 and not a.training
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # really random, unseeded


def _fake_hub_entry(cache, repo: str, sd: dict) -> None:
    """The layout huggingface_hub reads offline: refs/main names a snapshot holding model.safetensors."""
    from safetensors.torch import save_file

    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    (root / "snapshots" / rev).mkdir(parents=True)
    save_file(sd, str(root / "snapshots" / rev / "model.safetensors"))


def test_a_pretrained_tag_loads_from_the_hugging_face_cache(offline_hub):
    import timm

    torch.manual_seed(3)
    src = timm.create_model("test_resnet", pretrained=False)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    _fake_hub_entry(offline_hub, "timm/test_resnet.r160_in1k", sd)
    for name in ("test_resnet.r160_in1k", "test_resnet"):  # the explicit tag, and the name's default tag
        clf = load_classifier(name, input_size=32)
        got = clf.model.state_dict()
        assert clf.num_classes == 1000 and all(torch.equal(got[k], v) for k, v in sd.items())
    refused(lambda: load_classifier("test_resnet", num_classes=10), "pretrained head has 1000 classes", "10")
    from cao2_fast.hub import timm_identity

    # what a config records of it: the Hub id and the commit the weights came from, never a cache path
    assert timm_identity(clf.model) == {"hub": "timm/test_resnet.r160_in1k",
                                        "revision": "0123456789abcdef0123456789abcdef01234567"}


def test_an_eval_student_from_the_hub_offline_is_one_line(tmp_path, capsys, offline_hub):
    (tmp_path / "d").mkdir()
    base = ["eval", "--distilled", str(tmp_path / "d"), "--dataset", "digits", "--device", "cpu"]
    code, _, err = run_cli([*base, "--student", "hf-hub:timm/resnet18.a1_in1k"], capsys)
    one_line_exit_2(code, err, "student 'hf-hub:timm/resnet18.a1_in1k'", "not cached")
    code, _, err = run_cli([*base, "--student", f"resnet18:{tmp_path / 'w.pth'}"], capsys)
    one_line_exit_2(code, err, "students train from scratch")


# ---------------------------------------------------------------------------------------------------------------
# Configs: safetensors metadata, diffusers config.json, the VAE's scaling factor

TINY = DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def tiny_sd():
    return {k: v.contiguous() for k, v in random_dit(TINY).state_dict().items()}


def test_a_saved_dit_still_round_trips_through_the_checks(tmp_path):
    model = random_dit(TINY, seed=1)
    save_dit(model, tmp_path / "dit.safetensors")
    back = load_dit(tmp_path / "dit.safetensors")
    assert back.cfg == TINY
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("meta,part", [
    ("{\"depth\": 2,", "dit_config metadata is not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"depth": 2, "colour": "red"}), "unknown keys ['colour']"),
    (json.dumps({"depth": "2"}), "'depth' is string \"2\", expected an integer"),
    (json.dumps({"hidden_size": 32.5}), "'hidden_size' is number 32.5, expected an integer"),
    (json.dumps({"depth": None}), "'depth' is null"),
    (json.dumps({"learn_sigma": "yes"}), "'learn_sigma'"),
    (json.dumps({"mlp_ratio": "4"}), "'mlp_ratio' is string"),
    (json.dumps({"depth": 0}), "depth is 0"),
    (json.dumps({"hidden_size": 30, "num_heads": 4}), "not divisible by num_heads"),
])
def test_bad_dit_config_metadata_is_one_line(tiny_sd, tmp_path, meta, part):
    from safetensors.torch import save_file

    p = tmp_path / "dit.safetensors"
    save_file(tiny_sd, str(p), metadata={"dit_config": meta})
    refused(lambda: load_dit(p), p, part)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny diffusers DiT and a tiny AutoencoderKL, each saved as a model folder."""
    root = tmp_path_factory.mktemp("dirs")
    tiny_diffusers_dit(seed=0).save_pretrained(root / "dit")
    tiny_autoencoder(seed=0).save_pretrained(root / "vae")
    return root


def _copy(model_dirs, kind, tmp_path):
    return shutil.copytree(model_dirs / kind, tmp_path / kind)


LOADERS = {"dit": load_dit, "vae": load_vae}


@pytest.mark.parametrize("kind", ["dit", "vae"])
@pytest.mark.parametrize("defect,part", [
    ("malformed", "not valid JSON"),
    ("list", "is a JSON list, not an object"),
    ("missing", None),
    ("wrong-type", None),
])
def test_bad_diffusers_config_json_is_one_line(model_dirs, tmp_path, kind, defect, part):
    d = _copy(model_dirs, kind, tmp_path)
    cfg_file = d / "config.json"
    cfg = json.loads(cfg_file.read_text())
    key = "num_layers" if kind == "dit" else "_class_name"
    if defect == "malformed":
        cfg_file.write_text(cfg_file.read_text()[:-10])
    elif defect == "list":
        cfg_file.write_text(json.dumps(list(cfg.items())))
    elif defect == "missing":
        cfg.pop(key)
        cfg_file.write_text(json.dumps(cfg))
        part = "lacks 'num_layers'" if kind == "dit" else "not an AutoencoderKL"
    else:
        key = "num_layers" if kind == "dit" else "block_out_channels"
        cfg[key] = "2" if kind == "dit" else "8,16"
        cfg_file.write_text(json.dumps(cfg))
        part = f"'{key}' is string"
    refused(lambda: LOADERS[kind](d), cfg_file, part)


@pytest.mark.parametrize("value,shown", [("0.18", "string \"0.18\""), (None, "null"), (float("nan"), "nan"),
                                         (-0.5, "-0.5"), (0, "is 0")])
def test_a_vae_scaling_factor_that_is_not_a_positive_number_is_one_line(model_dirs, tmp_path, value, shown):
    d = _copy(model_dirs, "vae", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["scaling_factor"] = value
    (d / "config.json").write_text(json.dumps(cfg))  # NaN is written as the bare token NaN, which json reads back
    refused(lambda: load_vae(d), d / "config.json", "'scaling_factor'", shown)


# ---------------------------------------------------------------------------------------------------------------
# Files that are not regular files, directories, control characters in paths


@pytest.mark.parametrize("target", ["dit-file", "dit-dir-weights", "dit-dir-config", "vae-weights", "vae-config",
                                    "classifier"])
def test_a_fifo_is_refused_before_it_is_opened(model_dirs, tmp_path, target):
    if target == "dit-file":
        fifo = tmp_path / "dit.pt"
        call = lambda: load_dit(fifo)  # noqa: E731
    elif target == "classifier":
        fifo = tmp_path / "clf.pth"
        call = lambda: load_classifier(f"test_resnet:{fifo}")  # noqa: E731
    else:
        kind, _, what = target.partition("-")
        kind = kind if kind == "vae" else "dit"
        d = _copy(model_dirs, kind, tmp_path)
        fifo = d / ("config.json" if what.endswith("config") else "diffusion_pytorch_model.safetensors")
        fifo.unlink()
        call = lambda: LOADERS[kind](d)  # noqa: E731
    os.mkfifo(fifo)
    with no_hang():
        refused(call, fifo, "is not a regular file")


def test_a_fifo_as_dit_on_the_command_line_is_one_line(ckpts, tmp_path, capsys):  # noqa: F811
    os.mkfifo(tmp_path / "dit.pt")
    args = real_args(ckpts, tmp_path / "o", "--classes", "1")
    args[args.index("--dit") + 1] = str(tmp_path / "dit.pt")
    with no_hang():
        code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, f"{tmp_path / 'dit.pt'}: is not a regular file")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_class_list_that_is_not_a_regular_file_is_one_line(ckpts, tmp_path, capsys, kind):  # noqa: F811
    target = tmp_path / "ids"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    with no_hang():
        code, _, err = run_cli(real_args(ckpts, tmp_path / "o", "--classes", f"@{target}"), capsys)
    one_line_exit_2(code, err, str(target))
    assert ("is a directory" if kind == "dir" else "is not a regular file") in err
    assert not (tmp_path / "o").exists()


def test_a_classifier_checkpoint_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "w.pth").mkdir()
    refused(lambda: load_classifier(f"test_resnet:{tmp_path / 'w.pth'}"), tmp_path / "w.pth", "is a directory")


def test_a_newline_in_a_path_stays_on_one_line(ckpts, tmp_path, capsys):  # noqa: F811
    odd = tmp_path / "a\nb\x1b[31m"
    odd.mkdir()
    args = real_args(ckpts, tmp_path / "o", "--classes", "1")
    args[args.index("--dit") + 1] = str(odd / "nope.pt")
    code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, "a\\nb\\x1b[31m", "nope.pt: no such file")
    assert "\x1b" not in err


def test_the_error_printer_escapes_every_line_break():
    from cao2_fast.cli.main import one_line

    text = one_line("x\ny\rz\u2028w\x85v\x0bu\x1cé")
    assert text == "x\\ny\\rz\\u2028w\\x85v\\x0bu\\x1cé" and len(text.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# Pickles: nothing runs, the message names the global and never suggests loading unsafely


@pytest.mark.parametrize("form", ["zip", "raw-pickle"])
def test_a_pickle_payload_names_the_blocked_global_and_runs_nothing(tmp_path, form):
    marker = tmp_path / "ran"
    p = tmp_path / "payload.pt"
    if form == "zip":
        torch.save({"w": Payload(marker)}, p)
    else:
        p.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    msg = refused(lambda: load_dit(p), p, "not a plain tensor checkpoint", "runs no code")
    assert any(f"needs the global {m}.system" in msg for m in ("posix", "os", "nt")), msg
    assert "weights_only" not in msg and "Re-running" not in msg and "trust" not in msg
    assert not marker.exists()


def test_a_vae_whose_weights_are_a_pickle_payload_is_one_clean_line(ckpts, model_dirs, tmp_path, capsys):  # noqa: F811
    marker = tmp_path / "ran"
    d = _copy(model_dirs, "vae", tmp_path)
    (d / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"encoder.conv_in.weight": Payload(marker)}, d / "diffusion_pytorch_model.bin")
    args = real_args(ckpts, tmp_path / "o", "--classes", "1")
    args[args.index("--vae") + 1] = str(d)
    code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, f"{d / 'diffusion_pytorch_model.bin'}: not a plain tensor checkpoint",
                    "(or .safetensors)")
    assert "unsafe" not in err.lower() and not marker.exists()


def test_a_state_dict_that_is_not_a_dit_names_the_file(tmp_path):
    p = tmp_path / "half.pt"
    torch.save({"x_embedder.proj.weight": torch.zeros(32, 4, 2, 2)}, p)
    refused(lambda: load_dit(p), f"{p}: not an original-layout DiT state dict")
    q = tmp_path / "odd.pt"
    torch.save({"x_embedder.proj.weight": torch.zeros(32, 4, 2, 2), "blocks.x.mlp.fc1.weight": torch.zeros(1)}, q)
    refused(lambda: load_dit(q), f"{q}: not an original-layout DiT state dict")
    r = tmp_path / "diffusers.pt"
    torch.save({"pos_embed.proj.weight": torch.zeros(1), "transformer_blocks.1_0.attn1.to_q.weight": torch.zeros(1)}, r)
    refused(lambda: load_dit(r), f"{r}: not diffusers DiT transformer weights")


# ---------------------------------------------------------------------------------------------------------------
# The file, not what it declares, bounds what is allocated


def _torch_zip(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def no_torch_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", boom)


def test_torch_save_writes_stored_zip_entries_that_fit_the_file():
    data = _torch_zip({"w": torch.zeros(1000)})
    entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert all(e.compress_type == zipfile.ZIP_STORED for e in entries)
    assert sum(e.file_size for e in entries) <= len(data)


def test_a_zip_bomb_checkpoint_is_refused_before_torch_load(tmp_path, no_torch_load):
    src = zipfile.ZipFile(io.BytesIO(_torch_zip({"w": torch.zeros(4)})))
    p = tmp_path / "bomb.pt"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for e in src.infolist():
            if e.filename.endswith("/data/0"):
                with z.open(e.filename, "w") as f:  # 64 MB of zeros, deflated to about 64 KB
                    for _ in range(64):
                        f.write(bytes(1 << 20))
            else:
                z.writestr(e.filename, src.read(e.filename))
    assert p.stat().st_size < 1 << 20
    refused(lambda: load_dit(p), p, "is compressed")


def test_zip_entries_that_declare_more_than_the_file_holds_are_refused(tmp_path, no_torch_load):
    data = bytearray(_torch_zip({"w": torch.zeros(4)}))
    at = data.find(b"PK\x01\x02")
    while at >= 0:  # every central-directory entry of a storage claims 3 GB (compressed and uncompressed)
        name = bytes(data[at + 46: at + 46 + struct.unpack_from("<H", data, at + 28)[0]])
        if b"/data/" in name:
            struct.pack_into("<II", data, at + 20, 3_000_000_000, 3_000_000_000)
        at = data.find(b"PK\x01\x02", at + 4)
    p = tmp_path / "liar.pt"
    p.write_bytes(data)
    refused(lambda: load_dit(p), p, "zip entries declare", "refusing")


def test_a_stride0_view_is_refused(tmp_path):
    p = tmp_path / "view.pt"
    torch.save({"x_embedder.proj.weight": torch.zeros(()).expand(100_000, 4, 2, 2)}, p)
    refused(lambda: load_dit(p), p, "claims 1600000 values but its data holds 1")


@pytest.fixture
def no_dit_built(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a DiT was built")

    monkeypatch.setattr(dit_module, "DiT", boom)


def test_param_count_is_exact():
    for cfg in (TINY, DiTConfig(input_size=16, patch_size=4, hidden_size=48, depth=3, num_heads=3, num_classes=7,
                                learn_sigma=False, mlp_ratio=2.5, in_channels=3)):
        assert param_count(cfg) == sum(p.numel() for p in DiT(cfg).parameters())


def test_metadata_declaring_a_huge_dit_is_refused_before_building(tiny_sd, tmp_path, no_dit_built):
    from safetensors.torch import save_file

    p = tmp_path / "dit.safetensors"
    huge = DiTConfig(input_size=32, hidden_size=1152, depth=28, num_heads=16, num_classes=1000)
    save_file(tiny_sd, str(p), metadata={"dit_config": json.dumps(huge.__dict__)})
    with pytest.MonkeyPatch.context() as mp:  # refused from the header alone: no tensor is even read
        mp.setattr(dit_module, "read_weights", lambda *a: pytest.fail("the tensors were read"))
        refused(lambda: load_dit(p), p, f"of {param_count(huge):,} parameters", "refusing to build it")
    save_file(tiny_sd, str(p), metadata={"dit_config": json.dumps(dict(TINY.__dict__, input_size=8192))})
    refused(lambda: load_dit(p), p, "8192x8192 latent", "refusing to build it")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_one_far_block_key_is_refused_before_building(tiny_sd, tmp_path, no_dit_built, suffix):
    from safetensors.torch import save_file

    sd = dict(tiny_sd, **{"blocks.200000.attn.qkv.weight": torch.zeros(3)})
    p = tmp_path / f"dit{suffix}"
    torch.save(sd, p) if suffix == ".pt" else save_file(sd, str(p))
    refused(lambda: load_dit(p), p, "depth 200001", "refusing to build it")


def test_a_diffusers_config_declaring_a_huge_dit_is_refused_before_building(model_dirs, tmp_path, no_dit_built):
    d = _copy(model_dirs, "dit", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(num_layers=100_000, attention_head_dim=4096)
    (d / "config.json").write_text(json.dumps(cfg))
    refused(lambda: load_dit(d), d / "config.json", "declares a DiT", "refusing to build it")


def test_a_vae_config_declaring_a_huge_model_is_refused_before_building(model_dirs, tmp_path, monkeypatch):
    from diffusers.models.autoencoders import autoencoder_kl

    def boom(*a, **k):
        raise AssertionError("a VAE was built")

    monkeypatch.setattr(autoencoder_kl, "Encoder", boom)
    d = _copy(model_dirs, "vae", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(block_out_channels=[8, 100_000], norm_num_groups=4)
    (d / "config.json").write_text(json.dumps(cfg))
    refused(lambda: load_vae(d), d / "config.json", "declares a VAE", "refusing to build it")


def test_the_vae_bound_never_exceeds_the_real_model():
    ae = tiny_autoencoder(seed=0)
    init = {k: v for k, v in ae.config.items() if not k.startswith("_")}
    real = sum(p.numel() for p in ae.parameters())
    assert 0.7 * real <= min_params(init) <= real
