"""Images for the evaluation protocols: ImageFolder trees as tensors, and the batched training augmentations.

Images travel as ``uint8`` (N, 3, H, W) tensors (a quarter of the memory of float32) and become float in [−1, 1]
on the device, batch by batch. Every augmentation takes its random draws from a CPU ``torch.Generator`` so that a
seed gives the same run on any device; the pixel work happens on whatever device the batch is on.

Augmentations (RDED / IDC behaviour, batched):

* ``patch_shuffle`` — RDED's ``ShufflePatches``: the image is cut into ``factor`` vertical strips that are put back in
  a random order, then the same for horizontal strips. For factor 2 this permutes the four 2×2 patches (4 of the 24
  possible orders: a left/right swap and a top/bottom swap, each with probability ½).
* ``random_resized_crop`` (+ horizontal flip) — torchvision's sampling (area fraction uniform in ``scale``,
  log-uniform aspect ratio, 10 tries, whole image as the fallback) with continuous box coordinates, resampled
  bilinearly with ``grid_sample`` in one call for the whole batch.
* ``cutmix`` — one box per batch pasted from a shuffled batch (``lam ~ Beta(β, β)``, box side ``sqrt(1 − lam)``,
  uniform centre, clipped at the border); the returned ``lam`` is recomputed from the clipped box, so it is exactly
  the fraction of each image's pixels that stayed its own.

Reading is guarded against hostile files before any pixel is decoded: every PNG is walked chunk by chunk first
(signature, CRCs, a missing end, compressed text and ICC chunks inflated only up to Pillow's default text limits),
and every image's size is checked against the pixel limit (Pillow's ``MAX_IMAGE_PIXELS``, or its default where a
program raised it or turned it off) and a side ratio of at most :data:`MAX_ASPECT`. Pillow's settings are read,
never changed. A file that fails is one ``UserError`` naming it.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError, require_dir

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    """Labelled images in memory: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,), class ``i`` is
    ``class_names[i]``. ``root`` is the folder they came from (None for in-memory sets)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    root: Path | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8:
            self.images = to_uint8(self.images)
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise UserError(f"images must be (N, 3, H, W), got {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise UserError(f"{len(self.images)} images but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def per_class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def take_per_class(self, n: int) -> ImageSet:
        """The first ``n`` images of each class (all of a class that has fewer)."""
        idx = torch.cat([(self.labels == c).nonzero().flatten()[:n] for c in range(self.num_classes)])
        return ImageSet(self.images[idx], self.labels[idx], self.class_names, self.root)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [−1, 1] -> uint8 in [0, 255], the bytes :mod:`cao2_fast.output` writes to PNG for them (so a
    distilled set evaluated in memory is the set evaluated from its folder)."""
    from ..output import quantize

    return quantize(images)


def to_float(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 images -> [−1, 1]; float images pass through (cast to ``dtype``)."""
    if images.dtype == torch.uint8:
        return images.to(dtype) / 127.5 - 1
    return images.to(dtype)


def find_classes(root: Path) -> list[str]:
    """Class folders of an ImageFolder tree, sorted by name (torchvision's order); hidden folders are skipped."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def list_images(root: Path, classes: list[str], per_class: int | None = None) -> list[tuple[Path, int]]:
    samples = []
    for i, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not files:
            raise UserError(f"{root / name}: class folder has no images ({', '.join(IMG_EXTENSIONS[:3])}, ...)")
        samples += [(p, i) for p in files[:per_class]]
    return samples


# Pillow's defaults: MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_CHUNK (ImageFile.SAFEBLOCK) and MAX_TEXT_MEMORY.
# The reader uses these, or Pillow's current values where a program lowered them, whatever they were raised to.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
PNG_TEXT_CHUNK = 1 << 20
PNG_TEXT_MEMORY = 64 << 20
# A photo, a crop of one or a distilled image is never this elongated; a 1×40,000,000 PNG of 39 KB is, and resized
# to a 224-pixel short side it would need billions of pixels.
MAX_ASPECT = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Hostile(Exception):
    """A file the reader refuses before decoding it; the message says why."""


def _limits() -> tuple[int, int, int]:
    """(pixels per image, bytes per inflated PNG text/ICC chunk, inflated PNG text bytes per file) as the reader
    applies them: Pillow's defaults, or its current settings where those are lower."""
    from PIL import Image, PngImagePlugin

    pixels = Image.MAX_IMAGE_PIXELS
    chunk = getattr(PngImagePlugin, "MAX_TEXT_CHUNK", None)
    memory = getattr(PngImagePlugin, "MAX_TEXT_MEMORY", None)
    return (min(int(pixels), DEFAULT_MAX_PIXELS) if pixels else DEFAULT_MAX_PIXELS,
            min(int(chunk), PNG_TEXT_CHUNK) if chunk else PNG_TEXT_CHUNK,
            min(int(memory), PNG_TEXT_MEMORY) if memory else PNG_TEXT_MEMORY)


def _check_size(width: int, height: int) -> None:
    """Refuse an image size before its pixels are decoded: no side 0, at most the pixel limit, sides at most
    :data:`MAX_ASPECT` to 1."""
    limit = _limits()[0]
    if width < 1 or height < 1:
        raise _Hostile(f"{width}×{height} pixels: an image with no pixels")
    if width * height > limit:
        raise _Hostile(f"Image size ({width * height} pixels) exceeds limit of {limit} pixels, could be "
                       f"decompression bomb")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise _Hostile(f"{width}×{height} pixels: one side is more than {MAX_ASPECT} times the other, could be "
                       f"decompression bomb")


def _inflated_size(data: bytes, limit: int, what: str) -> int:
    """Bytes ``data`` (a zlib stream) inflates to, refused past ``limit`` without inflating further."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise _Hostile(f"damaged {what} chunk ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise _Hostile(f"{what} chunk inflates to more than {limit} bytes, could be decompression bomb")
    return len(out)


def _png_meta(ctype: bytes, data: bytes, chunk_limit: int) -> int:
    """Text bytes a tEXt, zTXt, iTXt or iCCP chunk holds once inflated (its compressed part inflated up to
    ``chunk_limit`` only)."""
    what = ctype.decode("latin-1")
    key_end = data.find(b"\0")
    if key_end < 0:
        raise _Hostile(f"damaged {what} chunk (no keyword end)")
    if ctype == b"tEXt":
        return len(data)
    if ctype in (b"zTXt", b"iCCP"):
        return key_end + _inflated_size(data[key_end + 2:], chunk_limit, what)
    compressed = data[key_end + 1:key_end + 2] == b"\1"  # iTXt: keyword, flag, method, language, keyword, text
    rest = data[key_end + 3:]
    for _ in range(2):
        end = rest.find(b"\0")
        if end < 0:
            raise _Hostile(f"damaged {what} chunk (no language or translated keyword end)")
        rest = rest[end + 1:]
    return key_end + (_inflated_size(rest, chunk_limit, what) if compressed else len(rest))


_PNG_META = (b"tEXt", b"zTXt", b"iTXt", b"iCCP")


def _check_png(path: Path) -> tuple[int, int]:
    """Walk a PNG file's chunks without decoding its pixels: the signature, IHDR first with a size
    :func:`_check_size` accepts, every chunk whole with its CRC, an IEND at the end, and text and ICC chunks within
    the text limits once inflated. Returns (width, height)."""
    _, chunk_limit, memory_limit = _limits()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise _Hostile("not a PNG file (bad signature)")
        dims, text = None, 0
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise _Hostile("truncated: the file ends before its IEND chunk")
            length, ctype = struct.unpack(">I4s", head)
            name = ctype.decode("latin-1")
            if length > size - f.tell() - 4:
                raise _Hostile(f"truncated: its {name!r} chunk runs past the end of the file")
            if dims is None and ctype != b"IHDR":
                raise _Hostile(f"damaged: the first chunk is {name!r}, not IHDR")
            crc, data = zlib.crc32(ctype), b""
            if ctype in _PNG_META or ctype == b"IHDR":
                if ctype in _PNG_META and length > (memory_limit if ctype == b"tEXt" else 4 * chunk_limit + 1024):
                    raise _Hostile(f"its {name} chunk of {length} bytes exceeds the text limit")
                data = f.read(length)
                crc = zlib.crc32(data, crc)
            else:
                left = length
                while left:
                    block = f.read(min(left, 1 << 20))
                    crc, left = zlib.crc32(block, crc), left - len(block)
            if struct.unpack(">I", f.read(4))[0] != crc:
                raise _Hostile(f"damaged: bad CRC in its {name!r} chunk")
            if ctype == b"IHDR":
                if length != 13:
                    raise _Hostile("damaged: its IHDR chunk is not 13 bytes long")
                dims = struct.unpack(">II", data[:8])
                _check_size(*dims)
            elif ctype in _PNG_META:
                text += _png_meta(ctype, data, chunk_limit)
                if text > memory_limit:
                    raise _Hostile(f"its text chunks inflate to more than {memory_limit} bytes, could be "
                                   f"decompression bomb")
            elif ctype == b"IEND":
                return dims


def _read(path: Path, size: int | None, crop_ratio: float) -> torch.Tensor:
    from PIL import Image

    try:
        with open(path, "rb") as f:
            is_png = f.read(8) == PNG_SIGNATURE
        if is_png:
            _check_png(path)
        with Image.open(path) as im:
            _check_size(*im.size)  # every format: refused before a pixel is decoded
            im = im.convert("RGB")
            if size is not None:
                short = max(size, round(size / crop_ratio))
                w, h = im.size
                s = short / min(w, h)
                if (round(w * s), round(h * s)) != (w, h):
                    im = im.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            return data.view(im.size[1], im.size[0], 3).permute(2, 0, 1).contiguous()
    except _Hostile as e:
        raise UserError(f"{path}: cannot read image ({_short(e)})") from None
    except MemoryError:
        raise UserError(f"{path}: cannot read image (out of memory decoding it)") from None
    except Exception as e:  # noqa: BLE001  a damaged file can raise anything from its format's decoder
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {_short(e)})") from None


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 160 else text[:160].rsplit(" ", 1)[0] + " …"


def load_image_folder(root: str | Path, size: int | None = None, crop_ratio: float = 1.0,
                      per_class: int | None = None, what: str = "an ImageFolder tree <dir>/<class>/<image>") -> ImageSet:
    """Read an ImageFolder tree into memory.

    ``size`` None keeps the images' own size (they must share one, as a distilled set does; otherwise they are all
    brought to the first image's size). With ``size`` s, each image's shorter side is resized (bilinear) to
    ``s / crop_ratio`` and the centre s×s is kept — ``crop_ratio`` 0.875 is the usual ImageNet validation
    transform (resize 256, centre crop 224). ``per_class`` reads only the first n files of each class.
    """
    root = require_dir(root, what)
    classes = find_classes(root)
    if not classes:
        raise UserError(f"{root}: no class folders (expected {what})")
    samples = list_images(root, classes, per_class)
    first = _read(samples[0][0], size, crop_ratio)
    if size is None and first.shape[1] != first.shape[2]:
        size = min(first.shape[1:])
        first = _read(samples[0][0], size, crop_ratio)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda s: _read(s[0], size, crop_ratio), samples[1:]))
    images = [first] + images
    if size is None and any(im.shape != first.shape for im in images):
        size = first.shape[1]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(lambda s: _read(s[0], size, crop_ratio), samples))
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return ImageSet(torch.stack(images), labels, classes, root)


# ---------------------------------------------------------------------------------------------------------------
# augmentations


def _strip_index(length: int, factor: int, order: list[int]) -> torch.Tensor:
    step = length // factor
    bounds = [(i * step, (i + 1) * step if i < factor - 1 else length) for i in range(factor)]
    return torch.cat([torch.arange(*bounds[k]) for k in order])


def patch_shuffle(x: torch.Tensor, factor: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """RDED's patch shuffling: random order of ``factor`` column strips, then of ``factor`` row strips, per image.
    The last strip takes the remainder when the size does not divide. ``factor`` < 2 returns ``x``."""
    if factor < 2:
        return x
    b, c, h, w = x.shape
    cols = torch.stack([_strip_index(w, factor, torch.randperm(factor, generator=generator).tolist()) for _ in range(b)])
    rows = torch.stack([_strip_index(h, factor, torch.randperm(factor, generator=generator).tolist()) for _ in range(b)])
    cols, rows = cols.to(x.device), rows.to(x.device)
    x = x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
    return x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w))


def sample_crops(n: int, height: int, width: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 generator: torch.Generator | None = None, tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling for ``n`` images at once: (n, 4) boxes (top, left, h, w) in
    pixels, continuous. The first of ``tries`` draws that fits wins; none fitting gives the whole image."""
    area = height * width
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect)
    h = torch.sqrt(target / aspect)
    ok = (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.full((n,), float(height)))
    w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.full((n,), float(width)))
    top = torch.rand(n, generator=generator) * (height - h)
    left = torch.rand(n, generator=generator) * (width - w)
    return torch.stack([top, left, h, w], 1)


