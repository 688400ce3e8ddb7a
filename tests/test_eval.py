"""Evaluation protocols: augmentations, the soft-label loss, training on a toy set, the teacher class-order check, and
the ``cao2-fast eval`` command (JSON record, re-run skip, one-line errors)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

from cao2_fast.errors import UserError
from cao2_fast.eval.data import (
    cutmix,
    load_image_folder,
    mixed_targets,
    patch_shuffle,
    random_resized_crop,
    sample_crops,
)
from cao2_fast.eval.protocols import default_config, fit_student, kd_loss, lr_factor
from cao2_fast.eval.teacher import check_class_order, class_order_report
from cao2_fast.models.classifier import Classifier


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast as two and does not stall on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])


def toy_set(n_per_class: int, num_classes: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c: colour c plus an oriented pattern (horizontal / vertical stripes, checkerboard, plain), with noise."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    patterns = [(ys // 2 % 2).float(), (xs // 2 % 2).float(), ((ys // 2 + xs // 2) % 2).float(), torch.zeros(size, size)]
    images, labels = [], []
    for c in range(num_classes):
        base = 0.6 * COLOURS[c].view(3, 1, 1) + 0.4 * (2 * patterns[c] - 1)
        noise = 0.15 * torch.randn(n_per_class, 3, size, size, generator=gen)
        images.append((base + noise).clamp(-1, 1))
        labels.append(torch.full((n_per_class,), c))
    return torch.cat(images), torch.cat(labels)


class ColourNet(nn.Module):
    """Mean colour -> logits, one prototype row per class: accurate on ``toy_set`` by construction."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Linear(3, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(4 * COLOURS[:num_classes])
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x.mean((2, 3)))


def colour_teacher(num_classes: int, perm: list[int] | None = None) -> Classifier:
    net = ColourNet(num_classes)
    if perm is not None:
        with torch.no_grad():
            net.head.weight.copy_(net.head.weight[perm])
    return Classifier(net, input_size=16, normalize=False).eval()


# ------------------------------------------------------------------------------------------------- augmentations


def test_cutmix_label_weight_is_the_pasted_area(gen):
    b, size = 6, 20
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, size, size).contiguous()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    seen_partial = 0
    for _ in range(20):
        mixed, index, lam = cutmix(x, 1.0, gen)
        assert torch.equal(x[:, 0, 0, 0], torch.arange(b, dtype=torch.float32)), "input was modified"
        target = mixed_targets(y, index, lam, 3)
        assert torch.allclose(target.sum(1), torch.ones(b))
        for i in range(b):
            own = (mixed[i] == i).float().mean().item()
            pasted = (mixed[i] == index[i]).float().mean().item()
            if index[i] == i:
                assert own == 1.0
                continue
            assert own + pasted == pytest.approx(1.0)
            assert own == pytest.approx(lam, abs=1e-6)
            expected = torch.zeros(3)
            expected[y[i]] += lam
            expected[y[index[i]]] += 1 - lam
            assert torch.allclose(target[i], expected, atol=1e-6)
        seen_partial += 0 < lam < 1
    assert seen_partial > 0


def test_patch_shuffle_permutes_whole_patches(gen):
    b, size, f = 32, 8, 2
    x = torch.arange(b * 3 * size * size, dtype=torch.float32).view(b, 3, size, size)
    out = patch_shuffle(x, f, gen)
    half = size // f

    def patches(img):
        return [img[:, i * half:(i + 1) * half, j * half:(j + 1) * half] for i in range(f) for j in range(f)]

    arrangements = set()
    for k in range(b):
        src, dst = patches(x[k]), patches(out[k])
        order = []
        for p in dst:
            match = [i for i, q in enumerate(src) if torch.equal(p, q)]
            assert len(match) == 1, "an output patch is not a whole input patch"
            order.append(match[0])
        assert sorted(order) == list(range(f * f))
        arrangements.add(tuple(order))
    assert len(arrangements) == 4  # left/right swap x top/bottom swap, all seen in 32 draws
    odd = torch.arange(2 * 3 * 15 * 15, dtype=torch.float32).view(2, 3, 15, 15)
    shuffled = patch_shuffle(odd, 2, gen)
    assert torch.equal(shuffled.flatten(1).sort(1).values, odd.flatten(1).sort(1).values)
    assert patch_shuffle(odd, 1, gen) is odd


