"""Load SDXL components with ``from_pretrained`` from a local folder or a hub id.

This is the one code path real users take (SDXL base from the hub or a local copy) and the one the
tests take (a tiny random pipeline written with ``save_pretrained``). Without network, a hub id fails
within seconds with a message that says to pass a local folder.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from tdd_lightning.errors import UserError

SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class ModelNotFoundError(UserError):
    """The model could not be found locally and the hub cannot be reached (one-line reason)."""


@dataclass
class SDXLComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    text_encoder_2: torch.nn.Module | None
    tokenizer: object | None
    tokenizer_2: object | None
    noise_scheduler: object

    def to_pipeline(self, scheduler=None):
        """A stock ``StableDiffusionXLPipeline`` built from these parts."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=scheduler if scheduler is not None else self.noise_scheduler,
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def is_hub_id(pretrained: str | os.PathLike) -> bool:
    """``org/name`` that is not a local folder: looked up on the hub, never written to as a folder."""
    text = str(pretrained)
    if Path(os.path.expanduser(text)).is_dir():
        return False
    return not (Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") != 1)


def resolve_model_path(pretrained: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder holding the pipeline: the path itself, the hub cache, or a fresh download."""
    path = Path(os.path.expanduser(str(pretrained)))
    if path.is_dir():
        missing = [s for s in ("unet", "scheduler") if not (path / s).is_dir()]
        if missing:
            raise ModelNotFoundError(f"{path} is not a diffusers SDXL folder (missing {', '.join(missing)}/)")
        return path
    if not is_hub_id(pretrained):
        raise ModelNotFoundError(f"model folder {path} does not exist (give a diffusers SDXL folder)")
    from huggingface_hub import snapshot_download

    repo_id = str(pretrained)
    try:  # already in the local hub cache: no network needed
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"'{repo_id}' is not in the local hub cache and the hub cannot be reached (offline); "
            "pass a local diffusers folder instead, e.g. model.pretrained=/path/to/sdxl-base-1.0"
        )
    patterns = [f"{s}/*" for s in SUBFOLDERS] + ["model_index.json"]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def load_sdxl_components(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_vae: bool = True,
    load_text_encoders: bool = True,
) -> SDXLComponents:
    """Load UNet, VAE, both CLIP text encoders and tokenizers, and the noise scheduler.

    ``load_vae`` / ``load_text_encoders`` = False skip those parts (training from cached latents and
    embeddings never needs them).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = resolve_model_path(pretrained, revision)
    kw = {"torch_dtype": dtype, "variant": variant} if variant else {"torch_dtype": dtype}
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw) if load_vae else None
    te1 = te2 = tok1 = tok2 = None
    if load_text_encoders:
        te1 = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw)
        te2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **kw)
        tok1 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    for m in (unet, vae, te1, te2):
        if m is not None:
            m.requires_grad_(False).eval()
    return SDXLComponents(unet, vae, te1, te2, tok1, tok2, scheduler)