def random_resized_crop(x: torch.Tensor, size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop a random box of each image (see ``sample_crops``), resize it to ``size``×``size`` (bilinear) and, with
    ``flip``, mirror each image left-right with probability ½. Works on float images."""
    b, _, height, width = x.shape
    box = sample_crops(b, height, width, scale, ratio, generator)
    mirror = (torch.rand(b, generator=generator) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)
    top, left, h, w = box.unbind(1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = (w / width) * torch.where(mirror, -1.0, 1.0)
    theta[:, 0, 2] = (left + w / 2) / width * 2 - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (top + h / 2) / height * 2 - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """The CutMix box (y1, x1, y2, x2) for mixing weight ``lam``: sides ``sqrt(1 − lam)`` of the image's, uniform
    centre, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return y1, x1, y2, x2


def cutmix(x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste one box from a shuffled copy of the batch into every image. Returns (mixed images, partner index,
    lam) where ``lam`` is the fraction of each image left as it was (1 − box area / image area); image i's target
    is ``lam · y[i] + (1 − lam) · y[index[i]]``. ``x`` is not modified."""
    b, _, height, width = x.shape
    lam = beta_sample(beta, generator)
    index = torch.randperm(b, generator=generator)
    y1, x1, y2, x2 = cutmix_box(height, width, lam, generator)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[index.to(x.device), :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    return mixed, index, lam


def beta_sample(beta: float, generator: torch.Generator | None = None) -> float:
    """One draw of Beta(β, β) whose randomness comes from ``generator`` (torch's Beta sampler takes none)."""
    import numpy as np

    seed = int(torch.randint(2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(beta, beta))


def mixed_targets(labels: torch.Tensor, index: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """CutMix's label: ``lam · onehot(y) + (1 − lam) · onehot(y[index])`` (cross-entropy against it equals the
    usual ``lam · CE(y) + (1 − lam) · CE(y[index])``)."""
    y = F.one_hot(labels, num_classes).float()
    return lam * y + (1 - lam) * y[index.to(y.device)]
