"""The model node of the config as typed dataclasses: where the base model lives and how the LoRA looks.

``conf/model/sdxl.yaml`` lists the same keys with the same defaults (a test keeps the two in step), so
``python train.py --cfg job`` shows every knob; ``TDDModule`` reads them from a ``ModelConfig`` only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tdd_lightning.errors import ConfigError, check, check_int, check_number
from tdd_lightning.models.dtypes import DTYPES


def _strict_fields(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` as keyword arguments of ``cls``; a key that is not a field is an error naming it."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(
                f"{prefix}.{key}", values[key], f"not a key of {prefix} (known: {', '.join(names)})"
            )
    return dict(values)


@dataclass
class LoRAConfig:
    """The student's (and target's) LoRA adapters on the base UNet.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the scale is alpha / rank. None = rank (scale 1); the authors left peft's
            default 8 (scale 8/64 at rank 64).
        target_modules: module names that get adapters; None = the family's default (the 14 names of
            the authors' SDXL run, the same for SD1.5).
        fused: fp32 forwards with merged weights W + s B A (about the bare UNet's cost); False: peft's
            unmerged LoRA layers.
    """

    rank: int = 64
    alpha: float | None = None
    target_modules: list[str] | None = None
    fused: bool = True

    def __post_init__(self):
        check_int("model.lora.rank", self.rank)
        if self.alpha is not None:
            check_number("model.lora.alpha", self.alpha, 0.0)
            check(self.alpha > 0, "model.lora.alpha", self.alpha, "must be null or a number > 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LoRAConfig:
        kwargs = _strict_fields(cls, values, "model.lora")
        if kwargs.get("target_modules") is not None:
            kwargs["target_modules"] = list(kwargs["target_modules"])
        return cls(**kwargs)


@dataclass
class ModelConfig:
    """The base model and its LoRA (the ``model`` config group).

    Attributes:
        family: the model family (``models/families``): ``sdxl`` or ``sd15`` (SD1.5 and SD2.x); it decides
            the loading, the condition, the UNet call, the pipeline class and the cached tensors.
        pretrained: diffusers folder or hub id of that family (offline: a local folder).
        revision: hub revision (branch, tag or commit); None = the default branch.
        variant: weight-file variant, e.g. ``fp16`` to load the fp16 files; None = the full files.
        base_dtype: dtype of the frozen base weights: fp32 | bf16 | fp16 (the LoRA stays fp32).
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory, slower).
        channels_last: UNet memory format channels_last (can help convolutions on GPUs).
        compile: torch.compile the UNet in place (the first steps are slower while compiling).
        load_encoders: also load the VAE and text encoders to encode raw pixels and captions on the
            fly (``data=raw``).
        build_if_missing: call ``builder`` to write ``pretrained`` when that folder has no UNet.
        builder: dotted path of a function called with the folder, e.g.
            ``tdd_lightning.models.tiny.build_tiny_sdxl`` (``build_tiny_sd15`` for the SD1.5 family).
        w_embedding_dim: LCM-style w-conditioning (``models.w_conditioning``): the UNet gets a zero w
            embedding of this width (diffusers' ``time_cond_proj_dim``; LCM uses 256) with the LoRA on it,
            and the student and target see the teacher's w; sampled with no CFG, the guidance scale
            (1 + w) as their input. None = off (decoupled guidance: CFG at inference).
        lora: the adapters (``LoRAConfig``).
    """

    family: str = "sdxl"
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"
    revision: str | None = None
    variant: str | None = None
    base_dtype: str = "fp32"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    load_encoders: bool = False
    build_if_missing: bool = False
    builder: str | None = None
    w_embedding_dim: int | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if self.w_embedding_dim is not None:
            check_int("model.w_embedding_dim", self.w_embedding_dim)
            check(self.w_embedding_dim >= 4, "model.w_embedding_dim", self.w_embedding_dim, "must be >= 4")
        names = ", ".join(DTYPES)
        check(self.base_dtype in DTYPES, "model.base_dtype", self.base_dtype, f"must be one of {names}")
        from tdd_lightning.models.families import FAMILIES

        known = ", ".join(FAMILIES)
        check(self.family in FAMILIES, "model.family", self.family, f"must be one of {known}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelConfig:
        """From a dict or DictConfig (resolved); unknown keys raise ``ConfigError`` naming ``model.<key>``."""
        kwargs = _strict_fields(cls, values, "model")
        kwargs["lora"] = LoRAConfig.from_mapping(kwargs.get("lora") or {})
        return cls(**kwargs)

    @classmethod
    def coerce(cls, value: ModelConfig | Mapping[str, Any]) -> ModelConfig:
        """A ``ModelConfig`` as is, or one built from a mapping."""
        return value if isinstance(value, cls) else cls.from_mapping(value)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars (what checkpoints record as ``hyper_parameters.model``)."""
        return dataclasses.asdict(self)
