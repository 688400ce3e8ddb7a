"""Distill the digits preset in memory and write it as WebDataset shards, then read the shards back.

    python docs/examples/stream_to_webdataset.py [OUT_DIR]

Each class is written as soon as its block is done; nothing but the shards touches the disk.
"""

import io
import json
import logging
import sys
from pathlib import Path

import webdataset as wds
from PIL import Image

from cao2_fast.pipeline import Distiller

logging.basicConfig(level=logging.INFO, format="%(message)s")  # a failed class is logged by the library

out = Path(sys.argv[1] if len(sys.argv) > 1 else "digits-wds")
out.mkdir(parents=True, exist_ok=True)

d = Distiller.from_preset("digits", ipc=10, device="cpu")
with wds.ShardWriter(str(out / "digits-%04d.tar"), maxcount=50, verbose=0) as sink:
    for c in d.stream():  # ClassOutput, in class order, block by block
        if c.failure is not None:
            continue  # no images for this class (already logged)
        for i, (pixels, record) in enumerate(zip(c.images_uint8.numpy(), c.records)):
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="png")
            sink.write({"__key__": f"{c.class_name}_{i}", "png": png.getvalue(), "cls": c.class_id,
                        "json": json.dumps(record).encode()})
        print(f"class {c.class_name}: {len(c.records)} images written", flush=True)

shards = sorted(str(p) for p in out.glob("digits-*.tar"))
read = wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("png", "cls", "json")
labels = [int(cls) for _, cls, _ in read]
print(f"{len(shards)} shards, {len(labels)} images read back, per class:",
      [labels.count(k) for k in range(10)])
