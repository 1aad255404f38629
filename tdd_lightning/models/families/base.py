"""ModelFamily: everything a base-model family decides, behind one interface (chosen by ``model.family``).

The training step, the strategies, the data module, the sampler, the export and the pipelines speak only
to this interface, never to one family's tensors. A family owns:
- loading its components with ``from_pretrained`` (local folder or hub id, one fail-fast offline
  message: ``models.loading``) and a tiny random factory for tests (``build_tiny``);
- its encoder (VAE + text encoders): captions -> the text parts of its condition (``text_keys``);
  image geometry (original size, crop top-left, target size) -> its other parts (``geometry``);
- what its cached shards and batches hold (``cond_keys``) and the unconditional condition u (the text
  parts zeros or the encoded "", one convention everywhere);
- how to call its denoiser (``denoise``), its default LoRA target modules, its diffusers pipeline class
  (``pipeline_class``) and the kohya/modelspec names an exported file carries;
- where the adversarial heads read the teacher's features (``discriminator_sites``).
The noise schedule and the prediction type (eps, v or x0) are the model's scheduler config's
(``noise_schedule``, ``prediction_type``: the hooks a flow-matching family overrides); the conversions
of a model output to (eps, x0) live in ``diffusion.prediction``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tdd_lightning.diffusion import NoiseSchedule, unhonoured_keys
from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.models import conditioning
from tdd_lightning.models.conditioning import Cond
from tdd_lightning.models.features import FeatureSite
from tdd_lightning.models.roles import SDXL_LORA_TARGETS

# LoRA targets of the authors' SDXL run (ALGORITHM.md section 6); their SD1.5 trainer uses the same names
LORA_TARGETS = SDXL_LORA_TARGETS


class MissingConditionError(UserError, KeyError):
    """A batch lacks a condition tensor the family needs (e.g. a cache encoded for another family)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ModelFamily:
    """Base class; subclasses set the class attributes and implement the methods that raise here."""

    name = "base"
    pipeline_class = ""  # the diffusers pipeline class name (sampling and export)
    denoiser_subfolder = "unet"  # the model folder's denoiser (a flow family: "transformer")
    lora_prefix = "unet"  # the key prefix of the pipeline's LoRA files (``load_lora_weights``)
    scheduler_class = "TDDScheduler"  # the TDD sampler of the family's noise process (pipelines.py)
    # CFG's negative in the family's stock pipeline: "zeros" (SDXL: force_zeros_for_empty_prompt) or the
    # encoded "" ("empty_prompt": SD1.5, FLUX's true CFG)
    pipeline_uncond = "zeros"
    text_keys: tuple[str, ...] = ()  # condition parts the unconditional condition replaces
    cond_keys: tuple[str, ...] = ()  # every condition tensor of a batch / cached shard (text first)
    lora_targets: tuple[str, ...] = LORA_TARGETS
    addition_embed_type: str | None = None  # the UNet config's added condition (SDXL: "text_time")
    kohya_base_model = ""  # ss_base_model_version of a kohya file
    modelspec_architecture = ""  # modelspec.architecture of a kohya file

    # set by each family: its loader function, its Encoder subclass, its tiny builder in models/tiny.py
    loader = None
    encoder_class = None
    tiny_builder = ""

    # ---- loading -------------------------------------------------------------------------------------
    def load(self, pretrained: str | os.PathLike, **kwargs):
        """The components (``.unet``, ``.vae``, ``.noise_scheduler``, ``.to_pipeline(scheduler)``) from a
        folder or hub id; ``revision``, ``variant``, ``dtype``, ``load_vae``, ``load_text_encoders``."""
        return type(self).loader(pretrained, **kwargs)

    def encoder(self, components):
        """The frozen encoder (VAE + text encoders) of loaded ``components``."""
        return self.encoder_class.from_components(components)

    def encoder_from_pretrained(self, pretrained, **kwargs):
        """Only the VAE and text encoders (not the UNet) from a folder or hub id (``dtype``, ...)."""
        return self.encoder_class.from_pretrained(pretrained, **kwargs)

    def build_tiny(self, out_dir: str | os.PathLike, cfg=None) -> Path:
        """A tiny random pipeline of this family, written with ``save_pretrained``."""
        from tdd_lightning.models import tiny

        return getattr(tiny, self.tiny_builder)(out_dir, cfg)

    def check_unet(self, unet_config: Mapping) -> None:
        """UserError when the UNet is not of this family (its added condition says which one it is)."""
        added = unet_config.get("addition_embed_type")
        if added != self.addition_embed_type:
            other = "sdxl" if added == "text_time" else "sd15" if added is None else None
            hint = f": set model.family={other}" if other else ""
            raise UserError(
                f"model.family={self.name} expects a UNet with addition_embed_type="
                f"{self.addition_embed_type!r}, this one has {added!r}{hint}"
            )

    def check_guidance(self, unet_config: Mapping, embedded: bool) -> None:
        """UserError when the guidance strategy cannot drive this denoiser (``embedded``: the strategy gives
        w as the denoiser's guidance input, which only a guidance-distilled flow transformer has)."""
        if embedded:
            raise UserError(
                f"guidance=embedded needs a guidance-distilled transformer (model.family=flux with "
                f"guidance_embeds); model.family={self.name} has no guidance input: use guidance=decoupled"
            )

    def text_shapes(self, pretrained: str | os.PathLike) -> dict[str, tuple[int, ...]]:
        """The per-sample shape of each text part, read from the folder's configs (no weights)."""
        raise NotImplementedError

    def latent_shape_of(self, pretrained: str | os.PathLike) -> tuple[int, int, int]:
        """(C, h, w) of the model's latents, read from the folder's configs (no weights)."""
        import json

        config = json.loads((Path(pretrained) / self.denoiser_subfolder / "config.json").read_text())
        return int(config["in_channels"]), int(config["sample_size"]), int(config["sample_size"])

    def sample_shape(self, unet, pretrained: str | os.PathLike | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents to sample when none are given (the UNet's own sample size)."""
        return int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size)

    def fsdp_blocks(self, unet) -> list[torch.nn.Module]:
        """The denoiser's blocks FSDP2 shards one by one (a UNet: down, mid and up blocks)."""
        return [b for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if b is not None]

    def randn_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise like ``x`` (the sampler's re-noising draw, in the pipeline's layout)."""
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    # ---- the noise process --------------------------------------------------------------------------
    def noise_schedule(self, scheduler_config: Mapping) -> NoiseSchedule:
        """a_t, sigma_t of the model's scheduler config (a flow-matching family overrides this)."""
        return NoiseSchedule.from_config(scheduler_config)

    def unhonoured_scheduler_keys(self, scheduler_config: Mapping, known) -> list[str]:
        """One message per key of the model's scheduler config that training cannot honour (``known``: the
        keys the caller reads)."""
        return unhonoured_keys(scheduler_config, known)

    def prediction_type(self, scheduler_config: Mapping) -> str:
        """What the denoiser predicts (``diffusion.PREDICTION_TYPES``): the scheduler config's."""
        return str(dict(scheduler_config).get("prediction_type", "epsilon"))

    # ---- the condition -------------------------------------------------------------------------------
    def geometry(
        self, original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: Sequence[int]
    ) -> Cond:
        """The non-text condition parts of images with ``original_size`` [B, 2] (h, w), ``crop_top_left``
        [B, 2] (top, left) and target size (h, w). Base: none (the family ignores geometry)."""
        return {}

    def square_geometry(self, size: int, batch: int, device: torch.device | str | None = None) -> Cond:
        """``geometry`` of ``batch`` uncropped square images of side ``size`` px."""
        full = torch.tensor([[size, size]] * batch, dtype=torch.float32, device=device).reshape(batch, 2)
        return self.geometry(full, torch.zeros_like(full), (size, size))

    def condition(self, text: Mapping[str, torch.Tensor], geometry: Mapping[str, torch.Tensor]) -> Cond:
        """c: the text parts then the geometry parts, in ``cond_keys`` order."""
        parts = {**text, **geometry}
        return {k: parts[k] for k in self.cond_keys}

    def condition_from_batch(self, batch: Mapping) -> Cond:
        """c of a cached-format batch; a MissingConditionError names the keys it lacks."""
        missing = [k for k in self.cond_keys if k not in batch]
        if missing:
            raise MissingConditionError(
                f"the batch lacks {', '.join(missing)}, which model.family={self.name} needs "
                f"(it has {', '.join(sorted(k for k in batch if k not in ('caption', 'key', 'url')))}): "
                "was the cache encoded with another model family?"
            )
        return {k: batch[k] for k in self.cond_keys}

    def unconditional_like(self, cond: Cond, uncond_text: Mapping[str, torch.Tensor] | None) -> Cond:
        """u for every sample of ``cond``: text parts zeros (``uncond_text`` None) or the encoded ""."""
        return conditioning.unconditional_like(cond, uncond_text, self.text_keys)

    def denoise(self, unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet's raw output (of the scheduler config's prediction type) for condition ``cond``; ``t`` is
        the schedule's ``model_time`` (a UNet's integer timestep; a flow transformer's sigma * T)."""
        raise NotImplementedError

    def cfg_outputs(self, unet, x_t, t, cond: Cond, uncond: Cond, same: torch.Tensor | None):
        """(out_c, out_u) from one batched forward (``conditioning.teacher_cfg_eps``)."""
        return conditioning.teacher_cfg_eps(self.denoise, unet, x_t, t, cond, uncond, same)

    # ---- the adversarial heads' features (ALGORITHM.md section 7) -----------------------------------
    def discriminator_sites(self, unet, names: Sequence[str] | None = None) -> list[FeatureSite]:
        """The modules whose outputs the adversarial heads read, in forward order (``names``: a subset).

        A UNet (both UNet families): its down blocks and its mid block, as the authors' SDXL trainer, each
        giving [B, C, H, W]. A transformer family overrides this with its blocks and layout "tokens"
        (token-pooled heads) and the ``select`` that picks the image tokens out of a block's output."""
        widths = list(unet.config.block_out_channels)
        sites = [FeatureSite(f"down_blocks.{i}", b, widths[i]) for i, b in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            sites.append(FeatureSite("mid_block", unet.mid_block, widths[-1]))
        return select_sites(self, sites, names)

    def kohya_state_dict(self, tensors: Mapping[str, torch.Tensor], alpha: float) -> dict | None:
        """The family's own kohya / ComfyUI key layout of a peft state dict; None: the default
        ``lora_unet_<module path>`` layout (``export.kohya_state_dict``)."""
        return None

    def batch_size(self, cond: Cond) -> int:
        return next(iter(cond.values())).shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def select_sites(
    family: ModelFamily, sites: list[FeatureSite], names: Sequence[str] | None
) -> list[FeatureSite]:
    """``sites`` restricted to ``names`` (None: all), in forward order; a ConfigError names an unknown one."""
    if names is None:
        return sites
    known = [s.name for s in sites]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            "adversarial.features",
            list(names),
            f"model.family={family.name} has the sites {', '.join(known)}",
        )
    return [s for s in sites if s.name in names]


def check_keys(family: ModelFamily, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """UserError when ``tensors`` (e.g. an uncond file) lacks one of the family's text parts."""
    missing = [k for k in family.text_keys if k not in tensors]
    if missing:
        raise UserError(
            f"{what} lacks {', '.join(missing)}, which model.family={family.name} needs "
            f"(it holds {', '.join(sorted(tensors))})"
        )
