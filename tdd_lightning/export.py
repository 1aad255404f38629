"""Export the trained LoRA (student or EMA target) from a checkpoint as files other tools load.

Two formats, both safetensors with the same ``tdd.*`` metadata (rank, alpha, target modules, the
recommended scheduler and its settings, the TDD knobs the model was trained with):

- diffusers: ``pytorch_lora_weights.safetensors`` for ``load_lora_weights`` of the family's pipeline
  (``StableDiffusionXLPipeline``, ``StableDiffusionPipeline`` or ``FluxPipeline``; ``tdd.family`` and
  ``tdd.pipeline`` name it). The tensors are the peft state dict as-is (keys ``unet.<module>.lora_A.weight``;
  ``transformer.<module>...`` for FLUX: the family's ``lora_prefix``), which is what
  ``get_peft_model_state_dict(unet, adapter_name=role)`` gives, and the peft LoraConfig travels in the
  ``lora_adapter_metadata`` header key, so that loading at scale 1.0 reproduces the trained model whatever
  ``lora_alpha`` was (docs/STACK_NOTES.md: both silent traps avoided).
- kohya / ComfyUI: ``lora_unet_<module path, dots as underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (the scale alpha / rank is carried by ``.alpha``).

The export only renames checkpoint tensors: the base model is never loaded. Every file is written to a
temporary file in the target folder and moved into place with ``os.replace`` (never a half-written file).

    python -m tdd_lightning.export CKPT --out DIR [--role student|target|ema|both|all]
        [--format diffusers|kohya|both]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tdd_lightning.checkpoint_io import CheckpointError, atomic_write, load_checkpoint
from tdd_lightning.errors import ConfigError, UserError, report
from tdd_lightning.models.dtypes import DTYPES
from tdd_lightning.strategies.inference import recorded_inference

ROLES = ("student", "target", "ema")  # ema: the evaluation EMA, when the run kept one
FORMATS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
METADATA_VERSION = "1"
# the diffusers header key that carries the peft LoraConfig (diffusers.loaders.lora_base)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# "<anything>unet.<module>.lora_A.<role>.weight" in a TDDModule checkpoint's state_dict
_CKPT_KEY = re.compile(r"^(?:.*\.)?unet\.(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<role>[^.]+)\.weight$")


@dataclass(frozen=True)
class LoRASpec:
    """The adapter's shape: what peft needs to rebuild it, and the scale alpha / rank."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self) -> dict[str, Any]:
        """LoraConfig kwargs (the ``lora_adapter_metadata`` diffusers passes to ``LoraConfig(**...)``).

        Only the fields that define the adapter's function, all valid in every peft release since 0.7,
        rather than the whole ``to_dict()`` whose newer keys an older peft would reject.
        """
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }


# ---- reading checkpoints ---------------------------------------------------------------------------
def lora_tensors(state_dict: Mapping[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
    """The role's LoRA tensors renamed to the peft state dict: ``<module>.lora_A.weight`` (no prefix)."""
    if role not in ROLES:
        raise ValueError(f"role={role!r} is not one of {ROLES}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        m = _CKPT_KEY.match(key)
        if m and m["role"] == role:
            out[f"{m['module']}.lora_{m['ab']}.weight"] = tensor
    if not out:
        roles = sorted({m["role"] for k in state_dict if (m := _CKPT_KEY.match(k))})
        raise CheckpointError(f"no LoRA tensors for role {role!r} in the checkpoint (roles found: {roles})")
    modules = {k.rsplit(".lora_", 1)[0] for k in out}
    broken = sorted(m for m in modules if f"{m}.lora_A.weight" not in out or f"{m}.lora_B.weight" not in out)
    if broken:
        raise CheckpointError(f"LoRA tensors of {role!r} lack lora_A or lora_B for {broken[:3]}")
    return dict(sorted(out.items()))


def check_finite(tensors: Mapping[str, torch.Tensor], role: str, dtype: str | None = None) -> None:
    """CheckpointError if a LoRA tensor holds NaN or Inf: such a file samples black images, silently."""
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        cast = f" after the cast to {dtype} (out of its range)" if dtype else ""
        raise CheckpointError(
            f"{len(bad)} of the {role} LoRA tensors hold NaN or Inf{cast} (first: {bad[0]}); refusing to "
            "export a LoRA that samples garbage: export an earlier checkpoint (e.g. last_good.ckpt)"
        )


def lora_spec(ckpt: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> LoRASpec:
    """Rank, alpha and target modules from the checkpoint's hyper-parameters (alpha None = rank)."""
    hp = ckpt.get("hyper_parameters") or {}
    lora = dict((hp.get("model") or {}).get("lora") or (ckpt.get("tdd_lightning") or {}).get("lora") or {})
    rank = lora.get("rank")
    if rank is None and tensors:  # fall back to the tensors: lora_A is [r, in, ...]
        rank = next(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    if rank is None:
        raise CheckpointError("the checkpoint records no LoRA rank (hyper_parameters.model.lora.rank)")
    alpha = lora.get("alpha")
    alpha = float(rank if alpha is None else alpha)
    targets = tuple(lora.get("target_modules") or checkpoint_family(ckpt).lora_targets)
    if tensors:
        ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
        if ranks != {int(rank)}:
            raise CheckpointError(f"LoRA tensors have rank(s) {sorted(ranks)} but the config says {rank}")
    return LoRASpec(int(rank), alpha, targets)


def checkpoint_family(ckpt: Mapping[str, Any]):
    """The ModelFamily a checkpoint was trained on (``hyper_parameters.model.family``; SDXL without it)."""
    from tdd_lightning.models.families import get_family

    return get_family(((ckpt.get("hyper_parameters") or {}).get("model") or {}).get("family"))


# ---- the two formats -------------------------------------------------------------------------------
def diffusers_state_dict(
    tensors: Mapping[str, torch.Tensor], prefix: str = "unet"
) -> dict[str, torch.Tensor]:
    """peft state dict -> the diffusers LoRA file's keys (``unet.`` prefix, as save_lora_weights, for the SDXL
    and SD1.5 pipelines' loaders; ``transformer.`` for FluxPipeline's)."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def kohya_state_dict(tensors: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft state dict -> kohya / ComfyUI keys; ``.alpha`` per module carries the scale alpha / rank."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, ab = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if ab.startswith('A') else 'lora_up'}.weight"] = tensor
        out.setdefault(f"{name}.alpha", torch.tensor(float(alpha), dtype=tensor.dtype))
    return dict(sorted(out.items()))


# ---- metadata --------------------------------------------------------------------------------------
def tdd_metadata(ckpt: Mapping[str, Any], role: str, spec: LoRASpec) -> dict[str, str]:
    """Flat ``tdd.*`` safetensors metadata (strings; structured values as JSON)."""
    hp = ckpt.get("hyper_parameters") or {}
    selection = dict(hp.get("target_selection") or {})
    guidance = dict(hp.get("guidance") or {})
    schedule, guidance_scale = recorded_inference(hp)  # what the strategies recorded in training
    family = checkpoint_family(ckpt)
    scheduler_module = (
        "scheduling_tdd_flow" if family.scheduler_class == "TDDFlowScheduler" else "scheduling_tdd"
    )
    meta = {
        "tdd.format_version": METADATA_VERSION,
        "tdd.role": role,
        "tdd.lora.rank": str(spec.rank),
        "tdd.lora.alpha": f"{spec.alpha:g}",
        "tdd.lora.target_modules": json.dumps(list(spec.target_modules)),
        "tdd.base_model": str((hp.get("model") or {}).get("pretrained", "")),
        "tdd.family": family.name,
        "tdd.pipeline": family.pipeline_class,
        "tdd.global_step": str(ckpt.get("global_step", "")),
        "tdd.scheduler": family.scheduler_class,
        "tdd.scheduler_module": f"tdd_lightning.{scheduler_module}",
        "tdd.scheduler_config": json.dumps(schedule.scheduler_config()),
        "tdd.recommended": json.dumps(schedule.recommended(guidance_scale)),
        "tdd.uncond": str(guidance.get("uncond", "zeros")),
        "tdd.target_selection": json.dumps(selection),
        "tdd.guidance": json.dumps(guidance),
        "tdd.ema_decay": str(hp.get("ema_decay", "")),
    }
    if "guidance_strategy" in hp:  # decoupled (CFG), embedded (the denoiser's guidance input), ...
        meta["tdd.guidance_strategy"] = str(hp["guidance_strategy"])
    if "noise_schedule" in hp:  # a flow model's shift, as trained (the scheduler must use the same)
        meta["tdd.noise_schedule"] = json.dumps(hp["noise_schedule"])
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``tdd.*`` metadata of an exported file, JSON values decoded (keys without the ``tdd.``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = f.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith("tdd."):
            continue
        try:
            out[key[4:]] = json.loads(value)
        except json.JSONDecodeError:
            out[key[4:]] = value
    return out


# ---- writing ---------------------------------------------------------------------------------------
def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]
) -> Path:
    """safetensors write to a temporary file beside ``path``, then rename (checkpoint_io.atomic_write)."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=dict(metadata)))


def _as_list(value: str | Iterable[str], allowed: tuple[str, ...], what: str) -> list[str]:
    items = list(allowed) if value in ("both", "all") else [value] if isinstance(value, str) else list(value)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ConfigError(what, value, f"choose from {allowed} or 'both'")
    return items


def roles_in(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The LoRA roles a checkpoint holds, in ``ROLES`` order."""
    found = {m["role"] for k in state_dict if (m := _CKPT_KEY.match(k))}
    return [r for r in ROLES if r in found]


def _roles(value: str | Iterable[str], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """'all': every role the checkpoint holds; 'both': student and target; else the named role(s)."""
    if value == "all":
        return roles_in(state_dict)
    if value == "both":
        return ["student", "target"]
    items = [value] if isinstance(value, str) else list(value)
    bad = [v for v in items if v not in ROLES]
    if bad or not items:
        raise ConfigError("role", value, f"choose from {ROLES}, 'both' (student and target) or 'all'")
    return items


def export_lora(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    roles: str | Iterable[str] = "all",
    formats: str | Iterable[str] = "both",
    dtype: str | None = None,
) -> dict[tuple[str, str], Path]:
    """Write ``<out_dir>/<role>/pytorch_lora_weights.safetensors`` and/or ``.../lora_kohya.safetensors``.

    ``checkpoint`` is a path or an already loaded checkpoint dict (the callback passes the one it just
    saved). ``dtype`` (fp32|fp16|bf16) casts the tensors; None keeps them (fp32: exact reproduction).
    Returns {(role, format): path}.
    """
    formats = _as_list(formats, FORMATS, "format")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("dtype", dtype, f"choose from {tuple(DTYPES)}")
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    state_dict = ckpt["state_dict"]
    roles = _roles(roles, state_dict)
    written: dict[tuple[str, str], Path] = {}
    for role in roles:
        tensors = lora_tensors(state_dict, role)
        if dtype is not None:
            tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
        check_finite(tensors, role, dtype)
        spec = lora_spec(ckpt, tensors)
        meta = tdd_metadata(ckpt, role, spec)
        folder = Path(out_dir) / role
        if "diffusers" in formats:
            prefix = checkpoint_family(ckpt).lora_prefix
            adapter = _diffusers_adapter_metadata(spec, prefix)
            header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: adapter, **meta}
            written[role, "diffusers"] = save_safetensors_atomic(
                diffusers_state_dict(tensors, prefix), folder / DIFFUSERS_WEIGHT_NAME, header
            )
        if "kohya" in formats:
            family = checkpoint_family(ckpt)
            header = {"format": "pt", **_kohya_metadata(spec, family), **meta}
            layout = family.kohya_state_dict(tensors, spec.alpha)  # FLUX: BFL names, fused q/k/v
            written[role, "kohya"] = save_safetensors_atomic(
                kohya_state_dict(tensors, spec.alpha) if layout is None else layout,
                folder / KOHYA_WEIGHT_NAME,
                header,
            )
    return written


def _diffusers_adapter_metadata(spec: LoRASpec, prefix: str = "unet") -> str:
    """The value diffusers' save_lora_weights writes: the config with a ``unet.`` (``transformer.``) prefix
    per key."""
    config = {f"{prefix}.{k}": v for k, v in spec.peft_config().items()}
    return json.dumps(config, indent=2, sort_keys=True)


def _kohya_metadata(spec: LoRASpec, family) -> dict[str, str]:
    """The sd-scripts / modelspec keys UIs read to recognise the family's LoRA."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": f"{spec.alpha:g}",
        "ss_base_model_version": family.kohya_base_model,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.title": "TDD few-step LoRA",
    }


# ---- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tdd_lightning.export",
        description="Export the LoRA of a TDD checkpoint in diffusers and/or kohya (ComfyUI) format.",
    )
    p.add_argument("checkpoint", help="a Lightning .ckpt written by train.py")
    p.add_argument("--out", required=True, help="output folder (gets <role>/ subfolders)")
    p.add_argument(
        "--role",
        default="all",
        choices=[*ROLES, "both", "all"],
        help="student, target (the EMA target), ema (the evaluation EMA, if kept), both (student and target) "
        "or all (every role the checkpoint holds; the default)",
    )
    p.add_argument("--format", default="both", choices=[*FORMATS, "both"], help="file format(s)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="cast tensors (default: as trained)")
    a = p.parse_args(argv)
    try:
        written = export_lora(a.checkpoint, a.out, roles=a.role, formats=a.format, dtype=a.dtype)
    except (UserError, OSError) as e:  # a bad file or folder: one line, not a traceback
        report(e)
        return 1
    for (role, fmt), path in written.items():
        print(f"{role:7s} {fmt:9s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
