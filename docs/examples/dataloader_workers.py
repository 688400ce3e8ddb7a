"""The digits preset as a PyTorch dataset under a DataLoader with two worker processes.

    python docs/examples/dataloader_workers.py

The config's two blocks ([0..5] and [6..9] at IPC 10) go one to each worker; an item is one class.
"""

import torch

from cao2_fast.data import DistilledClasses

if __name__ == "__main__":  # needed where workers start by spawn (macOS, Windows): they import this file
    ds = DistilledClasses.from_preset("digits", ipc=10, device="cpu")  # picklable: fine under any start method
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for item in loader:  # {"images": (10, 3, 16, 16), "labels": (10,), "class_id": int, "records": {...}, ...}
        loss = torch.nn.functional.cross_entropy(model(item["images"]), item["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"class {item['class_id']}: images {tuple(item['images'].shape)}, "
              f"p(class) after stage 2 {item['records']['prob_after'].mean():.3f}, loss {loss.item():.3f}", flush=True)
