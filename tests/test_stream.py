"""The pipeline API without a folder: Distiller.stream and the DistilledClasses dataset (tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import make_distiller

from cao2_fast.data import DistilledClasses
from cao2_fast.errors import UserError


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "out"
    make_distiller(class_ids=(0, 1, 2, 3, 4)).run(out)
    return out


def pixels(out, name):
    return np.stack([np.asarray(Image.open(out / name / f"{i}.png").convert("RGB")) for i in range(2)])


def test_stream_yields_each_group_as_soon_as_it_is_done_with_the_cli_bytes(on_disk):
    d = make_distiller(class_ids=(0, 1, 2, 3, 4))  # 2 classes per group: [0, 1], [2, 3], [4]
    done = []
    real = d.distill
    d.distill = lambda group, bars=None: done.append(list(group)) or real(group, bars)
    it = d.stream()
    first = next(it)
    assert first.class_id == 0 and done == [[0, 1]]  # only the first group was computed so far
    outs = [first, *it]
    assert [o.class_id for o in outs] == [0, 1, 2, 3, 4] and done == [[0, 1], [2, 3], [4]]
    for o in outs:
        assert o.failure is None and o.images_uint8.dtype == torch.uint8 and o.images_uint8.shape == (2, 16, 16, 3)
        assert (o.images_uint8.numpy() == pixels(on_disk, o.class_name)).all()
        assert o.images.min() >= -1 and o.images.max() <= 1 and o.stage1_images.shape == (2, 3, 16, 16)
        assert [r["class_id"] for r in o.records] == [o.class_id] * 2 and "sha256" not in o.records[0]


def test_stream_of_some_classes_gives_their_cli_bytes_and_refuses_unknown_ones(on_disk):
    d = make_distiller(class_ids=(0, 1, 2, 3, 4))
    (o,) = list(d.stream([3]))
    assert o.class_id == 3 and (o.images_uint8.numpy() == pixels(on_disk, "0003")).all()
    with pytest.raises(UserError, match="class 7 is not in the config"):
        list(d.stream([1, 7]))


def test_the_dataset_under_two_workers_covers_every_class_once_with_one_process_bytes(single_thread):
    """A DataLoader worker runs torch on one thread, and on CPU some kernels round differently with the thread
    count (oneDNN's 1×1 convolutions in the tiny random VAE do), so the workers' bytes are compared with one process
    streaming every class on one thread: splitting the classes over workers changes nothing else."""
    want = {o.class_id: o.images_uint8.numpy() for o in make_distiller(class_ids=(0, 1, 2, 3, 4)).stream()}
    ds = DistilledClasses(lambda: make_distiller(class_ids=(0, 1, 2, 3, 4)))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    seen = sorted(((o.class_id, o.images_uint8.numpy()) for o in loader), key=lambda x: x[0])
    assert [c for c, _ in seen] == [0, 1, 2, 3, 4]
    for c, px in seen:
        assert (px == want[c]).all()


def test_ranks_split_the_blocks_deterministically_and_disjointly():
    made = lambda: make_distiller(class_ids=(0, 1, 2, 3, 4))  # noqa: E731
    shards = [DistilledClasses(made, rank=r, world_size=2).blocks() for r in (0, 1)]
    assert shards == [[[0, 1], [4]], [[2, 3]]]
    assert DistilledClasses(made, class_ids=[4, 1], rank=1, world_size=2).blocks() == [[4]]
    with pytest.raises(UserError, match="rank 2 is outside world_size 2"):
        DistilledClasses(made, rank=2, world_size=2)


def test_api_errors_are_one_line_value_errors():
    from cao2_fast.pipeline import Distiller

    with pytest.raises(ValueError, match="unknown setting 'guidance': valid overrides are .*guidance_scale"):
        Distiller.from_preset("digits", guidance=2.0)
    with pytest.raises(UserError, match="class id 12 is not in the digits preset"):
        Distiller.from_preset("digits", class_ids=[12])


def test_a_distiller_is_ready_on_the_device_it_names_and_refuses_a_missing_one(monkeypatch):
    from cao2_fast.pipeline import Distiller

    d = Distiller.from_preset("digits", ipc=1, class_ids=[0], dtype="bfloat16")
    for m in (d.dit, d.vae, d.classifier):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}  # moved and cast at construction
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device cuda: no CUDA device is available"):
        Distiller.from_preset("digits", ipc=1, class_ids=[0], device="cuda")
    with pytest.raises(ValueError, match="device 'tpu'"):
        Distiller.from_preset("digits", ipc=1, class_ids=[0], device="tpu")


def test_to_moves_every_model(monkeypatch):
    """With CUDA mocked present, construction calls .to on each model with the device it names."""
    from cao2_fast.pipeline import Distiller

    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    real = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append((type(self).__name__, a)) or self)
    Distiller.from_preset("digits", ipc=1, class_ids=[0], device="cuda")
    monkeypatch.setattr(torch.nn.Module, "to", real)
    names = {n for n, a in moved if a and a[0] == torch.device("cuda")}
    assert {"DiT", "VAE", "Classifier"} <= names
