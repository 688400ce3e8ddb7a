"""Models named by their Hugging Face Hub id (``org/name``, or ``org/name@revision`` for a branch, tag or commit),
resolved through ``huggingface_hub`` into its cache.

A name is a Hub id only when no local file or folder of that name exists and it has the shape of one; a local path
always wins. Resolution asks the Hub which files the revision holds (or, offline, what the cache holds), lets the
caller's loader pick the files it reads, and has ``snapshot_download`` fetch only those. Everything else is
``huggingface_hub``'s: the cache (``HF_HOME``, ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE``, the token (``HF_TOKEN`` or
``hf auth login``) and the endpoint (``HF_ENDPOINT`` for a mirror), read from the environment when it is first
imported, as in diffusers and timm. When the Hub cannot be reached, the cached snapshot of the revision is used.
Every failure is one ``UserError`` line naming the id and the fix; ``huggingface_hub``'s own log lines and
warnings stay quiet, and its progress bars are drawn on a terminal only.

A Hub model's identity (:meth:`Snapshot.identity`) is its id, the commit it resolved to and the SHA-256 and size
of each file read, never a cache path: the same revision gives the same identity on any machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError
from .identity import file_digest

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,254}")
COMMIT = re.compile(r"[0-9a-f]{40}")

# (the path to load relative to the snapshot, ``""`` for its root; the files that load reads) for each model a
# repository supplies, keyed by role ("dit", "vae")
Parts = dict[str, tuple[str, list[str]]]


@dataclass(frozen=True)
class HubRef:
    """A Hub model id and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse(name: str | Path | None) -> HubRef | None:
    """The Hub id ``name`` stands for, or None when it is a local path: a ``Path`` object, an existing file or
    folder, or text that is not shaped ``org/name[@revision]`` (letters, digits, ``-``, ``_``, ``.``)."""
    if name is None or not isinstance(name, str):
        return None
    try:
        if Path(name).expanduser().exists():
            return None
    except (OSError, ValueError):  # a name too long for a path, a NUL byte
        pass
    repo_id, at, revision = name.partition("@")
    if not _is_repo_id(repo_id):
        return None
    if at and not (_REVISION.fullmatch(revision) and ".." not in revision and not revision.endswith("/")):
        raise UserError(f"{name}: no such local path, and {revision!r} is not a Hub revision (a branch, tag or "
                        "commit sha after the '@')")
    return HubRef(repo_id, revision if at else None)


def _is_repo_id(text: str) -> bool:
    return (len(text) <= 96 and _REPO_ID.fullmatch(text) is not None and "--" not in text and ".." not in text
            and not text.endswith(".git"))


@dataclass(frozen=True)
class Snapshot:
    """A resolved Hub model: the commit the revision names, its snapshot folder in the cache, and for each role
    (``dit``, ``vae``) the path to load and the files read."""

    ref: HubRef
    commit: str
    folder: Path
    parts: Parts = field(default_factory=dict)

    def path(self, role: str) -> Path:
        return self.folder / self.parts[role][0] if self.parts[role][0] else self.folder

    def identity(self, role: str) -> dict:
        """What a config's fingerprint records of the ``role`` model: the id, the resolved commit, and the SHA-256
        and size of every file read (hashed in full, as for local weights)."""
        files = {}
        for name in sorted(self.parts[role][1]):
            f = self.folder / name
            files[name] = {"sha256": file_digest(f), "size": f.stat().st_size}
        return {"hub": self.ref.repo_id, "revision": self.commit, "files": files}


def resolve(ref: HubRef, what: str, choose: Callable[[set[str], Callable[[], dict]], Parts]) -> Snapshot:
    """The snapshot of ``ref`` with the files ``choose`` picks from the revision's file list (it is also given a
    reader of the repository's ``model_index.json``), fetched into the Hugging Face cache unless already there.
    ``what`` names the model in errors ("DiT", "VAE"). Every failure is one ``UserError`` line."""
    try:
        with _quiet():
            return _resolve(ref, what, choose)
    except UserError:
        raise
    except Exception as e:
        line = explain(e, ref)
        if line is None:
            raise
        raise UserError(line) from None


