"""Hostile inputs and destinations for eval, convert and selftest: each is one line on stderr, exit code 2, and
nothing written, overwritten or left half-written."""

from __future__ import annotations

import errno
import json
import shutil
import struct
import zlib

import pytest
from helpers import run_cli
from test_pipeline import make_distiller, snapshot


def one_line_exit_2(code: int, err: str, *needles: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------- hostile images


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def _png(width: int, height: int, extra: tuple[bytes, ...] = (), idat: bytes | None = None, colour: int = 2) -> bytes:
    """An 8-bit PNG of zeros (RGB, or grey with ``colour`` 0), ``extra`` chunks before its IDAT."""
    if idat is None:
        row = b"\0" * (1 + width * (3 if colour == 2 else 1))
        idat = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(extra) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _long_png() -> bytes:
    """40,000,000 × 1 grey pixels in about 39 KB: every row filter and pixel 0, deflated at level 9."""
    comp, block = zlib.compressobj(9), b"\0" * (1 << 20)
    parts = [comp.compress(b"\0")]
    parts += [comp.compress(block) for _ in range(40_000_000 // len(block))]
    parts += [comp.compress(b"\0" * (40_000_000 % len(block))), comp.flush()]
    return _png(40_000_000, 1, idat=b"".join(parts), colour=0)


def _bomb(ctype: bytes) -> bytes:
    """A zTXt or iCCP chunk of a few KB that inflates to 16 MiB."""
    head = b"comment\0\0" if ctype == b"zTXt" else b"icc\0\0"
    return _chunk(ctype, head + zlib.compress(b"\0" * (16 << 20), 9))


def _hostile(case: str) -> bytes:
    good = _png(16, 16)
    if case == "bad-crc":
        data = bytearray(good)
        data[good.index(b"IDAT") + 6] ^= 0xFF  # a byte of the image data, its CRC left as it was
        return bytes(data)
    if case == "truncated":
        return good[:good.index(b"IDAT") + 10]
    if case == "no-end":
        return good[:good.index(b"IEND") - 4]
    if case in ("ztxt-bomb", "iccp-bomb"):
        return _png(16, 16, (_bomb(b"zTXt" if case == "ztxt-bomb" else b"iCCP"),))
    assert case == "long"
    return _long_png()


EXPECTED = {"bad-crc": "bad CRC in its 'IDAT' chunk", "truncated": "runs past the end of the file",
            "no-end": "ends before its IEND chunk", "ztxt-bomb": "zTXt chunk inflates to more than",
            "iccp-bomb": "iCCP chunk inflates to more than", "long": "40000000×1 pixels"}


@pytest.fixture(scope="module")
def long_png() -> bytes:
    return _long_png()


def _folder(root, names=("a", "b"), per_class: int = 2):
    for c in names:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(_png(16, 16))
    return root


@pytest.fixture
def decoded(monkeypatch):
    """The files whose pixels Pillow decoded (``ImageFile.load`` called for them)."""
    from PIL import ImageFile

    seen, real = [], ImageFile.ImageFile.load

    def spy(self):
        seen.append(str(getattr(self, "filename", "")))
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


@pytest.mark.parametrize("case, where", [(c, "distilled") for c in EXPECTED]
                         + [("bad-crc", "val"), ("iccp-bomb", "val"), ("long", "val")])
def test_a_hostile_image_is_one_line_naming_it_and_is_never_decoded(case, where, tmp_path, capsys, decoded,
                                                                    long_png):
    from PIL import Image, ImageFile, PngImagePlugin

    distilled, val = _folder(tmp_path / "set"), _folder(tmp_path / "val")
    bad = (distilled if where == "distilled" else val) / "b" / "1.png"
    bad.write_bytes(long_png if case == "long" else _hostile(case))
    before = snapshot(tmp_path)
    settings = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, PngImagePlugin.MAX_TEXT_CHUNK,
                PngImagePlugin.MAX_TEXT_MEMORY)
    code, _, err = run_cli(["eval", "--distilled", str(distilled), "--val", str(val), "--protocol", "hard",
                            "--student", "test_resnet", "--image-size", "16", "--output-stride", "8",
                            "--device", "cpu", "--no-progress"], capsys)
    one_line_exit_2(code, err, f"error: {bad}: cannot read image (", EXPECTED[case])
    assert str(bad) not in decoded
    if where == "val":  # the spy sees what is decoded: the distilled images were
        assert str(distilled / "a" / "0.png") in decoded
    assert snapshot(tmp_path) == before  # no record beside the set, nothing else
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, PngImagePlugin.MAX_TEXT_CHUNK,
            PngImagePlugin.MAX_TEXT_MEMORY) == settings  # read, never changed


@pytest.mark.parametrize("case", ["truncated", "iccp-bomb", "long"])
def test_permissive_pillow_settings_of_the_caller_do_not_let_them_through(case, tmp_path, monkeypatch, long_png):
    """A program that turned Pillow's guards off (truncated images allowed, no pixel limit, huge text chunks)
    still gets the refusal from the reader."""
    from PIL import Image, ImageFile, PngImagePlugin

    from cao2_fast.errors import UserError
    from cao2_fast.eval.data import load_image_folder

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_CHUNK", 1 << 40)
    root = _folder(tmp_path / "set")
    (root / "a" / "0.png").write_bytes(long_png if case == "long" else _hostile(case))
    with pytest.raises(UserError, match=EXPECTED[case]) as exc:
        load_image_folder(root, size=16)
    assert "\n" not in str(exc.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.MAX_IMAGE_PIXELS is None  # left as the caller set them


# ----------------------------------------------------------------------------------------------- eval --out


@pytest.fixture
def toy_eval(tmp_path):
    """A distilled set and a val set (two classes of 16×16 images): the eval command line's data."""
    distilled, val = _folder(tmp_path / "runs" / "toy"), _folder(tmp_path / "val")
    args = ["eval", "--distilled", str(distilled), "--val", str(val), "--protocol", "hard", "--student",
            "test_resnet", "--image-size", "16", "--output-stride", "8", "--epochs", "1", "--repeats", "1",
            "--device", "cpu", "--no-progress"]
    return distilled, args


def test_eval_out_refuses_a_file_it_did_not_write(toy_eval, tmp_path, capsys):
    distilled, args = toy_eval
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    before = snapshot(tmp_path)
    code, _, err = run_cli([*args, "--out", str(notes)], capsys)
    one_line_exit_2(code, err, str(notes), "is not an eval record", '"kind": "cao2-fast eval record"')
    default = distilled.parent / "toy-eval-hard-test_resnet.json"  # the default name, taken by someone else's file
    default.write_text("[1, 2, 3]")
    code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, str(default), "is not an eval record")
    assert snapshot(tmp_path) == dict(before, **{str(default.relative_to(tmp_path)): b"[1, 2, 3]"})


def test_eval_replaces_its_own_record(toy_eval, tmp_path, capsys):
    from cao2_fast.eval.api import RECORD_KIND, is_eval_record, write_record

    _, args = toy_eval
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"kind": RECORD_KIND, "key": "0" * 16, "top1": [1.0]}))
    code, out, err = run_cli([*args, "--out", str(mine), "--dry-run"], capsys)
    assert code == 0 and "result file" in out, err  # accepted
    write_record({"kind": RECORD_KIND, "key": "1" * 16, "top1": [2.0]}, mine)
    assert json.loads(mine.read_text())["key"] == "1" * 16 and is_eval_record(json.loads(mine.read_text()))
    assert not list(tmp_path.glob(".mine.json*"))  # no temporary left beside it


