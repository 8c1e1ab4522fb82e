"""Prediction throughput: ``al_core.learn.predict.predict`` over every patch vs the raw batched forward pass.

The full run reads patches from the project's pixel cache (filled beforehand, as after the first round),
preprocesses, runs the model, computes softmax, entropy, argmax, per-patch IoU/Dice against the labels,
writes the reduced probability maps and the score rows. The raw pass is the same model on random tensors of
the same batch shape, forward + softmax only. Goal: full / raw >= 0.9.

    python bench/bench_predict.py                      # CPU: resnet18, 256 px, batch 8
    python bench/bench_predict.py --device cuda --patch 512 --encoder resnet34 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _sample_project import sample_project, table  # bench/ runs as a script folder

from al_core.learn.checkpoint import save_checkpoint
from al_core.learn.dataset import open_cache
from al_core.learn.device import autocast_dtype, pick_device
from al_core.learn.model import build_model, config_for, preprocess
from al_core.learn.predict import predict
from al_core.project.schema import ModelRow


def raw_pass(net: torch.nn.Module, config, device: torch.device, amp, batch: int, n: int) -> float:
    x8 = torch.randint(0, 256, (batch, 3, config.patch, config.patch), dtype=torch.uint8, device=device)
    batches = -(-n // batch)
    with torch.inference_mode():
        for _ in range(2):  # warm-up, in the timed precision (bf16 kernels are built on their first call)
            x = preprocess(x8, config).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                torch.softmax(net(x).float(), 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(batches):
            x = preprocess(x8, config).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                torch.softmax(net(x).float(), 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    proj = sample_project(args.patch)
    config = config_for(proj.classes(), proj.grid_spec(), encoder=args.encoder)
    device = pick_device(args.device)
    amp = autocast_dtype(device, args.precision)
    torch.manual_seed(0)
    net = build_model(config)
    save_checkpoint(proj.root / "models" / "bench.pt", net, config)
    with proj.store.write() as s:
        s.add(ModelRow(status="done", checkpoint="models/bench.pt"))
    net = net.eval().to(device=device, memory_format=torch.channels_last)
    n = len(proj.patches())
    open_cache(proj).ensure()
    print(f"{args.encoder} U-Net, {args.patch} px, batch {args.batch}, {device}, "
          f"{'fp32' if amp is None else amp}, {torch.get_num_threads()} threads; {n} patches "
          f"({len(proj.labelled_patch_ids())} labelled)")
    raws, fulls = [], []
    for _ in range(args.repeats):  # interleaved, so drifting CPU load hits both alike
        raws.append(raw_pass(net, config, device, amp, args.batch, n))
        t = time.perf_counter()
        predict(proj, "latest", batch_size=args.batch, device=args.device, precision=args.precision)
        fulls.append(time.perf_counter() - t)
    raw, full = statistics.median(raws), statistics.median(fulls)
    rows = [
        {"what": "raw batched forward (random tensors)", "s": raw, "patches/s": n / raw, "ratio": 1.0},
        {"what": "predict all patches (slideloop)", "s": full, "patches/s": n / full, "ratio": raw / full},
    ]
    print(table(rows))
    print("raw runs: " + ", ".join(f"{v:.2f}" for v in raws) + " s; full runs: "
          + ", ".join(f"{v:.2f}" for v in fulls) + " s (full includes loading the checkpoint)")
    proj.close()


if __name__ == "__main__":
    main()