def _resolve(ref: HubRef, what: str, choose) -> Snapshot:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    names = commit = None
    unreachable: Exception | None = None
    if not offline():
        try:
            info = HfApi().model_info(ref.repo_id, revision=ref.revision)
            names, commit = {s.rfilename for s in info.siblings or []}, info.sha
        except Exception as e:
            if _revision_missing(e) or explain(e, ref) is None:
                raise
            unreachable = e  # not reachable, not allowed, not there: the cache may still hold it, as for diffusers
    local = names is None
    if local:
        commit, names = _cached_listing(ref)
        if commit is None:
            if unreachable is not None and not (_network(unreachable) or _is_offline_error(unreachable)):
                raise unreachable  # no such repository, gated, the Hub failing: its own line
            raise UserError(_not_cached(ref, unreachable))

    @functools.cache
    def read_index() -> dict:
        from .models.weights import PIPELINE_INDEX, read_json_object

        file = hf_hub_download(ref.repo_id, PIPELINE_INDEX, revision=commit, cache_dir=cache_dir(),
                               local_files_only=local)  # a few kB: its bar, if any, is drawn on a terminal only
        return read_json_object(Path(file), "a diffusers pipeline model_index.json")

    try:
        parts = choose(names, read_index)
    except LookupError as e:
        raise UserError(_incomplete(ref, what, commit, str(e), local)) from None
    wanted = sorted({f for _, files in parts.values() for f in files})
    folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache_dir(), allow_patterns=wanted,
                                    local_files_only=local, tqdm_class=_bars()))
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing:
        raise UserError(_incomplete(ref, what, folder.name, f"no {', '.join(missing[:3])}", True))
    return Snapshot(ref, folder.name, folder, parts)


