"""A stock diffusers pipeline of the LoRA's model family with an exported TDD LoRA and the TDDScheduler.

Nothing here is a custom pipeline: the family (``tdd.family`` in the LoRA's metadata; SDXL for files
without it) picks ``StableDiffusionXLPipeline``, ``StableDiffusionPipeline`` or ``FluxPipeline`` (with
``TDDFlowScheduler`` at the shift the LoRA was trained with); the base model loads with
``from_pretrained`` (hub id or folder), the LoRA with ``load_lora_weights``, and the scheduler is
``TDDScheduler.from_config(pipe.scheduler.config)`` with the trained grid read from the LoRA file's
metadata. What any diffusers user can do by hand::

    pipe = load_tdd_pipeline("stabilityai/stable-diffusion-xl-base-1.0", "out/student")
    image = pipe("a cat", **recommended_call_kwargs(lora_metadata("out/student"))).images[0]
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tdd_lightning.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, read_metadata
from tdd_lightning.models.w_conditioning import add_w_embedding, w_embedding_dim
from tdd_lightning.strategies.inference import RECOMMENDED

DEFAULT_ADAPTER = "tdd"
# keys of the LoRA's ``tdd.scheduler_config`` that are TDDScheduler config keys
SCHEDULER_KEYS = ("num_teacher_steps", "k_min", "k_max", "trained_s_ratio", "eta")


def resolve_lora_file(lora: str | os.PathLike) -> Path:
    """An exported LoRA file, or a folder holding ``pytorch_lora_weights.safetensors`` (or the kohya file).

    A folder written by ``python -m tdd_lightning.export`` has ``student/`` and ``target/`` inside:
    passing it resolves to the student.
    """
    path = Path(os.path.expanduser(str(lora)))
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / DIFFUSERS_WEIGHT_NAME, path / "student" / DIFFUSERS_WEIGHT_NAME):
            if candidate.is_file():
                return candidate
        for candidate in (path / KOHYA_WEIGHT_NAME, path / "student" / KOHYA_WEIGHT_NAME):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"LoRA folder {path} holds no {DIFFUSERS_WEIGHT_NAME}")
    raise FileNotFoundError(f"LoRA {path} does not exist (give an exported .safetensors file or its folder)")


def lora_metadata(lora: str | os.PathLike | None) -> dict[str, Any]:
    """The ``tdd.*`` metadata of a LoRA file (empty for None or a file without it)."""
    return read_metadata(resolve_lora_file(lora)) if lora is not None else {}


def flow_shift_keys(noise_schedule: dict[str, Any] | None) -> dict[str, Any]:
    """The TDDFlowScheduler keys of the shift a flow LoRA was trained with (its ``tdd.noise_schedule``)."""
    if not noise_schedule:
        return {}
    if noise_schedule.get("type") == "static":
        return {"use_dynamic_shifting": False, "shift": float(noise_schedule["shift"])}
    keys = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")
    return {"use_dynamic_shifting": True, **{k: noise_schedule[k] for k in keys if k in noise_schedule}}


def tdd_scheduler(scheduler_config: Any, metadata: dict[str, Any] | None = None, **overrides):
    """``TDDScheduler.from_config`` of the pipeline's noise schedule plus the trained grid from the LoRA;
    ``TDDFlowScheduler`` for a flow model's config (FlowMatchEulerDiscreteScheduler's, or a LoRA whose
    ``tdd.scheduler`` says so), with the shift the LoRA was trained with."""
    config = dict(scheduler_config)
    flow = (metadata or {}).get("scheduler") == "TDDFlowScheduler" or config.get("_class_name") in (
        "FlowMatchEulerDiscreteScheduler",
        "TDDFlowScheduler",
    )
    if flow:
        from tdd_lightning.scheduling_tdd_flow import TDDFlowScheduler as TDDScheduler
    else:
        from tdd_lightning.scheduling_tdd import TDDScheduler  # imports diffusers (~4 s): not for error paths

    # TDDScheduler.from_config keeps the keys it honours, warns by name for the others, and drops the
    # values the config only holds as its class defaults (``_use_default_values``: e.g. DDPM's clip_sample)
    defaults = set(config.pop("_use_default_values", ()))
    config = {k: v for k, v in config.items() if k not in defaults}
    trained = (metadata or {}).get("scheduler_config") or {}
    config.update({k: trained[k] for k in SCHEDULER_KEYS if k in trained})
    if flow:  # training and inference use the same shift
        config.update(flow_shift_keys((metadata or {}).get("noise_schedule")))
    config.update(overrides)
    return TDDScheduler.from_config(config)


def lora_w_embedding_dim(path: Path) -> int | None:
    """The w embedding width of a w-conditioned student's LoRA file (``model.w_embedding_dim``: its
    ``time_embedding.cond_proj`` down-projection's input width), None for any other LoRA."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if "cond_proj" in key and ("lora_A" in key or "lora_down" in key):
                return int(f.get_slice(key).get_shape()[1])
    return None