def test_eval_out_inside_the_distilled_set_is_refused_however_it_is_spelled(toy_eval, tmp_path, capsys):
    distilled, args = toy_eval
    (tmp_path / "link").symlink_to(distilled, target_is_directory=True)
    before = snapshot(tmp_path)
    for out in (distilled / "r.json", distilled / "a" / "r.json", tmp_path / "val" / ".." / "runs" / "toy" / "r.json",
                tmp_path / "link" / "r.json", tmp_path / "link" / "a" / ".." / "r.json"):
        code, _, err = run_cli([*args, "--out", str(out)], capsys)
        one_line_exit_2(code, err, "must lie outside the distilled set")
    assert snapshot(tmp_path) == before


def test_eval_does_not_overwrite_a_file_that_appears_while_it_trains(toy_eval, tmp_path, monkeypatch, capsys):
    from cao2_fast.eval import api

    _, args = toy_eval
    out = tmp_path / "r.json"

    def train(job, **kw):  # someone writes the file while the students train
        out.write_text("theirs")
        return api.summarise(dict(job.record, top1=[50.0], final_top1=[50.0], seconds_per_repeat=[1.0]))

    monkeypatch.setattr(api, "run", train)
    code, _, err = run_cli([*args, "--out", str(out)], capsys)
    one_line_exit_2(code, err, str(out), "is not an eval record")
    assert out.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "runs", "val"]


# ------------------------------------------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def finished(tmp_path_factory, single_thread):
    out = tmp_path_factory.mktemp("hostile") / "set"
    make_distiller().run(out)  # classes 0000, 0002, 0004; IPC 2
    return out


@pytest.fixture
def edited(finished, tmp_path):
    """A copy of the finished set and a function that rewrites its manifest."""
    out = tmp_path / "set"
    shutil.copytree(finished, out)

    def edit(change):
        m = json.loads((out / "manifest.json").read_text())
        change(m)
        (out / "manifest.json").write_text(json.dumps(m))

    return out, edit


