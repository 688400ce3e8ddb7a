"""Export the digits preset's stage-1 engines once, then use them without ever building: load the DiT by path and
call it like a DiT, and run a Distiller whose engines must all come from the cache.

    python docs/examples/export_and_load.py /tmp/digits-engines
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from cao2_fast.engines import load
from cao2_fast.pipeline import Distiller


def main(cache: Path) -> None:
    # 1. export once (what a job's first step, or an admin, does): one JSON line per model
    done = subprocess.run([sys.executable, "-m", "cao2_fast", "export", "--engine", "onnx", "--device", "cpu",
                           "--engine-dir", str(cache), "--json"], check=True, capture_output=True, text=True)
    entries = {row["model"]: Path(row["artefact"]).parent for row in map(json.loads, done.stdout.splitlines())}
    print("exported:", {m: p.name for m, p in entries.items()})

    # 2. load by path, no PyTorch model built: called like a DiT (diffusers' names, one timestep for the batch)
    dit = load(entries["dit"])
    c = dit.contract.to_json()
    print("contract:", [(i["name"], i["shape"]) for i in c["inputs"]], "->", c["outputs"][0]["shape"])
    x = torch.randn(2, *c["inputs"][0]["shape"][1:])
    out = dit(hidden_states=x, timestep=500, class_labels=torch.tensor([3, 10]))  # 10: the null class
    print("dit output:", tuple(out.shape), out.dtype)

    # 3. a Distiller that may only load: build=False refuses a cache miss instead of exporting
    d = Distiller.from_preset("digits", ipc=2, class_ids=[0, 1], device="cpu")
    built = d.use_engines("onnx", "eager", cache_dir=cache, build=False)
    print("engines from the cache:", {k: e.cache_hit for k, e in built.items() if e.cache_hit is not None})
    for o in d.stream():
        print(f"class {o.class_id}: {tuple(o.images_uint8.shape)} uint8, p(class) after stage 2 "
              f"{o.records[0]['prob_after']:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "digits-engines"))
