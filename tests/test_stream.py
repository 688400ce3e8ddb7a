"""The pipeline API without a folder: Distiller.stream and the DistilledClasses dataset (tiny random models)."""

from __future__ import annotations

import datetime
import functools
import multiprocessing
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from test_pipeline import make_distiller

from cao2_fast import data
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
    real = d.compute
    d.compute = lambda group, bars=None: done.append(list(group)) or real(group, bars)
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


FIVE = (0, 1, 2, 3, 4)  # 2 classes per stage-1 group
CONFIGS = {"three blocks": dict(class_ids=FIVE),  # [0, 1], [2, 3], [4]
           "two blocks": dict(class_ids=FIVE, stage2_batch=8),  # [0, 1, 2, 3], [4]
           "one block": dict(class_ids=FIVE, stage2_batch=10),  # [0, 1, 2, 3, 4]
           "even blocks": dict(class_ids=(0, 1, 2, 3), stage2_batch=4)}  # [0, 1], [2, 3]


@pytest.fixture(scope="module")
def one_process(single_thread):
    """Each config's classes streamed by one process on one thread. A DataLoader worker runs torch on one thread,
    and on CPU some kernels round differently with the thread count (oneDNN's 1×1 convolutions in the tiny random
    VAE do), so workers are compared with this: splitting the classes changes nothing else."""
    return {name: {o.class_id: o.images_uint8.numpy() for o in make_distiller(**kw).stream()}
            for name, kw in CONFIGS.items() if name != "even blocks"}


def factory(name):
    return functools.partial(make_distiller, **CONFIGS[name])


@pytest.mark.parametrize("name, world, shares", [
    ("two blocks", 2, [[0, 1, 2], [0, 3, 4]]),  # blocks dealt: 4 classes against 1, so equal slices (padded)
    ("two blocks", 3, [[0, 1], [2, 3], [4, 0]]),  # a rank yields block by block: [4] before [0, 1, 2, 3]
    ("one block", 2, [[0, 1, 2], [0, 3, 4]]),
    ("one block", 3, [[0, 1], [2, 3], [0, 4]]),
    ("even blocks", 2, [[0, 1], [2, 3]]),  # whole blocks come out even: each rank computes one block
    ("one block", 7, [[0], [1], [2], [3], [4], [0], [1]]),  # more ranks than classes: padded, one each
])
def test_ranks_get_equal_non_empty_shares_and_no_rank_computes_a_block_twice(monkeypatch, name, world, shares):
    ds = DistilledClasses(factory(name))
    assert ds.shares(world) == shares  # nothing computed: the config's blocks are enough
    blocks = ds.distiller().blocks()
    for rank, share in enumerate(shares):
        touched = [b for b in blocks if set(b) & set(share)]
        for workers in (1, 2):
            split = []
            for w in range(workers):
                monkeypatch.setattr(data, "get_worker_info", lambda w=w: SimpleNamespace(num_workers=workers, id=w))
                split += DistilledClasses(ds.distiller(), rank=rank, world_size=world).blocks()
            assert sorted(split) == sorted(touched)  # every block of the share, each by one worker of the rank


@pytest.mark.parametrize("name, world", [("two blocks", 3), ("one block", 2)])
def test_each_rank_under_two_workers_yields_its_share_with_one_process_bytes(one_process, name, world):
    counts = []
    for rank, share in enumerate(DistilledClasses(factory(name)).shares(world)):
        ds = DistilledClasses(factory(name), rank=rank, world_size=world)
        items = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
        assert sorted(i["class_id"] for i in items) == sorted(share)
        for i in items:
            assert (i["images_uint8"].numpy() == one_process[name][i["class_id"]]).all()
        counts.append(len(items))
    assert len(set(counts)) == 1 and counts[0] >= 1