def _convert_refused(out, capsys, *needles, to="webdataset", extra=()):
    before = snapshot(out.parent)
    code, _, err = run_cli(["convert", str(out), "--to", to, *extra], capsys)
    line = one_line_exit_2(code, err, *needles)
    assert snapshot(out.parent) == before
    return line


def test_convert_refuses_a_trimmed_class_list(edited, capsys):
    out, edit = edited
    edit(lambda m: m.update(classes=m["classes"][:2]))  # classes [0000, 0002] of a 3-class config
    _convert_refused(out, capsys, "lists 2 classes but its config has 3", "0004", "partial set")


def test_convert_refuses_a_config_trimmed_with_its_class_list(edited, monkeypatch, capsys):
    from cao2_fast import convert

    out, edit = edited

    def trim(m):
        m["classes"] = m["classes"][:2]
        m["config"]["class_names"], m["config"]["class_ids"] = ["0000", "0002"], [0, 2]

    edit(trim)
    _convert_refused(out, capsys, "does not match its fingerprint")
    # a config this version cannot rebuild: the class folder of the set on disk that the manifest leaves out
    monkeypatch.setattr(convert, "_config_fingerprint", lambda config: None)
    _convert_refused(out, capsys, f"{out / '0004'}: a class of this set", "does not list")


@pytest.mark.parametrize("name", ["../set-elsewhere", "/etc", "a/../0000", ".."])
def test_convert_refuses_class_names_that_are_not_plain_folder_names(name, edited, capsys):
    out, edit = edited
    other = out.parent / "set-elsewhere"
    shutil.copytree(out / "0004", other)  # what a "../" name would point at

    def rename(m):
        m["classes"][2]["class_name"] = name
        m["config"]["class_names"][2] = name

    edit(rename)
    _convert_refused(out, capsys, f"class name {name!r} is not a plain folder name")


def test_convert_refuses_an_existing_file_as_destination(finished, tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.write_text("keep")
    code, _, err = run_cli(["convert", str(finished), "--to", "webdataset", "--dest", str(dest)], capsys)
    one_line_exit_2(code, err, f"{dest}: already exists")
    assert dest.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


@pytest.mark.parametrize("failure", ["read-only", "disk-full"])
def test_convert_into_an_unwritable_destination_is_one_line_and_leaves_nothing(failure, finished, tmp_path,
                                                                               monkeypatch, capsys):
    from cao2_fast import convert

    if failure == "read-only":
        def mkdtemp(*a, **kw):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(convert.tempfile, "mkdtemp", mkdtemp)
        needle = "Read-only file system"
    else:
        def full(manifest, samples, tmp, shard_size):
            (tmp / "shard-000000.tar").write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(convert, "_webdataset", full)
        needle = "No space left on device"
    dest = tmp_path / "out" / "wds"
    code, _, err = run_cli(["convert", str(finished), "--to", "webdataset", "--dest", str(dest)], capsys)
    one_line_exit_2(code, err, str(dest), needle)
    assert not list(tmp_path.iterdir())  # no hidden build folder, not even the folder made on the way to it


def test_convert_never_renames_over_something_that_appeared_meanwhile(finished, tmp_path, monkeypatch, capsys):
    from cao2_fast import convert

    dest = tmp_path / "wds"
    real = convert._webdataset

    def racing(manifest, samples, tmp, shard_size):
        real(manifest, samples, tmp, shard_size)
        dest.mkdir()  # an empty folder: a plain rename(2) would replace it

    monkeypatch.setattr(convert, "_webdataset", racing)
    code, _, err = run_cli(["convert", str(finished), "--to", "webdataset", "--dest", str(dest)], capsys)
    one_line_exit_2(code, err, f"{dest}: appeared while the set was being converted")
    assert dest.is_dir() and not list(dest.iterdir()) and [p.name for p in tmp_path.iterdir()] == ["wds"]


# ------------------------------------------------------------------------------------------------ selftest


@pytest.mark.parametrize("case", ["file", "below-a-file", "foreign-record"])
def test_selftest_out_must_be_a_folder_and_its_record_ours(case, tmp_path, capsys):
    target = tmp_path / "f"
    target.write_text("not a folder")
    out = {"file": target, "below-a-file": target / "sub", "foreign-record": tmp_path}[case]
    if case == "foreign-record":
        (tmp_path / "selftest.json").write_text('{"mine": 1}')
    before = snapshot(tmp_path)
    code, _, err = run_cli(["selftest", "--device", "cpu", "--out", str(out)], capsys)
    one_line_exit_2(code, err, "selftest.json: exists and was not written by selftest" if case == "foreign-record"
                    else "--out takes a folder")
    assert snapshot(tmp_path) == before
