"""Training throughput: the full slideloop training step vs the raw model step, same shapes, same run.

The full step is ``al_core.learn.train.train`` on the bundled sample (patch cache, dataset, the paper's augmentation,
DataLoader, preprocessing, loss, backward, Adam, progress callback), timed between consecutive step reports.
The raw step is forward + cross-entropy + backward + Adam on random tensors already in memory, with the same
model, batch, precision and channels_last. Goal: full / raw >= 0.8 (the data pipeline is not the bottleneck).
Raw steps run before and after the full run; their mean is the reference (CPU load drifts).

    python bench/bench_train.py                          # CPU: resnet18, 256 px, batch 4
    python bench/bench_train.py --device cuda --patch 512 --encoder resnet34 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _sample_project import sample_project, table  # bench/ runs as a script folder

from al_core.learn.device import autocast_dtype, pick_device
from al_core.learn.model import build_model, config_for, preprocess
from al_core.learn.train import Progress, TrainOptions, train


def raw_steps(config, device: torch.device, amp, batch: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = build_model(config).to(device=device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-4)
    crit = torch.nn.CrossEntropyLoss(ignore_index=255)
    x8 = torch.randint(0, 256, (batch, 3, config.patch, config.patch), dtype=torch.uint8, device=device)
    y = torch.randint(0, config.num_classes, (batch, config.patch, config.patch), device=device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x = preprocess(x8, config).contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = crit(model(x).float(), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times[2:]  # the first steps warm up kernels and allocator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per block")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved raw/full blocks")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    proj = sample_project(args.patch)
    config = config_for(proj.classes(), proj.grid_spec(), encoder=args.encoder)
    device = pick_device(args.device)
    amp = autocast_dtype(device, args.precision)
    n_lab = len(proj.labelled_patch_ids())
    print(f"{args.encoder} U-Net, {args.patch} px, batch {args.batch}, {device}, "
          f"{'fp32' if amp is None else amp}, {torch.get_num_threads()} threads; {n_lab} labelled patches")

    raws: list[float] = []
    fulls: list[float] = []
    ratios: list[float] = []
    for rep in range(args.repeats):  # interleaved blocks, so drifting CPU load hits both alike
        raw_block = raw_steps(config, device, amp, args.batch, args.steps + 2)
        stamps: list[float] = []

        def on_progress(p: Progress, stamps: list[float] = stamps) -> None:
            if p.event == "step":
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

        train(proj, TrainOptions(epochs=1000, batch_size=args.batch, max_steps=args.steps + 2, val_fraction=0,
                                 patience=1000, seed=rep, device=args.device, precision=args.precision),
              encoder=args.encoder, progress=on_progress)
        # interval k→k+1: loading, augmenting and training step k+1 (the first steps warm up)
        full_block = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
        raws += raw_block
        fulls += full_block
        ratios.append(statistics.median(raw_block) / statistics.median(full_block))
    raw, full_m = statistics.median(raws), statistics.median(fulls)
    rows = [
        {"what": "raw model step (random tensors)", "s/step": raw, "patches/s": args.batch / raw, "ratio": 1.0},
        {"what": "full training step (slideloop)", "s/step": full_m, "patches/s": args.batch / full_m,
         "ratio": statistics.median(ratios)},
    ]
    print(table(rows))
    print(f"ratio per interleaved block (raw/full): {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"{len(fulls)} full and {len(raws)} raw steps timed")
    proj.close()


if __name__ == "__main__":
    main()