def test_random_resized_crop_full_box_is_identity_and_flip_mirrors(gen):
    x = torch.randn(4, 3, 12, 12, generator=gen)
    same = random_resized_crop(x, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, generator=gen)
    assert torch.allclose(same, x, atol=1e-5)
    outs = [random_resized_crop(x, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True, generator=gen) for _ in range(8)]
    for out in outs:
        for i in range(4):
            assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(out[i], x[i].flip(-1), atol=1e-5)
    assert any(not torch.allclose(o, x, atol=1e-5) for o in outs)
    boxes = sample_crops(500, 40, 30, scale=(0.5, 1.0), generator=gen)
    area = boxes[:, 2] * boxes[:, 3] / (40 * 30)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 40 + 1e-4).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 30 + 1e-4).all()
    assert area.min() >= 0.5 - 1e-5 and area.max() <= 1 + 1e-5


# ------------------------------------------------------------------------------------------------ loss, schedule


@pytest.mark.parametrize("t2_scale", [False, True])
def test_kd_loss_is_batchmean_kl_at_temperature(t2_scale):
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]])
    temp = 3.0
    total = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / temp) for v in row_s)
        zt = sum(math.exp(v / temp) for v in row_t)
        ps = [math.exp(v / temp) / zs for v in row_s]
        pt = [math.exp(v / temp) / zt for v in row_t]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = total / 2 * (temp**2 if t2_scale else 1.0)
    assert kd_loss(s, t, temp, t2_scale).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, temp, t2_scale).item() == pytest.approx(0.0, abs=1e-6)


def test_defaults_follow_the_spec_and_schedules():
    soft = default_config("soft", 10, 10)
    assert (soft.epochs, soft.batch_size, soft.optimizer, soft.lr, soft.weight_decay, soft.temperature) == \
        (300, 50, "adamw", 1e-3, 0.01, 20.0)
    assert default_config("soft", 50, 10).batch_size == 100
    assert default_config("soft", 50, 100).batch_size == 200
    hard = default_config("hard", 10, 10)
    assert (hard.epochs, hard.batch_size, hard.optimizer, hard.lr, hard.weight_decay, hard.norm) == \
        (2000, 64, "sgd", 0.01, 5e-4, "instance")
    assert default_config("hard", 50, 10).epochs == 1500 and default_config("hard", 100, 10).epochs == 1000
    assert default_config("hard", 10, 1000).lr == 0.1
    for n in (2000, 1500, 1000, 7):
        cfg = default_config("hard", 10, 10, epochs=n)
        a, b = 2 * n // 3, 5 * n // 6
        assert [lr_factor(cfg, e) for e in (0, a - 1, a, b - 1, b, n - 1)] == \
            pytest.approx([1.0, 1.0, 0.2, 0.2, 0.04, 0.04])
    assert lr_factor(soft, 0) == 1.0 and lr_factor(soft, 300) == pytest.approx(0.5)
    with pytest.raises(UserError, match="unknown training setting"):
        default_config("soft", 10, 10, learning_rate=0.1)
    with pytest.raises(UserError, match="schedule"):
        default_config("soft", 10, 10, schedule="linear")


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("protocol", ["hard", "soft"])
def test_training_loop_learns_a_separable_toy_set(protocol, gen):
    x, y = toy_set(8, 3, 16, gen)
    xv, yv = toy_set(20, 3, 16, gen)
    cfg = default_config(protocol, 8, 3, student="test_resnet", epochs=30, image_size=16, batch_size=12,
                         eval_every=5, lr=0.1 if protocol == "hard" else 3e-3, output_stride=8)
    teacher = colour_teacher(3) if protocol == "soft" else None
    res = fit_student(x, y if protocol == "hard" else None, teacher, xv, yv, cfg, num_classes=3)
    assert res.best_top1 >= 80.0, res.evals  # chance is 33 %
    assert res.best_top1 == max(acc for _, acc in res.evals)
    assert res.evals[-1][0] == 30 and all(e >= 24 for e, _ in res.evals)


