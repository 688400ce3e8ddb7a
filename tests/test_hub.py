"""Models by Hugging Face Hub id, offline: a Hub cache built on disk in huggingface_hub's layout, with tiny random
models in the real file layouts (a diffusers DiT pipeline at two revisions, a VAE repository, an original
checkpoint repository, an incomplete one). No test reaches the network: the cache is read with HF_HUB_OFFLINE=1,
and where a test needs the Hub's answers, the calls that would ask it are replaced."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import run_cli, tiny_autoencoder, tiny_diffusers_dit
from cao2_fast import hub
from cao2_fast.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")

SHA_A, SHA_B, SHA_C, SHA_D, SHA_E = (hashlib.sha1(s.encode()).hexdigest() for s in "abcde")
PIPE, VAE_REPO, ORIG, BROKEN = "tiny/dit-pipe", "tiny/vae", "tiny/dit-original", "tiny/broken"
FAST = ["--sample-steps", "4", "--stage2-steps", "2", "--t-max", "2", "--no-progress", "--device", "cpu"]
INDEX = {"_class_name": "DiTPipeline", "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "DDIMScheduler"],
         "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def add_snapshot(home: Path, repo_id: str, commit: str, folder: Path, refs=()) -> None:
    """``folder``'s files as the snapshot ``commit`` of ``repo_id``: each file a blob named by its digest, linked
    from ``snapshots/<commit>/`` as huggingface_hub lays them out, and ``refs/<ref>`` naming the commit."""
    storage = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


def pipeline_folder(root: Path, seed: int) -> Path:
    root.mkdir(parents=True)
    tiny_diffusers_dit(seed=seed).save_pretrained(root / "transformer")
    tiny_autoencoder(seed=seed).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps(INDEX))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "README.md").write_text("a tiny DiT pipeline")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The local folders and the Hub cache (``home``, an HF_HOME) that holds the same files."""
    from cao2_fast.models.dit import DiTConfig, random_dit, save_dit

    root = tmp_path_factory.mktemp("hub-models")
    local = {"pipe_a": pipeline_folder(root / "pipe-a", seed=0), "pipe_b": pipeline_folder(root / "pipe-b", seed=1)}
    local["vae"] = root / "vae"
    tiny_autoencoder(seed=3).save_pretrained(local["vae"])
    local["orig"] = root / "orig"
    local["orig"].mkdir()
    save_dit(random_dit(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10), seed=4),
             local["orig"] / "dit-tiny.safetensors")
    (local["orig"] / "README.md").write_text("an original checkpoint")
    broken = root / "broken"
    (broken / "transformer").mkdir(parents=True)
    shutil.copy(local["pipe_a"] / "transformer" / "config.json", broken / "transformer" / "config.json")
    (broken / "model_index.json").write_text(json.dumps(INDEX))
    from cao2_fast.models.random import random_classifier

    torch.save(random_classifier(num_classes=10).model.state_dict(), root / "clf.pth")
    home = root / "hf-home"
    add_snapshot(home, PIPE, SHA_A, local["pipe_a"], refs=["main"])
    add_snapshot(home, PIPE, SHA_B, local["pipe_b"], refs=["v2"])
    add_snapshot(home, VAE_REPO, SHA_C, local["vae"], refs=["main"])
    add_snapshot(home, ORIG, SHA_D, local["orig"], refs=["main"])
    add_snapshot(home, BROKEN, SHA_E, broken, refs=["main"])
    return SimpleNamespace(home=home, classifier=f"test_resnet:{root / 'clf.pth'}", **local)


