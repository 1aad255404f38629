"""Offline cache: raw shards -> shards of VAE latents and the model family's condition tensors.

    python -m tdd_lightning.data.encode "data/raw/train-{000000..000099}.tar" data/cache/train \\
        --model /data/sdxl-base-1.0 --resolution 1024 --device cuda --dtype fp16 [--family sd15]

Each input shard gives one output shard of the same name (with ``--buckets``, one per bucket it has
samples of, in the bucket's folder ``<h>x<w>/``). Each sample holds ``<key>.safetensors`` (``latents``
fp16, already (z - ``vae.config.shift_factor``, FLUX's) times ``vae.config.scaling_factor``; the family's
text tensors in ``--embeds-dtype``, its other condition tensors float32: SDXL prompt embeddings, pooled
embeddings and the six time ids, SD1.5 the prompt embeddings) and ``<key>.txt`` (the caption).
LAION-style filters (``--min-size --min-aesthetic --max-watermark --max-nsfw --filter``) are counted per
reason. The out folder also gets
``uncond.safetensors`` (the encoded empty prompt "", float32) and ``meta.json`` (the family, the tensor
names and shapes, settings and counts). Crop and flip are drawn once here and frozen in the cache (the
geometry the family conditions on records them). Training with ``data.mode=cached`` then never loads
the VAE or text encoders.

The out folder may not be, contain or lie inside an input shard's folder; the cache is written beside it
and renamed into place when complete, so an error or a kill never leaves half a cache where a good one
was (``tdd_lightning.data.cache_folder``). ``--overwrite`` replaces a previous cache only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tdd_lightning.data.buckets import NAMED
from tdd_lightning.data.cache_folder import StagedFolder, check_output_folder
from tdd_lightning.data.filters import SampleFilter
from tdd_lightning.errors import UserError, exit_on_user_error
from tdd_lightning.models.dtypes import DTYPES


def _out_name(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name if name.endswith(".tar") else name + ".tar"


def _sample_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


def _output_names(shards: list[str]) -> list[str]:
    """The output shard names: one per input, distinct."""
    names = [_out_name(s) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(
            "input shards must have distinct file names (each gives the output shard of that name)"
        )
    return names


def check_paths(in_shards: str | list[str], out_dir: str | os.PathLike, overwrite: bool) -> tuple[list, Path]:
    """(input shards, resolved output folder): every input exists, the output is safe to write."""
    from tdd_lightning.data.shards import check_shards_exist, expand_shards

    shards = expand_shards(in_shards)
    check_shards_exist(shards)
    return shards, check_output_folder(shards, out_dir, overwrite)


class _ShardOutputs:
    """One ShardWriter per (output shard, bucket); those of a shard are closed once its reader has moved on
    to a later shard and none of its samples waits for a batch any more."""

    def __init__(self, out_dir: Path, shards: list[str], names: list[str], workers: int, bucketed: bool):
        self.out_dir, self.names, self.workers, self.bucketed = out_dir, names, max(workers, 1), bucketed
        self.index = {url: i for i, url in enumerate(shards)}
        self.writers: dict[tuple[int, str], object] = {}
        self.counts: dict[str, dict[str, int]] = {}  # bucket -> output shard -> samples
        self.pending: dict[int, int] = {}  # shard -> samples waiting for their bucket's batch
        self.latest: dict[int, int] = {}  # reader -> the latest shard it sent
        self.read: set[int] = set()  # shards their reader has moved past

    def arrived(self, url: str) -> None:
        s = self.index[url]
        reader = s % self.workers  # a reader handles its shards in order (shard i goes to worker i % W)
        before = self.latest.get(reader)
        if before is not None and before != s:
            self.read.add(before)
        self.latest[reader] = s
        self.pending[s] = self.pending.get(s, 0) + 1

    def write(self, url: str, bucket: str, key: str, blob: dict[str, torch.Tensor], caption: str) -> None:
        from tdd_lightning.data.shards import ShardWriter

        s = self.index[url]
        if (s, bucket) not in self.writers:
            folder = self.out_dir / bucket if self.bucketed else self.out_dir
            self.writers[s, bucket] = ShardWriter(folder / self.names[s])
        self.writers[s, bucket].write(key, {"safetensors": _sample_bytes(blob), "txt": caption.encode()})
        per = self.counts.setdefault(bucket, {})
        per[self.names[s]] = per.get(self.names[s], 0) + 1
        self.pending[s] -= 1
        if self.pending[s] == 0 and s in self.read:
            self._close(s)

    def _close(self, s: int) -> None:
        for k in [k for k in self.writers if k[0] == s]:
            self.writers.pop(k).close()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}

    @property
    def samples(self) -> int:
        return sum(n for per in self.counts.values() for n in per.values())


def _encode_batch(samples: list[dict], encoder, outputs: _ShardOutputs, bucket: str, opts: dict) -> list[int]:
    """Encode one batch of samples of one bucket and write them; returns the latent shape."""
    from tdd_lightning.data.dataset import collate

    batch = collate(samples)
    out = encoder(batch, sample=opts["sample_latents"], generator=opts["generator"])
    family = encoder.family
    dtypes = {"latents": torch.float16, **{k: opts["embeds_dtype"] for k in family.text_keys}}
    for i, url in enumerate(batch["url"]):
        blob = {k: out[k][i].to(dtypes.get(k, torch.float32)) for k in ("latents", *family.cond_keys)}
        outputs.write(url, bucket, batch["key"][i], blob, out["caption"][i])
    opts["tensor_shapes"].update({k: list(out[k].shape[1:]) for k in family.cond_keys})
    return list(out["latents"].shape[1:])


def _encode_loop(
    loader, encoder, outputs: _ShardOutputs, batch_size: int, opts: dict, progress: bool
) -> dict:
    """Group samples by bucket (their pixels' size), encode every full batch, then the rest; returns the
    latent shape per bucket."""
    from tdd_lightning.data.buckets import bucket_name
    from tdd_lightning.progress import progress_bar

    shapes: dict[str, list[int]] = {}
    pending: dict[str, list[dict]] = {}
    bar = progress_bar(unit="img", desc="encode", enabled=progress)
    for sample in loader:
        outputs.arrived(sample["url"])
        bucket = bucket_name(tuple(sample["pixels"].shape[-2:]))
        pending.setdefault(bucket, []).append(sample)
        if len(pending[bucket]) == batch_size:
            shapes[bucket] = _encode_batch(pending.pop(bucket), encoder, outputs, bucket, opts)
            bar.update(batch_size)
            bar.set_postfix(skipped=loader.dataset.skips.total, refresh=False)
    outputs.read |= set(outputs.index.values())
    for bucket, samples in sorted(pending.items()):
        shapes[bucket] = _encode_batch(samples, encoder, outputs, bucket, opts)
        bar.update(len(samples))
    bar.close()
    outputs.close()
    return shapes


def _write_uncond(encoder, out_dir: Path) -> dict[str, torch.Tensor]:
    """``uncond.safetensors``: the encoded empty prompt's text tensors (float32). Returns them."""
    from safetensors.torch import save_file

    text = {k: v[0].contiguous() for k, v in encoder.encode_captions([""]).items()}
    save_file(text, str(out_dir / "uncond.safetensors"))
    return text


def encode_shards(
    in_shards: str | list[str],
    out_dir: str | os.PathLike,
    encoder,
    *,
    resolution: int | tuple[int, int] | None = None,
    center_crop: bool = True,
    random_flip: bool = False,
    batch_size: int = 16,
    num_workers: int = 2,
    sample_latents: bool = False,
    seed: int = 0,
    embeds_dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    progress: bool = True,
    empty_captions: str = "keep",
    buckets=None,
    sample_filter=None,
) -> dict:
    """Encode every raw shard of ``in_shards`` with ``encoder`` (a family's ``Encoder``) into ``out_dir``.

    Returns the metadata written to ``meta.json`` (counts included). Bad samples are skipped, counted
    and reported like in training; no usable sample at all raises ``NoValidSamplesError``.
    ``buckets`` (``sdxl`` or a list of (h, w)): each image goes to its nearest aspect-ratio bucket and
    its shard's samples of that bucket to ``out_dir/<h>x<w>/<shard name>``. ``sample_filter`` (a
    ``SampleFilter``): LAION-style filters, counted per reason in ``meta.json``'s ``filtered``.
    Steps: check the paths; into a partial folder beside ``out_dir``: read the shards (frozen crops and
    flips), encode and write each sample, the encoded empty prompt, ``meta.json``; rename it into place.
    """
    from torch.utils.data import DataLoader

    from tdd_lightning.data.buckets import bucket_name, parse_buckets
    from tdd_lightning.data.dataset import SKIP_REASONS, NoValidSamplesError, RawDecoder, ShardDataset
    from tdd_lightning.data.filters import SampleFilter
    from tdd_lightning.data.preprocess import SDXLPreprocess

    shards, out = check_paths(in_shards, out_dir, overwrite)
    names = _output_names(shards)
    buckets = parse_buckets(buckets)
    sample_filter = sample_filter or SampleFilter()

    resolution = resolution or encoder.vae.config.sample_size
    workers = min(num_workers, len(shards))
    preprocess = SDXLPreprocess(resolution, center_crop=center_crop, random_flip=random_flip, buckets=buckets)
    decoder = RawDecoder(preprocess, empty_captions=empty_captions, sample_filter=sample_filter)
    dataset = ShardDataset(
        shards,
        decoder,
        shuffle=False,
        seed=seed,
        num_workers=workers,
        return_url=True,
        skip_reasons=(*SKIP_REASONS, *sample_filter.reasons),
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    generator = torch.Generator(encoder.device).manual_seed(seed) if sample_latents else None
    opts = {
        "sample_latents": sample_latents,
        "generator": generator,
        "embeds_dtype": embeds_dtype,
        "tensor_shapes": {},
    }

    start = time.time()
    with StagedFolder(out) as staged:
        outputs = _ShardOutputs(staged.path, shards, names, workers, bucketed=bool(buckets))
        shapes = _encode_loop(loader, encoder, outputs, batch_size, opts, progress)
        by_reason = dataset.skips.by_reason()
        filtered = {r: by_reason.pop(r, 0) for r in sample_filter.reasons}
        if not outputs.samples:
            raise NoValidSamplesError(
                f"no valid sample in {len(shards)} shard(s) ({shards[0]}, ...): "
                f"{dataset.skips.total} skipped {by_reason}, filtered out {filtered}"
            )

        uncond = _write_uncond(encoder, staged.path)
        family = encoder.family
        meta = {
            "family": family.name,
            "tensors": ["latents", *family.cond_keys],
            "tensor_shapes": opts["tensor_shapes"],
            "resolution": None if buckets else resolution,
            "center_crop": center_crop,
            "random_flip": random_flip,
            "sample_latents": sample_latents,
            "seed": seed,
            "scaling_factor": encoder.vae.config.scaling_factor,
            "shift_factor": getattr(encoder.vae.config, "shift_factor", None),  # FLUX: (z - shift) * scale
            "latent_shape": None if buckets else next(iter(shapes.values())),
            "text_shapes": {k: list(v.shape) for k, v in uncond.items()},
            "latents_dtype": "float16",
            "embeds_dtype": str(embeds_dtype).removeprefix("torch."),
            "samples": outputs.samples,
            "skipped": by_reason,
            "filters": sample_filter.options(),
            "filtered": filtered,
            "empty_captions_kept": dataset.notes.count("empty_caption_kept"),
            "shards": {} if buckets else next(iter(outputs.counts.values())),
            "seconds": round(time.time() - start, 2),
        }
        if buckets:
            meta["buckets"] = {
                name: {
                    "latent_shape": shapes[name],
                    "samples": sum(outputs.counts[name].values()),
                    "shards": dict(sorted(outputs.counts[name].items())),
                }
                for name in sorted(outputs.counts, key=lambda n: [int(v) for v in n.split("x")])
            }
            meta["bucket_list"] = [bucket_name(b) for b in buckets]
        (staged.path / "meta.json").write_text(json.dumps(meta, indent=1))
        staged.publish()
    return meta


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    """The LAION-style filter options (``tdd_lightning.data.filters``)."""
    p.add_argument("--min-size", type=float, help="keep images whose shorter side is at least this (px)")
    p.add_argument("--min-aesthetic", type=float, help="keep aesthetic score >= this (json 'aesthetic')")
    p.add_argument("--max-watermark", type=float, help="keep watermark probability <= this ('pwatermark')")
    p.add_argument("--max-nsfw", type=float, help="keep NSFW probability <= this ('punsafe')")
    p.add_argument(
        "--filter",
        action="append",
        help="generic json filter 'key<op>value' (op: >= <= == != > <); repeatable",
    )


def _bucket_arg(text: str | None):
    if not text or text.lower() in NAMED:
        return text
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise UserError(f"--buckets {text}: give sdxl or sizes like 1024x1024,832x1216") from None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description="Encode raw image/caption shards into a latent + embedding cache."
    )
    p.add_argument(
        "in_shards", help='input shards: brace pattern, glob or URL, e.g. "raw/train-{000..009}.tar"'
    )
    p.add_argument("out_dir", help="output folder (shards of the same names, uncond.safetensors, meta.json)")
    p.add_argument("--model", required=True, help="diffusers folder or hub id (VAE and text encoders)")
    p.add_argument(
        "--family",
        choices=["sdxl", "sd15", "flux"],
        default=None,
        help="model family (sd15: SD1.5 and SD2.x); default: the pipeline a local --model folder's "
        "model_index.json names, else sdxl",
    )
    p.add_argument(
        "--resolution", type=int, nargs="+", help="target size: S or H W (default: VAE sample_size)"
    )
    p.add_argument("--random-crop", action="store_true", help="random crop instead of centre crop (frozen)")
    p.add_argument("--random-flip", action="store_true", help="random horizontal flip (frozen in the cache)")
    p.add_argument(
        "--sample-latents", action="store_true", help="sample the latent distribution (default: mode)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="encoder dtype (an fp16 SDXL VAE stays fp32)"
    )
    p.add_argument("--embeds-dtype", choices=["fp16", "fp32"], default="fp16", help="stored text embeddings")
    p.add_argument("--seed", type=int, default=0, help="seeds random crops/flips and latent sampling")
    p.add_argument("--overwrite", action="store_true", help="replace a previous cache in out_dir")
    p.add_argument(
        "--empty-captions", choices=["keep", "skip"], default="keep", help="samples with an empty caption"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    p.add_argument(
        "--buckets",
        help="aspect-ratio buckets: sdxl (SDXL's ~1 MP list) or HxW,HxW,... (a folder of shards each)",
    )
    add_filter_arguments(p)
    a = p.parse_args(argv)
    check_paths(a.in_shards, a.out_dir, a.overwrite)  # before the (slow) encoder load
    buckets = _bucket_arg(a.buckets)
    sample_filter = SampleFilter(a.min_size, a.min_aesthetic, a.max_watermark, a.max_nsfw, a.filter or [])

    from tdd_lightning.models.families import family_of_folder, get_family

    family = get_family(a.family or family_of_folder(a.model))  # neither: the default family (SDXL)
    encoder = family.encoder_from_pretrained(a.model, dtype=DTYPES[a.dtype]).to(a.device)
    res = None if not a.resolution else a.resolution[0] if len(a.resolution) == 1 else tuple(a.resolution[:2])
    meta = encode_shards(
        a.in_shards,
        a.out_dir,
        encoder,
        resolution=res,
        center_crop=not a.random_crop,
        random_flip=a.random_flip,
        batch_size=a.batch_size,
        num_workers=a.num_workers,
        sample_latents=a.sample_latents,
        seed=a.seed,
        embeds_dtype=DTYPES[a.embeds_dtype],
        overwrite=a.overwrite,
        progress=not a.no_progress,
        empty_captions=a.empty_captions,
        buckets=buckets,
        sample_filter=sample_filter,
    )
    if meta.get("buckets"):
        where = ", ".join(f"{n}: {b['samples']}" for n, b in meta["buckets"].items())
        print(f"wrote {meta['samples']} samples in {len(meta['buckets'])} bucket(s) to {a.out_dir} ({where})")
    else:
        print(f"wrote {meta['samples']} samples in {len(meta['shards'])} shard(s) to {a.out_dir}")
    print(
        f"  {meta['seconds']} s; skipped {meta['skipped'] or 0}; filtered out {meta['filtered'] or 0}; "
        f"latents {meta['latent_shape'] or 'per bucket'}"
    )
    return meta


if __name__ == "__main__":
    exit_on_user_error(main)
