"""Data: webdataset shards, SDXL preprocessing, the offline latent/text cache, the shapes dataset.

Names are imported lazily, so that light tools (the shapes generator) do not pay for torch/Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "ShardDataModule": "datamodule",
    "SkippedSamplesLogger": "datamodule",
    "ShardDataset": "dataset",
    "NoValidSamplesError": "dataset",
    "collate": "dataset",
    "SDXLPreprocess": "preprocess",
    "SHAPES_VOCAB": "shapes",
    "ShapesConfig": "shapes",
    "make_shapes": "shapes",
    "encode_shards": "encode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
