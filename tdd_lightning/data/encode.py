"""Offline cache: raw shards -> shards of VAE latents and the model family's condition tensors.

    python -m tdd_lightning.data.encode "data/raw/train-{000000..000099}.tar" data/cache/train \\
        --model /data/sdxl-base-1.0 --resolution 1024 --device cuda --dtype fp16 [--family sd15]

Each input shard gives one output shard of the same name. Each sample holds ``<key>.safetensors``
(``latents`` fp16, already times ``vae.config.scaling_factor``; the family's text tensors in
``--embeds-dtype``, its other condition tensors float32: SDXL prompt embeddings, pooled embeddings and
the six time ids, SD1.5 the prompt embeddings) and ``<key>.txt`` (the caption). The out folder also gets
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

from tdd_lightning.data.cache_folder import StagedFolder, check_output_folder
from tdd_lightning.errors import exit_on_user_error
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
    """One ShardWriter per output shard, each closed once its reader has moved on to a later shard."""

    def __init__(self, out_dir: Path, shards: list[str], names: list[str], workers: int):
        self.out_dir, self.names, self.workers = out_dir, names, max(workers, 1)
        self.index = {url: i for i, url in enumerate(shards)}
        self.writers: dict = {}
        self.counts: dict[str, int] = {}

    def write(self, url: str, key: str, blob: dict[str, torch.Tensor], caption: str) -> None:
        from tdd_lightning.data.shards import ShardWriter

        s = self.index[url]
        if s not in self.writers:
            # a reader handles its shards in order (shard i goes to worker i % workers): the one
            # before this of the same reader is complete
            for done in [j for j in self.writers if j % self.workers == s % self.workers and j < s]:
                self.writers.pop(done).close()
            self.writers[s] = ShardWriter(self.out_dir / self.names[s])
        self.writers[s].write(key, {"safetensors": _sample_bytes(blob), "txt": caption.encode()})
        self.counts[self.names[s]] = self.counts.get(self.names[s], 0) + 1

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def _encode_loop(
    loader, encoder, outputs: _ShardOutputs, sample_latents: bool, generator, embeds_dtype, progress: bool
) -> tuple[list[int] | None, dict[str, list[int]]]:
    """Encode every batch and write its samples; returns the latent shape (None: no batch) and the
    per-sample shape of each condition tensor."""
    from tdd_lightning.progress import progress_bar

    latent_shape, shapes = None, {}
    bar = progress_bar(unit="img", desc="encode", enabled=progress)
    for batch in loader:
        out = encoder(batch, sample=sample_latents, generator=generator)
        latent_shape = list(out["latents"].shape[1:])
        text_keys = encoder.family.text_keys
        for i, url in enumerate(batch["url"]):
            blob = {"latents": out["latents"][i].half()}
            for k in encoder.family.cond_keys:
                blob[k] = out[k][i].to(embeds_dtype if k in text_keys else torch.float32)
                shapes[k] = list(blob[k].shape)
            outputs.write(url, batch["key"][i], blob, out["caption"][i])
        bar.update(len(batch["key"]))
        bar.set_postfix(skipped=loader.dataset.skips.total, refresh=False)
    bar.close()
    outputs.close()
    return latent_shape, shapes


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
) -> dict:
    """Encode every raw shard of ``in_shards`` with ``encoder`` (a family's ``Encoder``) into ``out_dir``.

    Returns the metadata written to ``meta.json`` (counts included). Bad samples are skipped, counted
    and reported like in training; no usable sample at all raises ``NoValidSamplesError``.
    Steps: check the paths; into a partial folder beside ``out_dir``: read the shards (frozen crops and
    flips), encode and write each sample, the encoded empty prompt, ``meta.json``; rename it into place.
    """
    from torch.utils.data import DataLoader

    from tdd_lightning.data.dataset import NoValidSamplesError, RawDecoder, ShardDataset, collate
    from tdd_lightning.data.preprocess import SDXLPreprocess

    shards, out = check_paths(in_shards, out_dir, overwrite)
    names = _output_names(shards)

    resolution = resolution or encoder.vae.config.sample_size
    workers = min(num_workers, len(shards))
    preprocess = SDXLPreprocess(resolution, center_crop=center_crop, random_flip=random_flip)
    decoder = RawDecoder(preprocess, empty_captions=empty_captions)
    dataset = ShardDataset(shards, decoder, shuffle=False, seed=seed, num_workers=workers, return_url=True)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    generator = torch.Generator(encoder.device).manual_seed(seed) if sample_latents else None

    start = time.time()
    with StagedFolder(out) as staged:
        outputs = _ShardOutputs(staged.path, shards, names, workers)
        latent_shape, shapes = _encode_loop(
            loader, encoder, outputs, sample_latents, generator, embeds_dtype, progress
        )
        if not outputs.counts:
            raise NoValidSamplesError(
                f"no valid sample in {len(shards)} shard(s) ({shards[0]}, ...): "
                f"{dataset.skips.total} skipped {dataset.skips.by_reason()}"
            )

        uncond = _write_uncond(encoder, staged.path)
        family = encoder.family
        meta = {
            "family": family.name,
            "tensors": ["latents", *family.cond_keys],
            "tensor_shapes": shapes,
            "resolution": resolution,
            "center_crop": center_crop,
            "random_flip": random_flip,
            "sample_latents": sample_latents,
            "seed": seed,
            "scaling_factor": encoder.vae.config.scaling_factor,
            "latent_shape": latent_shape,
            "text_shapes": {k: list(v.shape) for k, v in uncond.items()},
            "latents_dtype": "float16",
            "embeds_dtype": str(embeds_dtype).removeprefix("torch."),
            "samples": sum(outputs.counts.values()),
            "skipped": dataset.skips.by_reason(),
            "empty_captions_kept": dataset.notes.count("empty_caption_kept"),
            "shards": outputs.counts,
            "seconds": round(time.time() - start, 2),
        }
        (staged.path / "meta.json").write_text(json.dumps(meta, indent=1))
        staged.publish()
    return meta


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
        "--family", choices=["sdxl", "sd15"], default="sdxl", help="model family (sd15: SD1.5 and SD2.x)"
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
    a = p.parse_args(argv)
    check_paths(a.in_shards, a.out_dir, a.overwrite)  # before the (slow) encoder load

    from tdd_lightning.models.families import get_family

    encoder = get_family(a.family).encoder_from_pretrained(a.model, dtype=DTYPES[a.dtype]).to(a.device)
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
    )
    print(
        f"wrote {meta['samples']} samples in {len(meta['shards'])} shard(s) to {a.out_dir} "
        f"({meta['seconds']} s; skipped {meta['skipped'] or 0}); latents {meta['latent_shape']}"
    )
    return meta


if __name__ == "__main__":
    exit_on_user_error(main)