def test_hard_protocol_student_has_instance_norm():
    from cao2_fast.eval.protocols import InstanceNorm, build_student

    student = build_student(default_config("hard", 10, 10, student="resnet18", image_size=64), 10)
    norms = [m for m in student.modules() if isinstance(m, (nn.BatchNorm2d, InstanceNorm))]
    assert norms and all(isinstance(m, InstanceNorm) for m in norms)
    assert student(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(UserError, match="1×1 feature maps"):  # instance norm would output constants
        build_student(default_config("hard", 10, 10, student="test_resnet", image_size=32), 10)
    small = build_student(default_config("hard", 10, 10, student="test_resnet", image_size=32, output_stride=8), 10)
    assert small.model.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 4


# ----------------------------------------------------------------------------------------- class-order check


def test_class_order_check_passes_the_right_teacher_and_names_a_permuted_one(gen):
    names = ["n01", "n02", "n03", "n04"]
    x, y = toy_set(5, 4, 16, gen)
    report = check_class_order(colour_teacher(4), x, y, names)
    assert report.ok and report.accuracy == 1.0 and report.mapping == [0, 1, 2, 3]

    perm = [2, 3, 1, 0]  # teacher output j is old class perm[j]
    inv = [perm.index(c) for c in range(4)]
    permuted = colour_teacher(4, perm)
    report = class_order_report(permuted, x, y, 4)
    assert report.mapping == inv and report.best_accuracy == 1.0 and not report.ok
    with pytest.raises(UserError) as err:
        check_class_order(permuted, x, y, names)
    msg = str(err.value)
    assert "\n" not in msg and "class order does not match" in msg
    assert f"folder 'n01' (#0) is predicted as teacher class {inv[0]}" in msg

    swapped = colour_teacher(4, [1, 0, 2, 3])  # half right: accuracy alone would pass at 50 %
    report = class_order_report(swapped, x, y, 4)
    assert report.accuracy == pytest.approx(0.5) and report.accuracy >= report.threshold
    with pytest.raises(UserError, match=r"folder 'n02' \(#1\) is predicted as teacher class 0"):
        check_class_order(swapped, x, y, names)


def test_class_check_rejects_a_teacher_with_another_class_count(gen):
    x, y = toy_set(2, 3, 16, gen)
    with pytest.raises(UserError, match="4 output classes, but the dataset has 3"):
        class_order_report(colour_teacher(4), x, y, 3)


# -------------------------------------------------------------------------------------------------------- CLI


def write_folder(root, images: torch.Tensor, labels: torch.Tensor, names: list[str]):
    from PIL import Image

    from cao2_fast.eval.data import to_uint8

    for c in names:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(to_uint8(images), labels.tolist())):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / names[label] / f"{i:05d}.png")
    return root


@pytest.fixture
def folders(tmp_path, gen):
    names = ["red", "green", "blue"]
    x, y = toy_set(3, 3, 16, gen)
    xv, yv = toy_set(4, 3, 16, gen)
    distilled = write_folder(tmp_path / "runs" / "toy-ipc3", x, y, names)
    (distilled / "manifest.json").write_text("{}")
    val = write_folder(tmp_path / "val", xv, yv, names)
    return distilled, val, names


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from cao2_fast.cli.main import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_image_folder_reads_sorted_classes_and_ignores_root_files(folders):
    distilled, val, names = folders
    s = load_image_folder(distilled)
    assert s.class_names == sorted(names) and s.images.shape == (9, 3, 16, 16) and s.images.dtype == torch.uint8
    assert s.per_class_counts() == [3, 3, 3]
    v = load_image_folder(val, size=8, crop_ratio=0.5)
    assert v.images.shape == (12, 3, 8, 8)


