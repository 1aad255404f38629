"""Loader benchmark: cached-shard samples/s against what the toy training step consumes per second.

    python -m tdd_lightning.data.bench                      # synthetic toy-sized cached shards
    python -m tdd_lightning.data.bench --shards "data/cache/shapes-two/train/*.tar"
    python -m tdd_lightning.data.bench --buckets 8x8 6x10 10x6   # also a bucketed cache (latent sizes)

Besides the plain cache it times a synthetic bucketed cache (one folder of shards per aspect-ratio bucket,
``--buckets`` latent sizes; batches of one bucket each, buckets drawn in proportion to their sizes).

The training side is a proxy of one distillation step (ALGORITHM.md section 2: one student forward and
backward, then the target's and the teacher's forwards, counted as three no-grad forwards of the batch)
on a tiny SDXL-shaped UNet from ``tdd_lightning.models.tiny``, at the shapes of the loaded batches.
The loader must deliver at least ``--min-ratio`` (10) times what the step consumes; exit status 1 if not.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def write_synthetic_cache(
    out_dir: str | Path,
    samples: int = 4096,
    shards: int = 8,
    latent_shape: tuple[int, int, int] = (4, 8, 8),
    text_dims: tuple[int, int] = (32, 32),
    seed: int = 0,
    buckets: list[tuple[int, int]] | None = None,
) -> str:
    """Random tensors in the offline cache's format (as written by ``data.encode``); returns the glob.

    ``buckets``: latent (h, w) sizes: a bucketed cache, sample i in bucket i mod len(buckets), each bucket
    in its folder ``<8h>x<8w>/`` with ``shards`` shards, and a ``meta.json`` that records them."""
    if buckets:
        return _write_bucketed(Path(out_dir), samples, shards, latent_shape[0], text_dims, seed, buckets)
    from safetensors.torch import save_file

    from tdd_lightning.data.encode import _sample_bytes
    from tdd_lightning.data.shards import ShardWriter
    from tdd_lightning.models.families.sdxl import SDXL  # the toy's family

    out_dir = Path(out_dir)
    geometry = {k: v[0] for k, v in SDXL.square_geometry(32, 1).items()}
    g = torch.Generator().manual_seed(seed)
    d1, d2 = text_dims
    text_shapes = dict(zip(SDXL.text_keys, [(77, d1 + d2), (d2,)], strict=True))
    per = -(-samples // shards)
    for s in range(shards):
        with ShardWriter(out_dir / f"shard-{s:06d}.tar") as w:
            for i in range(s * per, min(samples, (s + 1) * per)):
                blob = {"latents": torch.randn(latent_shape, generator=g).half()}
                blob.update({k: torch.randn(shape, generator=g).half() for k, shape in text_shapes.items()})
                blob.update(geometry)
                w.write(f"{i:08d}", {"safetensors": _sample_bytes(blob), "txt": b"a small red circle"})
    save_file(
        {k: torch.zeros(shape) for k, shape in text_shapes.items()}, str(out_dir / "uncond.safetensors")
    )
    return str(out_dir / "shard-*.tar")


def _write_bucketed(out_dir: Path, samples, shards, channels, text_dims, seed, buckets) -> str:
    import json

    meta = {"buckets": {}, "samples": samples}
    for b, (h, w) in enumerate(buckets):
        name = f"{8 * h}x{8 * w}"
        n = len(range(b, samples, len(buckets)))
        write_synthetic_cache(out_dir / name, n, shards, (channels, h, w), text_dims, seed + b)
        per = -(-n // shards)
        counts = {f"shard-{s:06d}.tar": min(n, (s + 1) * per) - s * per for s in range(shards) if s * per < n}
        meta["buckets"][name] = {"latent_shape": [channels, h, w], "samples": n, "shards": counts}
        (out_dir / "uncond.safetensors").write_bytes((out_dir / name / "uncond.safetensors").read_bytes())
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return str(out_dir / "*" / "shard-*.tar")


def loader_rate(
    shards: str,
    batch_size: int,
    num_workers: int,
    epochs: int = 1,
    bucketed: bool = False,
    epoch_samples=None,
) -> tuple[float, dict]:
    """Steady samples/s over ``epochs`` passes (each epoch's first batch, i.e. worker start-up, excluded).
    ``bucketed``: a bucketed cache, ``epoch_samples`` samples an epoch."""
    from tdd_lightning.data.datamodule import ShardDataModule

    dm = ShardDataModule(
        shards, mode="cached", batch_size=batch_size, num_workers=num_workers, seed=0, resampled=bucketed,
        samples_per_epoch=None if not bucketed else epoch_samples,
    )  # fmt: skip
    dm.setup("fit")
    n, seconds, batch = 0, 0.0, None
    for _ in range(epochs):
        it = iter(dm.train_dataloader())
        batch = next(it)
        start = time.perf_counter()
        for b in it:
            n += b["latents"].shape[0]
        seconds += time.perf_counter() - start
    return n / max(seconds, 1e-9), batch


def skip_ahead(
    tmp: str | Path, total: int = 10**7, at: int = 10**6, per_shard: int = 1000, batch_size: int = 32,
    readers: int = 32,
) -> tuple[float, float, int]:  # fmt: skip
    """Seconds to the first batch of a fresh start and of a resume ``at`` samples into an epoch of a
    ``total``-sample cache read by ``readers`` readers (ranks x workers; timed: rank 0's), and the
    samples its resume passes by header walks. The cache is ``total / per_shard`` shard names, links to one
    real shard of ``per_shard`` toy-sized samples (no index: the position is arithmetic). After ``at``
    samples each reader stands ``at / readers`` samples into its shards: in block b of 4 shards, each
    stream the same share into the block."""
    import os

    from tdd_lightning.data.datamodule import ShardDataModule
    from tdd_lightning.data.position import Position

    tmp = Path(tmp)
    real = Path(write_synthetic_cache(tmp / "one", per_shard, 1)).parent / "shard-000000.tar"
    (tmp / "big").mkdir()
    for i in range(total // per_shard):
        os.symlink(real, tmp / "big" / f"shard-{i:06d}.tar")
    os.symlink(tmp / "one" / "uncond.safetensors", tmp / "big" / "uncond.safetensors")
    k = 4
    block, into = divmod(at // readers, k * per_shard)
    taken = [into // k + (i < into % k) for i in range(k)]
    env = {v: os.environ.get(v) for v in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE=str(readers))  # rank 0 of ``readers`` one-worker ranks

    def first_batch(position) -> float:
        dm = ShardDataModule(str(tmp / "big" / "shard-*.tar"), mode="cached", batch_size=batch_size,
                             num_workers=0, shuffle_shards=k, resampled=False)  # fmt: skip
        dm.setup("fit")
        if position is not None:
            state = dm.position.state_dict()
            state |= {
                "epoch": 0,
                "readers": {0: {0: {"streams": {"all": position.to_dict()}}}},
                "last": {0: 0},
            }
            dm.load_state_dict({"position": state})
        start = time.perf_counter()
        next(iter(dm.train_dataloader()))
        return time.perf_counter() - start

    try:
        fresh = first_batch(None)
        resumed = first_batch(Position(0, block, into, taken, [False] * k))
    finally:
        for v, old in env.items():
            os.environ.pop(v) if old is None else os.environ.__setitem__(v, old)
    return fresh, resumed, into


def train_step_rate(batch: dict, steps: int = 5, channels: tuple[int, ...] = (32, 64)) -> tuple[float, float]:
    """Samples/s of a distillation-step proxy at the batch's shapes; also the median step time (s)."""
    from tdd_lightning.models.families.sdxl import SDXL
    from tdd_lightning.models.tiny import TinySDXLConfig, unet_from_config

    x, cond = batch["latents"], SDXL.condition_from_batch(batch)
    embeds, pooled = (cond[k] for k in SDXL.text_keys)
    c, d2 = embeds, pooled.shape[-1]
    cfg = TinySDXLConfig(
        sample_size=x.shape[-1],
        block_out_channels=tuple(channels),
        attention_head_dim=tuple(max(1, ch // 16) for ch in channels),
        transformer_layers_per_block=(1,) * len(channels),
        latent_channels=x.shape[1],
        text_hidden_size=(c.shape[-1] - d2, d2),
        projection_dim=d2,
    )
    unet = unet_from_config(cfg)
    t = torch.randint(0, 1000, (x.shape[0],))

    def step() -> float:
        start = time.perf_counter()
        SDXL.denoise(unet, x, t, cond).square().mean().backward()  # student: forward + backward
        with torch.no_grad():
            for _ in range(3):  # target (B) and teacher (2B): three forwards of the batch
                SDXL.denoise(unet, x, t, cond)
        unet.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up
    seconds = statistics.median(step() for _ in range(steps))
    return x.shape[0] / seconds, seconds


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="cached shards to read (default: write toy-sized synthetic ones)")
    p.add_argument("--samples", type=int, default=4096, help="synthetic samples")
    p.add_argument("--latent-size", type=int, default=8, help="synthetic latent side (toy: 8)")
    p.add_argument("--text-dims", type=int, nargs=2, default=[32, 32], help="synthetic text widths D1 D2")
    p.add_argument("--batch-size", type=int, default=32, help="toy batch size")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to measure")
    p.add_argument("--epochs", type=int, default=2, help="passes per loader measurement")
    p.add_argument("--steps", type=int, default=5, help="timed training-proxy steps (median)")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="proxy UNet block_out_channels")
    p.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()), help="torch threads")
    p.add_argument("--min-ratio", type=float, default=10.0)
    p.add_argument(
        "--skip-ahead",
        action="store_true",
        help="only time a resume at sample 10^6 of a 10^7-sample cache (first batch, fresh vs resumed)",
    )
    p.add_argument(
        "--buckets",
        nargs="*",
        default=["8x8", "6x10", "10x6"],
        help="latent HxW of the bucketed cache (none: skip)",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.skip_ahead:
        with tempfile.TemporaryDirectory() as tmp:
            fresh, resumed, walked = skip_ahead(tmp, batch_size=a.batch_size)
        print(
            f"skip-ahead: first batch {fresh * 1000:.0f} ms fresh, {resumed * 1000:.0f} ms resumed at sample "
            f"10^6 of 10^7 (10,000 shards of 1,000, 32 readers: rank 0 resumes {walked} samples into its "
            "current block of 4 shards, passed by header walks; the shards before it are not opened)"
        )
        return resumed

    with tempfile.TemporaryDirectory() as tmp:
        shards = a.shards
        if shards is None:
            shape = (4, a.latent_size, a.latent_size)
            shards = write_synthetic_cache(tmp, a.samples, 8, shape, tuple(a.text_dims))
            print(f"synthetic cached shards: {a.samples} samples, latents {list(shape)}, text {a.text_dims}")
        rates = {}
        for w in a.workers:
            rates[w], batch = loader_rate(shards, a.batch_size, w, a.epochs)
            print(f"loader, cached shards, {w} worker(s): {rates[w]:,.0f} samples/s")
        if a.buckets:
            sizes = [tuple(int(v) for v in b.split("x")) for b in a.buckets]
            bucketed = write_synthetic_cache(
                Path(tmp) / "bucketed", a.samples, 8, (4, *sizes[0]), tuple(a.text_dims), buckets=sizes
            )
            for w in a.workers:
                rate, _ = loader_rate(
                    bucketed, a.batch_size, w, a.epochs, bucketed=True, epoch_samples=a.samples
                )
                rates[f"{w}, {len(sizes)} buckets"] = rate
                print(
                    f"loader, bucketed cache ({len(sizes)} buckets {a.buckets}), {w} worker(s): "
                    f"{rate:,.0f} samples/s"
                )
    consumed, seconds = train_step_rate(batch, a.steps, tuple(a.channels))
    shapes = {k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    print(f"toy training proxy (UNet {a.channels}, {a.threads} threads, {shapes}):")
    print(f"  {seconds * 1000:.0f} ms per step = {consumed:,.0f} samples/s consumed")
    worst = min(rates, key=rates.get)
    ratio = rates[worst] / consumed
    ok = ratio >= a.min_ratio
    print(
        f"bench-data: loader {rates[worst]:,.0f} samples/s (slowest, {worst} workers) vs training "
        f"{consumed:,.0f} samples/s: {ratio:.0f}x ({'OK' if ok else 'FAIL'}, need >= {a.min_ratio:g}x)"
    )
    if not ok:
        raise SystemExit(1)
    return ratio


if __name__ == "__main__":
    main()