def add_tdd_lora(
    pipe, lora: str | os.PathLike, scale: float = 1.0, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, Any]:
    """Load an exported LoRA into ``pipe`` at ``scale``; switch to TDDScheduler and the trained unconditional
    convention (``empty_prompt``: the encoded "" as the negative, instead of zeros). A w-conditioned LoRA
    (``models.w_conditioning``) first gives the UNet its zero w embedding layer. Returns the metadata."""
    path = resolve_lora_file(lora)
    metadata = read_metadata(path)
    dim = lora_w_embedding_dim(path)
    if dim is not None and w_embedding_dim(pipe.unet) is None:  # a w-conditioned student: its zero layer
        add_w_embedding(pipe.unet, dim)  # the pipeline then embeds guidance_scale - 1 and runs no CFG
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    if scale != 1.0:
        pipe.set_adapters([adapter_name], adapter_weights=[scale])
    pipe.scheduler = tdd_scheduler(pipe.scheduler.config, metadata)
    if metadata.get("uncond") == "empty_prompt" and "force_zeros_for_empty_prompt" in pipe.config:
        pipe.register_to_config(force_zeros_for_empty_prompt=False)  # SDXL: "" as the negative, not zeros
    return metadata


def load_tdd_pipeline(
    base: str | os.PathLike,
    lora: str | os.PathLike | None = None,
    *,
    lora_scale: float = 1.0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
    fuse: bool = False,
    family: str | None = None,
):
    """The base model (hub id or folder, via its family's loader) + LoRA + TDDScheduler.

    ``family``: ``sdxl`` or ``sd15``; None: the LoRA's recorded ``tdd.family`` (SDXL without a LoRA or
    without the key). ``lora=None`` gives the base model with the TDDScheduler (for comparisons).
    ``fuse=True`` merges the LoRA into the weights (faster; equal up to float rounding).
    """
    from tdd_lightning.models.families import get_family

    if family is None and lora is not None:
        family = lora_metadata(lora).get("family")
    parts = get_family(family).load(base, revision=revision, variant=variant, dtype=dtype)
    pipe = parts.to_pipeline(scheduler=tdd_scheduler(parts.noise_scheduler.config))
    if lora is not None:
        add_tdd_lora(pipe, lora, scale=lora_scale)
        if fuse:
            pipe.fuse_lora(lora_scale=1.0)
            pipe.unload_lora_weights()
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recommended_call_kwargs(metadata: dict[str, Any]) -> dict[str, Any]:
    """``num_inference_steps``, ``eta`` and ``guidance_scale`` recommended by the LoRA's metadata (for a
    LoRA without them: the recommended steps and eta, and no CFG, since it may not know the unconditional)."""
    rec = metadata.get("recommended") or {}
    return {
        "num_inference_steps": int(rec.get("num_inference_steps", RECOMMENDED.steps)),
        "eta": float(rec.get("eta", RECOMMENDED.eta)),
        "guidance_scale": float(rec.get("guidance_scale", RECOMMENDED.guidance_scale_without_dropout)),
    }


# ---- sampling settings and grids ---------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """How to sample: ``steps`` inference steps, ``eta`` (gamma), standard CFG scale ``guidance`` (1 = off),
    and the initial-noise ``seed``. A column of a sampling grid; a cell of the toy evaluation."""

    steps: int
    eta: float
    guidance: float
    seed: int = 0

    def title(self, varying: Sequence[str] = ("steps", "eta", "guidance")) -> str:
        """The column title, naming the ``varying`` fields (``settings_grid``'s second value)."""
        parts = {
            "steps": f"{self.steps} steps",
            "eta": f"eta {self.eta:g}",
            "guidance": f"g {self.guidance:g}",
        }
        return ", ".join(parts[k] for k in varying) or parts["steps"]

    def slug(self) -> str:
        return f"k{self.steps}_eta{self.eta:g}_g{self.guidance:g}"


def settings_grid(steps: Any, eta: Any, guidance_scale: Any) -> tuple[list[Setting], list[str]]:
    """The product of the (scalar or list) values, steps slowest; and which of the three fields vary."""
    values = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in
              {"steps": steps, "eta": eta, "guidance": guidance_scale}.items()}  # fmt: skip
    grid = [
        Setting(int(k), float(e), float(g))
        for k, e, g in itertools.product(values["steps"], values["eta"], values["guidance"])
    ]
    varying = [k for k, v in values.items() if len(v) > 1] or ["steps", "eta", "guidance"]
    return grid, varying


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    setting: Setting,
    *,
    seed: int | None = None,
    batch: int = 1,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """``batch`` images of one prompt as [batch, 3, H, W] in [0, 1]; image b starts from seed + b's noise
    (CPU generators, so a seed gives the same images on any device). ``seed`` None: the setting's."""
    seed = setting.seed if seed is None else seed
    generators = [torch.Generator("cpu").manual_seed(seed + b) for b in range(batch)]
    out = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=setting.steps,
        eta=setting.eta,
        guidance_scale=setting.guidance,
        num_images_per_prompt=batch,
        generator=generators,
        height=height,
        width=width,
        output_type="pt",
    )
    return out.images.float().cpu()