def test_items_collate_at_batch_size_one_and_none_and_through_accelerate(one_process):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    want = one_process["three blocks"]
    ds = DistilledClasses(factory("three blocks"))
    batched = list(torch.utils.data.DataLoader(ds, num_workers=2))  # default collate in the workers, batch_size=1
    assert sorted(int(b["class_id"]) for b in batched) == list(FIVE)
    for b in batched:
        c = int(b["class_id"])
        assert (b["images_uint8"][0].numpy() == want[c]).all() and b["labels"].tolist() == [[c, c]]
        assert b["images"].shape == (1, 2, 3, 16, 16) and b["class_name"] == [f"{c:04d}"]
    plain = list(torch.utils.data.DataLoader(ds, batch_size=None))
    assert [i["class_id"] for i in plain] == list(FIVE)
    rec = plain[0]["records"]
    assert rec["candidate_index"].dtype == torch.int64 and rec["prob_after"].dtype == torch.float64
    assert rec["stage2_status"] == ["ok", "ok"] and rec["class_id"].tolist() == [0, 0]
    for i in plain:
        assert (i["images_uint8"].numpy() == want[i["class_id"]]).all()
        assert i["images"].dtype == torch.float32 and i["stage1_images"].shape == (2, 3, 16, 16)
    try:
        acc = Accelerator(cpu=True)
        for bs in (1, None):
            got = list(acc.prepare(torch.utils.data.DataLoader(ds, batch_size=bs)))
            ids = [int(g["class_id"]) for g in got]
            assert ids == list(FIVE), bs
            assert (np.asarray(got[-1]["images_uint8"]).reshape(2, 16, 16, 3) == want[4]).all()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_failed_class_is_no_item_and_stops_the_dataset_with_one_line():
    d = make_distiller(class_ids=FIVE)
    real = d.compute

    def one_fails(block, bars=None):
        out = real(block, bars)
        for r in out:
            if r.class_id == 3:  # as compute reports a class whose decoded images are not finite
                r.failure = "a decoded stage-2 image is not finite (NaN/Inf in the decoder output)"
                r.images_uint8 = r.images = r.stage1_images = None
        return out

    d.compute = one_fails
    (bad,) = [o for o in d.stream() if o.failure is not None]  # stream still yields it, marked
    assert bad.class_id == 3 and bad.images is None
    it = iter(DistilledClasses(d))
    assert [next(it)["class_id"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(UserError, match=r"^class 3 \(0003\) cannot be a training item, it failed: a decoded") as e:
        next(it)
    assert "\n" not in str(e.value)


def test_bad_arguments_and_an_uninitialised_torchrun_are_one_line_user_errors(monkeypatch):
    made = factory("three blocks")
    cases = [(lambda: DistilledClasses(5), "needs a Distiller or a zero-argument callable .*got int"),
             (lambda: DistilledClasses(made, class_ids=[True]), r"class_ids must be whole numbers \(got True\)"),
             (lambda: DistilledClasses(made, class_ids="0"), "class_ids must be a list of whole numbers"),
             (lambda: DistilledClasses(made, class_ids=[]), "class_ids is empty"),
             (lambda: DistilledClasses(made, rank=2, world_size=2), "rank 2 is outside world_size 2"),
             (lambda: DistilledClasses(made, rank=0), "give both rank and world_size"),
             (lambda: DistilledClasses(made, rank="0", world_size=2), "rank must be a whole number"),
             (lambda: DistilledClasses.from_preset("nope"), "unknown preset 'nope'"),
             (lambda: list(DistilledClasses(lambda: 5)), "the distiller factory returned int, not a Distiller"),
             (lambda: list(DistilledClasses(made, class_ids=[7])), "class 7 is not in the config")]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    built = []
    ds = DistilledClasses(lambda: built.append(1) or make_distiller(class_ids=FIVE))
    with pytest.raises(UserError, match=r"WORLD_SIZE=2 but torch.distributed is not initialised: call torch\."
                                         r"distributed.init_process_group\(...\) .* or pass rank= and world_size="):
        next(iter(ds))
    assert built == []  # refused before any model was built
    assert [i["class_id"] for i in DistilledClasses(made, rank=1, world_size=2)] == [3, 4, 0]


def test_from_preset_pickles_for_spawn_workers_and_a_lambda_is_refused_there(single_thread):
    """One spawn start (each worker imports torch and loads the preset): two blocks of two classes, one per
    worker, with the bytes of one process; a lambda factory cannot travel to such workers and says so."""
    from cao2_fast.pipeline import Distiller

    tiny = dict(ipc=1, device="cpu", stage2_batch=2, sample_steps=6, t_max=2, stage2_steps=2)  # blocks of 2 classes
    ds = DistilledClasses.from_preset("digits", class_ids=[0, 1, 2, 3], **tiny)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got = {i["class_id"]: i["images_uint8"].numpy() for i in loader}
    want = {o.class_id: o.images_uint8.numpy() for o in Distiller.from_preset("digits", **tiny).stream([0, 1, 2, 3])}
    assert sorted(got) == [0, 1, 2, 3]
    for c, px in got.items():
        assert px.shape == (1, 16, 16, 3) and (px == want[c]).all()
    lam = DistilledClasses(lambda: Distiller.from_preset("digits", **tiny))
    with pytest.raises(UserError, match=r"distiller factory .*<lambda> cannot be pickled .* spawn or forkserver "
                                        r"need it: use DistilledClasses.from_preset") as e:
        list(torch.utils.data.DataLoader(lam, batch_size=None, num_workers=1, multiprocessing_context="spawn"))
    assert "\n" not in str(e.value)


def _rank(rank: int, port: int, results) -> None:
    """One rank as torchrun starts it (its place in the environment), in a process forked from the test."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        ds = DistilledClasses(factory("two blocks"))
        try:
            next(iter(ds))
            refused = None
        except UserError as e:
            refused = str(e)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        shares = ds.shares()
        got = {}
        for item in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
            step = torch.ones(1)
            dist.all_reduce(step)  # a training step's collective: a rank with fewer items would leave it waiting
            got[item["class_id"]] = item["images_uint8"].numpy()
        dist.destroy_process_group()
        results.put((rank, refused, shares, got))
    except BaseException as e:  # noqa: BLE001  (reported by the test)
        results.put((rank, f"{type(e).__name__}: {e}", None, None))


def test_two_ranks_from_the_environment_with_two_workers_each_yield_equal_shares_without_a_hang(one_process):
    """Two ranks set up the way torchrun sets them up (RANK, WORLD_SIZE, MASTER_* in the environment, the group
    joined with init_process_group), forked from this process so the models' imports are paid once. Each rank's
    DataLoader workers are forked after it joined, as in a training script."""
    ctx = multiprocessing.get_context("fork")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        got = dict((r[0], r[1:]) for r in (results.get(timeout=180) for _ in procs))
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    for rank in (0, 1):
        refused, shares, items = got[rank]
        assert shares is not None, refused  # the rank stopped: refused holds its error
        assert refused.startswith("WORLD_SIZE=2 but torch.distributed is not initialised: call torch.distributed."
                                  "init_process_group(...)")
        assert shares == [[0, 1, 2], [0, 3, 4]]  # 3 items each: class 0 pads rank 1 (the blocks hold 4 and 1)
        assert sorted(items) == shares[rank]
        for c, px in items.items():
            assert (px == one_process["two blocks"][c]).all()


def test_api_errors_are_one_line_value_errors():
    from cao2_fast.pipeline import Distiller

    with pytest.raises(ValueError, match="unknown setting 'guidance': valid overrides are .*guidance_scale"):
        Distiller.from_preset("digits", guidance=2.0)
    with pytest.raises(UserError, match="class id 12 is not in the digits preset"):
        Distiller.from_preset("digits", class_ids=[12])


def test_a_distiller_is_ready_on_the_device_it_names_and_refuses_a_missing_one(monkeypatch):
    from cao2_fast.pipeline import Distiller

    d = Distiller.from_preset("digits", ipc=1, class_ids=[0], dtype="bfloat16")
    for m in (d.generator.dit, d.generator.vae, d.classifier):
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