def timm_identity(model) -> dict:
    """What a config's fingerprint records of a timm model built with its pretrained weights: the Hub id and the
    commit its weights came from (timm fetches them into the Hugging Face cache), so a new revision of the weights is
    a new config; where timm took them from elsewhere, the source it names."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    repo_id = cfg.get("hf_hub_id")
    if repo_id:
        repo_id, _, revision = str(repo_id).partition("@")
        commit, _ = _cached_listing(HubRef(repo_id, revision or None))
        return {"hub": repo_id, "revision": commit}
    source = cfg.get("url") or cfg.get("file")
    return {"pretrained": str(source)} if source else {}


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as ``huggingface_hub`` reads it."""
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The Hugging Face Hub cache ``huggingface_hub`` uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``), passed to each of
    its calls here: one of its modules keeps the value it found at import."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _storage(repo_id: str) -> Path:
    return cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _cached_listing(ref: HubRef) -> tuple[str | None, set[str]]:
    """(commit, files of the repository at that commit) from the cache, as ``snapshot_download`` resolves a
    revision there: a commit sha as it is, a branch or tag through ``refs/``. The file list is the tree listing
    ``huggingface_hub`` keeps of a download where there is one, else what the snapshot folder holds. (None, ...)
    when the revision is not cached."""
    storage = _storage(ref.repo_id)
    revision = ref.revision or "main"
    commit: str | None = revision if COMMIT.fullmatch(revision) else None
    if commit is None:
        try:
            commit = (storage / "refs" / revision).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None, set()
    snapshot = storage / "snapshots" / commit
    if not COMMIT.fullmatch(commit) or not snapshot.is_dir():
        return None, set()
    try:
        from huggingface_hub import get_cached_repo_tree

        return commit, {f.path for f in get_cached_repo_tree(ref.repo_id, revision=commit, cache_dir=cache_dir())}
    except Exception:  # no listing kept (an older huggingface_hub, a hand-made cache): the folder says what is there
        return commit, {f.relative_to(snapshot).as_posix() for f in snapshot.rglob("*") if f.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# One line per failure


def _cli(command: str) -> str:
    """``command`` of the Hub's command line as the installed huggingface_hub spells it (``hf`` from 1.0 on)."""
    import huggingface_hub

    if huggingface_hub.__version__.split(".")[0].isdigit() and int(huggingface_hub.__version__.split(".")[0]) >= 1:
        return f"hf {command}"
    return "huggingface-cli " + command.replace("auth login", "login")


def _download_hint(ref: HubRef) -> str:
    rev = f" --revision {ref.revision}" if ref.revision else ""
    return f"`{_cli('download')} {ref.repo_id}{rev}`"


def _hub_errors():
    """``huggingface_hub``'s exception classes (``huggingface_hub.errors``, in ``utils`` before it existed)."""
    try:
        from huggingface_hub import errors
    except ImportError:
        from huggingface_hub import utils as errors
    return errors


def _not_cached(ref: HubRef, why: Exception | None) -> str:
    if (why is None and offline()) or (why is not None and _is_offline_error(why)):
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = f"the Hub cannot be reached ({type(why).__name__ if why is not None else 'no connection'})"
    return (f"{ref}: no such local path, and not in the Hugging Face cache ({cache_dir()}) while {reason}; run "
            f"{_download_hint(ref)} once with network access (or this command once online), then run with "
            "HF_HUB_OFFLINE=1")


def _incomplete(ref: HubRef, what: str, commit: str | None, problem: str, cached: bool) -> str:
    """The line for a repository that lacks what the loader reads (``problem``: "no FILE (...)", or why the
    files are not one model), as the cached snapshot of ``commit`` or as the Hub lists it."""
    if not problem.startswith("no "):
        return f"{ref}: {'the cached snapshot ' + str(commit)[:12] if cached else 'the Hub repository'} holds {problem}"
    if cached:
        return (f"{ref}: the cached snapshot {str(commit)[:12]} ({cache_dir()}) has {problem}; complete it with "
                f"{_download_hint(ref)} once with network access, then run with HF_HUB_OFFLINE=1")
    return f"{ref}: the Hub repository has {problem}; is it a {what}?"


def explain(e: Exception, ref: HubRef) -> str | None:
    """The one line for an exception of ``huggingface_hub`` (or of its HTTP client) met while resolving ``ref``;
    None for anything else."""
    from huggingface_hub import constants

    hub_errors = _hub_errors()
    endpoint = constants.ENDPOINT
    gated = getattr(hub_errors, "GatedRepoError", ())
    if gated and isinstance(e, gated):
        return (f"{ref}: a gated Hub repository; accept its conditions at {endpoint}/{ref.repo_id} with your "
                f"account, then set HF_TOKEN to a token of that account (or run `{_cli('auth login')}`)")
    if isinstance(e, getattr(hub_errors, "DisabledRepoError", ())):
        return f"{ref}: the Hub repository is disabled by its owner ({endpoint}/{ref.repo_id})"
    if isinstance(e, hub_errors.RepositoryNotFoundError):
        return (f"{ref}: no such local path, and no model repository of that name on the Hugging Face Hub "
                f"({endpoint}); check the id, or set HF_TOKEN if the repository is private")
    if _revision_missing(e):
        return (f"{ref}: the Hub repository {ref.repo_id} has no revision {ref.revision or 'main'!r} (give a branch, "
                "tag or commit sha after the '@')")
    incomplete = getattr(hub_errors, "IncompleteSnapshotError", ())
    if incomplete and isinstance(e, incomplete):
        found = re.search(r"missing \((.*?)\)", str(e))
        return _incomplete(ref, "", _commit_in(str(e)), f"no {found.group(1) if found else 'files it needs'}", True)
    if isinstance(e, hub_errors.LocalEntryNotFoundError):
        return _not_cached(ref, e.__cause__ if isinstance(e.__cause__, Exception) else None)
    if isinstance(e, hub_errors.EntryNotFoundError):
        return f"{ref}: the Hub repository lacks a file the loader reads ({_first_line(e)})"
    if _is_offline_error(e) or _network(e):
        return _not_cached(ref, e)
    if isinstance(e, hub_errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return (f"{ref}: the Hugging Face Hub ({endpoint}) answered HTTP {status} ({_first_line(e)}); try again "
                f"later, or run {_download_hint(ref)} where it works and then HF_HUB_OFFLINE=1")
    if isinstance(e, getattr(hub_errors, "HFValidationError", ())):
        return f"{ref}: huggingface_hub does not take it as a Hub id ({_first_line(e)})"
    if isinstance(e, OSError):
        return (f"{ref}: cannot use the Hugging Face cache {cache_dir()} ({e.strerror or type(e).__name__}); set "
                "HF_HOME to a writable folder")
    return None


def _revision_missing(e: Exception) -> bool:
    return isinstance(e, _hub_errors().RevisionNotFoundError)


def _is_offline_error(e: Exception) -> bool:
    return isinstance(e, _hub_errors().OfflineModeIsEnabled)


def _network(e: Exception) -> bool:
    """A connection that failed or timed out (the HTTP client's own errors, or the standard library's)."""
    return (isinstance(e, (ConnectionError, TimeoutError))
            or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"))


def _commit_in(text: str) -> str | None:
    found = re.search(r"\b[0-9a-f]{40}\b", text)
    return found.group(0) if found else None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


# ---------------------------------------------------------------------------------------------------------------
# What the cache holds


def cached_models() -> dict:
    """Every model repository in the Hugging Face cache: id, size, path, and its revisions (commit, the branches
    and tags that name it, size, snapshot path, files). ``error`` says why the cache could not be read."""
    from huggingface_hub import scan_cache_dir

    root = cache_dir()
    out: dict = {"cache": str(root), "repos": []}
    if not root.is_dir():
        return out
    try:
        with _quiet():
            info = scan_cache_dir(root)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {_first_line(e)}"
        return out
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = []
        for rev in sorted(repo.revisions, key=lambda r: (-r.last_modified, r.commit_hash)):
            snap = Path(rev.snapshot_path)
            revisions.append({"commit": rev.commit_hash, "refs": sorted(rev.refs), "bytes": rev.size_on_disk,
                              "path": str(snap),
                              "files": sorted(Path(f.file_path).relative_to(snap).as_posix() for f in rev.files)})
        out["repos"].append({"repo": repo.repo_id, "bytes": repo.size_on_disk, "path": str(repo.repo_path),
                             "revisions": revisions})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Quiet calls


def _bars():
    """``huggingface_hub``'s progress bar class, switched off unless stderr is a terminal (and progress is on)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    if sys.stderr.isatty() and not os.environ.get("CAO2_FAST_NO_PROGRESS") and os.environ.get("RANK", "0") == "0":
        return hub_tqdm

    class Silent(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


@contextlib.contextmanager
def _quiet():
    """No log line or warning of ``huggingface_hub`` reaches the terminal while it resolves a model."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)
