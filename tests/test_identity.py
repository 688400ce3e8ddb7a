"""Model identity hashes every byte of a checkpoint, once per file version."""

from __future__ import annotations

import json
import os

from cao2_fast import identity
from cao2_fast.identity import file_digest, weights_id


def test_a_checkpoint_changed_in_its_middle_changes_the_fingerprint(tmp_path):
    f = tmp_path / "dit.pt"
    data = bytearray(os.urandom(5 << 20))  # 5 MiB: the old first-and-last-MiB identity never read byte 2.5 MiB
    f.write_bytes(bytes(data))
    before = weights_id(f)["id"]
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new version of the file, as any write gives
    assert weights_id(f)["id"] != before


def test_digests_are_computed_once_per_file_version(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 1000)
    import hashlib

    first = file_digest(f)
    assert first == hashlib.sha256(b"x" * 1000).hexdigest()
    index = json.loads(identity.index_path().read_text())
    assert first in index.values()
    identity._MEMO.clear()  # a new process: only the on-disk index is left
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert file_digest(f) == first and not calls  # read from the index, not hashed again
    f.write_bytes(b"y" * 1000)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert file_digest(f) == real(b"y" * 1000).hexdigest() and calls


def test_a_folder_identity_covers_each_file_name_and_content(tmp_path):
    d = tmp_path / "vae"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "w.safetensors").write_bytes(b"abc")
    a = weights_id(d)
    (d / "w.safetensors").rename(d / "v.safetensors")
    assert weights_id(d)["id"] != a["id"] and weights_id(d)["bytes"] == a["bytes"] == 5