def use_hf_home(monkeypatch, home: Path, offline: bool = True) -> None:
    """HF_HOME and HF_HUB_OFFLINE as a user sets them. huggingface_hub reads them into ``constants`` when first
    imported (already done in this process), so the constants are set too; the endpoint points at a closed local
    port, so that nothing could reach the network even by mistake."""
    from huggingface_hub import constants

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def offline(models, monkeypatch):
    use_hf_home(monkeypatch, models.home)
    return models


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tree(*roots: Path) -> dict:
    """Every path under ``roots`` with its size and modification time (links as where they point)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = os.readlink(p) if p.is_symlink() else (p.is_dir() or (p.stat().st_size, p.stat().st_mtime_ns))
    return out


# -- names ----------------------------------------------------------------------------------------------------------


def test_names_shaped_org_slash_name_are_hub_ids_unless_a_local_path_exists(tmp_path, monkeypatch):
    assert hub.parse("facebook/DiT-XL-2-256") == hub.HubRef("facebook/DiT-XL-2-256")
    assert hub.parse("facebook/DiT-XL-2-256@refs/pr/3") == hub.HubRef("facebook/DiT-XL-2-256", "refs/pr/3")
    assert hub.parse(f"org/name@{SHA_A}").revision == SHA_A
    for local in ("dit.pt", "/abs/org/name", "./org/name", "a/b/c", "org/-name", "org/na--me", "org/x.git", None):
        assert hub.parse(local) is None, local
    assert hub.parse(Path("org/name")) is None  # a Path is a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.parse("org/name") is None  # an existing local path wins
    with pytest.raises(UserError, match="not a Hub revision"):
        hub.parse("org/other@bad..rev")


# -- resolution from the cache ----------------------------------------------------------------------------------------


def test_a_pipeline_id_loads_the_tensors_of_the_local_folder_and_supplies_its_vae(offline, capsys):
    from cao2_fast import generators
    from cao2_fast.models.dit import load_dit
    from cao2_fast.models.vae import load_vae

    gen, ids = generators.from_paths(PIPE, None)
    assert same_tensors(gen.dit, load_dit(offline.pipe_a)) and same_tensors(gen.vae, load_vae(offline.pipe_a))
    assert not same_tensors(gen.dit, load_dit(offline.pipe_b))
    assert ids["dit"]["hub"] == PIPE and ids["dit"]["revision"] == SHA_A and "path" not in ids["dit"]
    assert sorted(ids["dit"]["files"]) == ["model_index.json", "transformer/config.json",
                                           "transformer/diffusion_pytorch_model.safetensors"]
    assert sorted(ids["vae"]["files"]) == ["model_index.json", "vae/config.json",
                                           "vae/diffusion_pytorch_model.safetensors"]
    weights = offline.pipe_a / "transformer" / "diffusion_pytorch_model.safetensors"
    assert ids["dit"]["files"]["transformer/diffusion_pytorch_model.safetensors"] == {
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "size": weights.stat().st_size}
    _, explicit = generators.from_paths(PIPE, PIPE)  # naming the pipeline as its own VAE: the same identity
    assert explicit == ids
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""  # no progress bar off a terminal, no warning


@pytest.mark.parametrize("suffix,commit,folder", [("", SHA_A, "pipe_a"), ("@main", SHA_A, "pipe_a"),
                                                  ("@v2", SHA_B, "pipe_b"), (f"@{SHA_B}", SHA_B, "pipe_b")])
def test_a_revision_picks_its_snapshot(offline, suffix, commit, folder):
    from cao2_fast import generators
    from cao2_fast.models.dit import load_dit

    gen, ids = generators.from_paths(PIPE + suffix, None)
    assert ids["dit"]["revision"] == ids["vae"]["revision"] == commit
    assert same_tensors(gen.dit, load_dit(getattr(offline, folder)))


def test_a_vae_repository_and_an_original_checkpoint_repository(offline):
    from cao2_fast import generators
    from cao2_fast.models.dit import load_dit
    from cao2_fast.models.vae import load_vae

    gen, ids = generators.from_paths(ORIG, VAE_REPO)
    assert same_tensors(gen.dit, load_dit(offline.orig / "dit-tiny.safetensors"))
    assert same_tensors(gen.vae, load_vae(offline.vae))
    assert ids["dit"] == {"hub": ORIG, "revision": SHA_D, "files": {"dit-tiny.safetensors": ids["dit"]["files"][
        "dit-tiny.safetensors"]}}
    assert sorted(ids["vae"]["files"]) == ["config.json", "diffusion_pytorch_model.safetensors"]
    gen, _ = generators.from_paths(PIPE, VAE_REPO)  # a pipeline's DiT with another VAE
    assert same_tensors(gen.vae, load_vae(offline.vae))


def test_a_local_path_that_exists_wins_over_the_id(offline, tmp_path, monkeypatch):
    from cao2_fast import generators

    shutil.copytree(offline.pipe_b, tmp_path / PIPE)
    monkeypatch.chdir(tmp_path)
    _, ids = generators.from_paths(PIPE, None)  # a local pipeline folder supplies its VAE too
    assert ids["dit"]["path"] == PIPE and "hub" not in ids["dit"] and ids["vae"] == ids["dit"]


LISTING = {"README.md", "model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
           "transformer/diffusion_pytorch_model.bin", "transformer/diffusion_pytorch_model.fp16.safetensors",
           "transformer/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.bin",
           "vae/diffusion_pytorch_model.safetensors"}


@pytest.mark.parametrize("names,dit,vae", [
    (LISTING, ("", ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]),
     ("", ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"])),
    ({n for n in LISTING if "safetensors" not in n},  # .bin only where that is all there is
     ("", ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.bin"]),
     ("", ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.bin"])),
    ({"README.md", "DiT-XL-2-256x256.pt"}, ("DiT-XL-2-256x256.pt", ["DiT-XL-2-256x256.pt"]), None),
    ({"config.json", "diffusion_pytorch_model.safetensors"},  # a model at the root: the loaders tell DiT from VAE
     ("", ["config.json", "diffusion_pytorch_model.safetensors"]),
     ("", ["config.json", "diffusion_pytorch_model.safetensors"])),
])
def test_the_loaders_say_which_files_of_a_repository_they_read(names, dit, vae):
    from cao2_fast.models import dit as dit_model
    from cao2_fast.models import vae as vae_model

    index = lambda: INDEX  # noqa: E731
    assert dit_model.checkpoint_files(names, index) == dit
    assert vae_model.checkpoint_files(names, index) == vae


def test_model_index_names_the_component_folders():
    from cao2_fast.models import dit as dit_model

    names = {"model_index.json", "dit/config.json", "dit/diffusion_pytorch_model.safetensors"}
    index = {**INDEX, "transformer": None, "dit": ["diffusers", "Transformer2DModel"]}
    assert dit_model.checkpoint_files(names, lambda: index)[1][1:] == ["dit/config.json",
                                                                        "dit/diffusion_pytorch_model.safetensors"]
    with pytest.raises(LookupError, match="2 checkpoints"):
        dit_model.checkpoint_files({"a.pt", "b.pt"}, lambda: {})


def test_online_only_the_files_the_loaders_read_are_fetched(models, monkeypatch):
    """The Hub's answers are replaced: its file list (more files than are read), and the two download calls, which
    record what they are asked for and serve it from the cache."""
    import huggingface_hub
    from huggingface_hub import HfApi

    from cao2_fast import generators

    use_hf_home(monkeypatch, models.home, offline=False)
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, revision=None, **kw: SimpleNamespace(
        sha=SHA_B, siblings=[SimpleNamespace(rfilename=n) for n in sorted(LISTING)]))
    asked = []
    real_snapshot, real_file = huggingface_hub.snapshot_download, huggingface_hub.hf_hub_download

    def snapshot_download(repo_id, **kw):
        asked.append(("snapshot", repo_id, kw["revision"], kw["allow_patterns"], kw["local_files_only"]))
        return real_snapshot(repo_id, **{**kw, "local_files_only": True})

    def hf_hub_download(repo_id, filename, **kw):
        asked.append(("file", repo_id, kw["revision"], filename, kw["local_files_only"]))
        return real_file(repo_id, filename, **{**kw, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    _, ids = generators.from_paths(f"{PIPE}@v2", None)
    assert asked == [("file", PIPE, SHA_B, "model_index.json", False),
                     ("snapshot", PIPE, "v2", ["model_index.json", "transformer/config.json",
                                               "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                                               "vae/diffusion_pytorch_model.safetensors"], False)]
    assert ids["dit"]["revision"] == SHA_B


# -- fingerprints -----------------------------------------------------------------------------------------------------


def _fingerprint(models, dit, vae=None):
    from cao2_fast.pipeline import Distiller

    d = Distiller.from_paths(dit, vae, models.classifier, class_ids=[1], ipc=1, device="cpu")
    return d.config.fingerprint(), d.config.models


def test_the_fingerprint_records_id_and_commit_and_is_the_same_in_another_cache(models, tmp_path, monkeypatch):
    use_hf_home(monkeypatch, models.home)
    first, recorded = _fingerprint(models, PIPE)
    text = json.dumps(recorded)
    assert str(models.home) not in text and str(Path(models.home).resolve()) not in text
    assert recorded["dit"]["hub"] == PIPE and recorded["dit"]["revision"] == SHA_A
    other = tmp_path / "elsewhere" / "hf"
    shutil.copytree(models.home, other, symlinks=True)
    use_hf_home(monkeypatch, other)
    assert _fingerprint(models, PIPE)[0] == _fingerprint(models, f"{PIPE}@main")[0] == first
    assert _fingerprint(models, f"{PIPE}@v2")[0] != first  # a new revision is a new config


# -- one line per failure ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dit,vae,message", [
    ("tiny/nope", None, "tiny/nope: no such local path, and not in the Hugging Face cache"),
    (f"{PIPE}@v9", None, f"{PIPE}@v9: no such local path, and not in the Hugging Face cache"),
    (BROKEN, None, f"{BROKEN}: the cached snapshot {SHA_E[:12]}"),
    (ORIG, None, f"{ORIG}: holds no VAE beside its DiT"),
    (PIPE, "tiny/no-vae", "tiny/no-vae: no such local path, and not in the Hugging Face cache"),
    (f"{PIPE}@bad..rev", None, "is not a Hub revision"),
])
def test_failures_are_one_line_exit_2_and_write_nothing(offline, tmp_path, capsys, dit, vae, message):
    out = tmp_path / "out"
    args = ["distill", "--dit", dit, "--classifier", offline.classifier, "--classes", "1", "--ipc", "1",
            "--out", str(out), *FAST, *(["--vae", vae] if vae else [])]
    before = tree(offline.home)
    code, stdout, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and stdout == "" and not out.exists()
    assert tree(offline.home) == before
    if "not in the Hugging Face cache" in message:
        assert "HF_HUB_OFFLINE is set" in lines[0] and "hf download tiny/" in lines[0]
    if dit == BROKEN:
        assert "has no transformer/diffusion_pytorch_model.safetensors or .bin" in lines[0]


def _hub_error(kind: str, status: int):
    from huggingface_hub import errors

    return getattr(errors, kind)(f"{status} Client Error", response=SimpleNamespace(
        headers={}, request=None, status_code=status))


@pytest.mark.parametrize("raised,cached,message", [
    (lambda: _hub_error("RepositoryNotFoundError", 401), False,
     "tiny/nope: no such local path, and no model repository of that name on the Hugging Face Hub"),
    (lambda: _hub_error("GatedRepoError", 403), False, "tiny/nope: a gated Hub repository; accept its conditions"),
    (lambda: _hub_error("RevisionNotFoundError", 404), False, "the Hub repository tiny/nope has no revision 'main'"),
    (lambda: _hub_error("HfHubHTTPError", 503), False, "the Hugging Face Hub (http://127.0.0.1:9) answered HTTP 503"),
    (lambda: ConnectionError("connection refused"), False,
     "not in the Hugging Face cache ({cache}) while the Hub cannot be reached (ConnectionError)"),
    (lambda: ConnectionError("connection refused"), True, None),  # the cached snapshot serves, as for diffusers
    (lambda: _hub_error("HfHubHTTPError", 503), True, None),
])
def test_what_the_hub_answers_is_one_line(models, monkeypatch, raised, cached, message):
    """The one call that asks the Hub (the revision's file list) is replaced by each failure it can meet."""
    from huggingface_hub import HfApi

    use_hf_home(monkeypatch, models.home, offline=False)

    def model_info(self, repo_id, revision=None, **kw):
        raise raised()

    monkeypatch.setattr(HfApi, "model_info", model_info)
    repo = PIPE if cached else "tiny/nope"
    choose = lambda names, index: {"vae": ("", ["config.json", "diffusion_pytorch_model.safetensors"])}  # noqa: E731
    if message is None:
        snap = hub.resolve(hub.HubRef(VAE_REPO), "VAE", choose)
        assert snap.commit == SHA_C and snap.identity("vae")["hub"] == VAE_REPO
        return
    with pytest.raises(UserError) as e:
        hub.resolve(hub.HubRef(repo), "DiT", choose)
    line = str(e.value)
    assert "\n" not in line and message.format(cache=models.home / "hub") in line, line


def test_a_gated_download_and_a_cache_that_cannot_be_written_are_one_line(models, monkeypatch):
    use_hf_home(monkeypatch, models.home, offline=False)
    ref = hub.HubRef("org/gated")
    assert "set HF_TOKEN" in hub.explain(_hub_error("GatedRepoError", 401), ref)
    assert "cannot use the Hugging Face cache" in hub.explain(PermissionError(13, "Permission denied"), ref)
    assert hub.explain(KeyError("a bug"), ref) is None  # not a Hub failure: not dressed up as one


# -- the whole command ------------------------------------------------------------------------------------------------


def test_distill_by_id_writes_only_into_out_and_records_the_id(offline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAO2_FAST_CACHE", str(tmp_path / "cao2-cache"))  # the weights-digest index
    before = tree(tmp_path, offline.home)
    code, stdout, err = run_cli(["distill", "--dit", PIPE, "--classifier", offline.classifier, "--classes", "1",
                                 "--ipc", "1", "--out", "out", *FAST], capsys)
    assert code == 0, err
    changed = {p for p in set(tree(tmp_path, offline.home)) ^ set(before)}
    assert changed and all(Path(p).is_relative_to(tmp_path / "out") or Path(p).is_relative_to(tmp_path / "cao2-cache")
                           for p in changed), sorted(changed)
    models = json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["models"]
    assert models["dit"]["hub"] == models["vae"]["hub"] == PIPE and models["dit"]["revision"] == SHA_A
    assert str(offline.home) not in json.dumps(models)


def test_info_lists_the_cached_repositories(offline, tmp_path, capsys):
    code, out, _ = run_cli(["info", "--json", "--engine-dir", str(tmp_path)], capsys)
    assert code == 0
    listed = json.loads(out)["hub"]
    assert listed["cache"] == str(offline.home / "hub")
    repos = {r["repo"]: r for r in listed["repos"]}
    assert sorted(repos) == [BROKEN, ORIG, PIPE, VAE_REPO]
    revs = {r["commit"]: r for r in repos[PIPE]["revisions"]}
    assert revs[SHA_A]["refs"] == ["main"] and revs[SHA_B]["refs"] == ["v2"]
    assert revs[SHA_A]["use"] == ["--dit", "--vae"] and revs[SHA_A]["bytes"] > 0
    assert Path(revs[SHA_A]["path"]).name == SHA_A
    assert repos[VAE_REPO]["revisions"][0]["use"] == ["--vae"]
    assert repos[ORIG]["revisions"][0]["use"] == ["--dit"] and repos[BROKEN]["revisions"][0]["use"] == []
    code, text, _ = run_cli(["info", "--engine-dir", str(tmp_path)], capsys)
    assert code == 0 and "4 model repos cached" in text and f"{SHA_B[:12]} (v2)" in text and PIPE in text