def test_cli_writes_the_record_beside_the_distilled_set(folders, capsys):
    distilled, val, _ = folders
    args = ["eval", "--distilled", str(distilled), "--val", str(val), "--protocol", "hard", "--student", "test_resnet",
            "--epochs", "2", "--batch-size", "4", "--image-size", "16", "--output-stride", "8", "--repeats", "2", "--seed", "5",
            "--device", "cpu", "--no-progress"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    path = distilled.parent / "toy-ipc3-eval-hard-test_resnet.json"
    assert path.is_file() and [p.name for p in distilled.glob("*.json")] == ["manifest.json"]
    rec = json.loads(path.read_text())
    for key in ("protocol", "student", "teacher", "dataset", "repeats", "top1", "mean", "std", "epochs",
                "hyperparameters", "seeds", "versions", "timestamp", "distilled_dir", "val_dir"):
        assert key in rec, key
    assert rec["protocol"] == "hard" and rec["student"] == "test_resnet" and rec["teacher"] is None
    assert rec["repeats"] == 2 and len(rec["top1"]) == 2 and rec["seeds"] == [5, 6] and rec["epochs"] == 2
    assert rec["mean"] == pytest.approx(statistics.fmean(rec["top1"]))
    assert rec["std"] == pytest.approx(statistics.stdev(rec["top1"])) and rec["std_ddof"] == 1  # sample std
    assert rec["final_mean"] == pytest.approx(statistics.fmean(rec["final_top1"]))
    assert rec["final_std"] == pytest.approx(statistics.stdev(rec["final_top1"]))
    assert rec["seconds_mean"] == pytest.approx(statistics.fmean(rec["seconds_per_repeat"]), abs=0.01)
    assert rec["seconds_total"] >= sum(rec["seconds_per_repeat"]) - 0.02 and "seconds" not in rec
    assert rec["kind"] == "cao2-fast eval record" and "RDED" in rec["statistics"]["top1"]
    assert all(0 <= t <= 100 for t in rec["top1"])
    hp = rec["hyperparameters"]
    assert (hp["batch_size"], hp["image_size"], hp["optimizer"], hp["norm"], hp["lr"]) == (4, 16, "sgd", "instance", 0.01)
    assert rec["distilled_dir"] == str(distilled.resolve()) and rec["val_dir"] == str(val.resolve())
    assert "torch" in rec["versions"] and "timm" in rec["versions"]
    assert "mean ± std" in out and "RDED" in out
    assert "sample std (ddof 1)" in " ".join(out.split())  # the footnote names the statistics
    last = next(x for x in out.splitlines() if "mean ± std" in x)
    assert f"{rec['seconds_mean']:.1f}" in last and f"{rec['std']:.2f}" in last

    code, _, err = run_cli(args, capsys)
    assert code == 0 and "already holds this evaluation" in err
    assert json.loads(path.read_text())["timestamp"] == rec["timestamp"]

    old = dict(rec, std=statistics.pstdev(rec["top1"]), std_ddof=0, seconds=rec["seconds_total"])  # an older record
    for k in ("kind", "seconds_total", "seconds_mean", "final_mean", "final_std", "statistics"):
        old.pop(k)
    path.write_text(json.dumps(old))
    code, _, err = run_cli(args, capsys)  # reused, its statistics brought up to date, not retrained
    assert code == 0 and "already holds this evaluation" in err
    assert json.loads(path.read_text()) == rec


def test_cli_soft_protocol_with_a_checkpoint_teacher(folders, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    distilled, val, _ = folders
    ckpt = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(ckpt))
    out = tmp_path / "soft.json"
    base = ["eval", "--distilled", str(distilled), "--val", str(val), "--teacher", f"test_resnet:{ckpt}",
            "--student", "test_resnet", "--epochs", "2", "--image-size", "16", "--repeats", "1", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    code, _, err = run_cli(base, capsys)  # a random teacher: the class-order check refuses it
    assert code == 2 and err.count("\n") == 1 and "teacher" in err and not out.exists()
    code, _, err = run_cli(base + ["--no-class-check", "--temperature", "4"], capsys)
    assert code == 0, err
    rec = json.loads(out.read_text())
    assert rec["protocol"] == "soft" and rec["teacher"]["spec"] == f"test_resnet:{ckpt}"
    assert rec["hyperparameters"]["temperature"] == 4.0 and rec["hyperparameters"]["patch_factor"] == 2


@pytest.mark.parametrize("case", ["missing", "empty", "protocol", "no-val", "teacher-classes"])
def test_cli_bad_input_is_one_line_and_exit_2(case, folders, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    distilled, val, _ = folders
    (tmp_path / "empty").mkdir()
    args = {
        "missing": ["--distilled", str(tmp_path / "nope"), "--val", str(val)],
        "empty": ["--distilled", str(tmp_path / "empty"), "--val", str(val)],
        "protocol": ["--distilled", str(distilled), "--val", str(val), "--protocol", "medium"],
        "no-val": ["--distilled", str(distilled), "--protocol", "hard"],
        "teacher-classes": ["--distilled", str(distilled), "--val", str(val), "--teacher", "test_resnet:{ckpt}"],
    }[case]
    if case == "teacher-classes":
        ckpt = tmp_path / "t5.safetensors"
        save_file(timm.create_model("test_resnet", num_classes=5).state_dict(), str(ckpt))
        args[-1] = args[-1].format(ckpt=ckpt)
    code, _, err = run_cli(["eval", *args, "--device", "cpu", "--no-progress"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    expected = {"missing": "no such directory", "empty": "no class folders", "protocol": "protocol 'medium'",
                "no-val": "--val", "teacher-classes": "5 classes"}[case]
    assert expected in lines[0]


def test_evaluate_accepts_in_memory_sets(gen):
    from cao2_fast.eval import evaluate

    names = ["a", "b", "c"]
    x, y = toy_set(4, 3, 16, gen)
    xv, yv = toy_set(3, 3, 16, gen)
    rec = evaluate((x, y, names), (xv, yv, names), "soft", teacher=colour_teacher(3), student="test_resnet",
                   repeats=2, seed=3, epochs=2, image_size=16, batch_size=6)
    assert rec["seeds"] == [3, 4] and len(rec["top1"]) == 2 and rec["distilled_dir"] is None
    assert rec["class_check"]["ok"] and rec["class_check"]["accuracy"] == 1.0
    assert rec["hyperparameters"]["batch_size"] == 6 and rec["ipc"] == 4
    with pytest.raises(UserError, match="teacher class order does not match"):
        evaluate((x, y, names), (xv, yv, names), "soft", teacher=colour_teacher(3, [1, 2, 0]), epochs=1)


def test_cli_dry_run_trains_nothing(folders, capsys):
    distilled, val, _ = folders
    code, out, err = run_cli(["eval", "--distilled", str(distilled), "--val", str(val), "--protocol", "hard",
                              "--image-size", "64", "--dry-run", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "epochs" in out and "2000" in out and "instance" in out
    assert not list(distilled.parent.glob("*.json"))


def test_cli_digits_dataset_takes_split_teacher_and_settings_from_the_preset(tmp_path, monkeypatch, capsys):
    import timm
    from safetensors.torch import save_file

    from cao2_fast import pipeline
    from cao2_fast.eval.api import DIGITS_SETTINGS, DIGITS_STUDENT
    from cao2_fast.presets.digits_data import CLASS_NAMES, digits_split

    preset = tmp_path / "preset"
    preset.mkdir()
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(preset / "clf.safetensors"))
    meta = {"class_names": list(CLASS_NAMES), "classifier": {"model": "test_resnet", "weights": "clf.safetensors",
                                                              "input_size": 24, "mean": [0.5] * 3, "std": [0.5] * 3}}
    (preset / "preset.json").write_text(json.dumps(meta))
    monkeypatch.setattr(pipeline, "preset_dir", lambda name="digits": preset)
    x, y = digits_split("train")
    keep = torch.cat([(y == c).nonzero().flatten()[:1] for c in range(10)])
    distilled = write_folder(tmp_path / "digits-ipc1", x[keep], y[keep], list(CLASS_NAMES))
    code, out, err = run_cli(["eval", "--dataset", "digits", "--distilled", str(distilled), "--epochs", "1",
                              "--repeats", "1", "--no-class-check", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / f"digits-ipc1-eval-soft-{DIGITS_STUDENT}.json").read_text())
    assert rec["hyperparameters"]["flip"] is False  # digits are not mirror-symmetric
    assert rec["std"] is None and "± n/a" in out and "± 0.00" not in out  # one repeat has no spread
    assert rec["dataset"] == "digits" and rec["val_images"] == len(digits_split("val")[1])
    assert rec["teacher"]["model"] == "test_resnet" and rec["teacher"]["input_size"] == 24
    assert rec["student"] == DIGITS_STUDENT and rec["epochs"] == 1 and rec["cpu_threads"] == 1
    assert rec["hyperparameters"]["image_size"] == DIGITS_SETTINGS["soft"]["image_size"]


def _digits_preset_installed() -> bool:
    from cao2_fast.pipeline import preset_dir

    return (preset_dir("digits") / "preset.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _digits_preset_installed(), reason="the digits preset is not installed")
def test_cli_digits_preset_soft_protocol(tmp_path, capsys):
    from cao2_fast.presets.digits_data import CLASS_NAMES, digits_split

    x, y = digits_split("train")
    keep = torch.cat([(y == c).nonzero().flatten()[:2] for c in range(10)])
    distilled = write_folder(tmp_path / "digits-ipc2", x[keep], y[keep], list(CLASS_NAMES))
    code, _, err = run_cli(["eval", "--dataset", "digits", "--distilled", str(distilled), "--epochs", "1",
                            "--repeats", "1", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    rec = json.loads(next(tmp_path.glob("digits-ipc2-eval-soft-*.json")).read_text())
    assert rec["dataset"] == "digits" and rec["val_images"] > 100 and rec["teacher"]["weights"]
    assert rec["class_check"]["ok"] and rec["class_check"]["accuracy"] > 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_bf16_channels_last_learns(gen):
    x, _ = toy_set(8, 3, 32, gen)
    xv, yv = toy_set(20, 3, 32, gen)
    cfg = default_config("soft", 8, 3, student="test_resnet", epochs=30, image_size=32, batch_size=12, eval_every=5,
                         lr=3e-3)
    res = fit_student(x, None, colour_teacher(3), xv, yv, cfg, device="cuda", num_classes=3)
    assert res.best_top1 >= 80.0, res.evals
