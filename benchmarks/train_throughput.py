"""Training throughput (samples/s): backbones × image sizes × precision, and Ray Train vs plain.

Part 1 times forward+backward+AdamW steps of the fusion network in a plain single-process
PyTorch loop on random tensors (the compute ceiling). Part 2 (``--ray``) runs the real
``posterfusion train`` job on a synthetic sample with 1 and 2 Ray Train workers and prints
the samples/s the job itself measured, beside the plain loop's figure for the same setting.

    python benchmarks/train_throughput.py                       # CPU here
    python benchmarks/train_throughput.py --device cuda         # on a GPU machine
    python benchmarks/train_throughput.py --ray --backbones keras_cnn densenet121 --sizes 64
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path


def plain_loop(backbone: str, size: int, amp: str, device: str, batch: int, steps: int) -> float:
    import torch

    from posterfusion.models.fusion import FusionConfig, build_model

    model = build_model(FusionConfig(backbone=backbone, variant="fused", num_genres=20, object_dim=242,
                                     metadata_dim=40)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size, device=device)
    objects, meta = torch.randn(batch, 242, device=device), torch.randn(batch, 40, device=device)
    labels = (torch.rand(batch, 20, device=device) > 0.8).float()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if amp != "off" else contextlib.nullcontext()

    def step():
        with autocast:
            logits = model(images, objects, meta)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocations, kernel selection)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def ray_train(backbone: str, size: int, workers: int, epochs: int, root: Path, n: int) -> float:
    """samples/s of the real train job (mean over epochs after the first)."""
    from posterfusion.jobs.ingest import IngestConfig, run_ingest
    from posterfusion.jobs.sample import SampleConfig, write_sample
    from posterfusion.jobs.train import TrainConfig, run_train

    catalogue = root / "catalogue"
    if not catalogue.exists():
        sample = write_sample(SampleConfig(out=root / "sample", n=n, unlabelled=0))
        run_ingest(IngestConfig(sources=[f"multilabel:{root / 'sample'}"], metadata=[sample["metadata"]],
                                out=catalogue))
    name = f"{backbone}-{size}-{workers}"
    summary = run_train(TrainConfig(catalogue=catalogue, out=root / name, variant="cnn+metadata", backbone=backbone,
                                    image_size=size, epochs=epochs, batch_size=32, workers=workers, patience=epochs))
    rates = [h["samples_per_s"] for h in summary["history"][1:]] or [summary["history"][0]["samples_per_s"]]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["keras_cnn", "densenet121", "resnet50"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ray", action="store_true", help="also time the Ray Train job (1 and 2 workers)")
    parser.add_argument("--ray-samples", type=int, default=600)
    args = parser.parse_args()

    import torch

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(f"{'backbone':<12} {'size':>4} {'amp':>4} {'samples/s':>10}")
    plain = {}
    for backbone in args.backbones:
        for size in args.sizes:
            for amp in args.amp:
                rate = plain_loop(backbone, size, amp, args.device, args.batch, args.steps)
                plain[(backbone, size, amp)] = rate
                print(f"{backbone:<12} {size:>4} {amp:>4} {rate:>10.1f}", flush=True)
        for size in args.sizes:
            if {"off", "bf16"} <= set(args.amp):
                ratio = plain[(backbone, size, "bf16")] / plain[(backbone, size, "off")]
                print(f"{backbone:<12} {size:>4} bf16/fp32 speed-up {ratio:.2f}x")
    if args.ray:
        from posterfusion.cluster import ClusterConfig, ray_cluster

        amp = "bf16" if "bf16" in args.amp else "off"
        with tempfile.TemporaryDirectory() as tmp, ray_cluster(ClusterConfig()):
            print(f"\n{'backbone':<12} {'size':>4} {'plain':>8} {'ray 1w':>8} {'ray 2w':>8}  (samples/s, amp auto)")
            for backbone in args.backbones:
                for size in args.sizes:
                    one = ray_train(backbone, size, 1, 3, Path(tmp), args.ray_samples)
                    two = ray_train(backbone, size, 2, 3, Path(tmp), args.ray_samples)
                    base = plain[(backbone, size, amp)]
                    print(f"{backbone:<12} {size:>4} {base:>8.1f} {one:>8.1f} {two:>8.1f}  "
                          f"ray1/plain {one / base:.2f}x, ray2/plain {two / base:.2f}x", flush=True)


if __name__ == "__main__":
    main()
