"""Find a model folder (local folder or hub id) for the families' ``from_pretrained`` loaders.

This is the one code path real users take (a base model from the hub or a local copy) and the one the
tests take (a tiny random pipeline written with ``save_pretrained``). Without network, a hub id fails
within seconds with a message that says to pass a local folder.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tdd_lightning.errors import UserError

# what a download fetches: every family's component folders (a family without one simply has none)
SUBFOLDERS = (
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)


class ModelNotFoundError(UserError):
    """The model could not be found locally and the hub cannot be reached (one-line reason)."""


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


def resolve_model_path(
    pretrained: str | os.PathLike,
    revision: str | None = None,
    required: tuple[str, ...] = ("unet", "scheduler"),
) -> Path:
    """A local folder holding the pipeline: the path itself, the hub cache, or a fresh download.
    ``required``: the subfolders a local folder must have (a flow family: transformer/, not unet/)."""
    path = Path(os.path.expanduser(str(pretrained)))
    if path.is_dir():
        missing = [s for s in required if not (path / s).is_dir()]
        if missing:
            raise ModelNotFoundError(
                f"{path} is not a diffusers model folder (missing {', '.join(missing)}/)"
            )
        return path
    if not is_hub_id(pretrained):
        raise ModelNotFoundError(f"model folder {path} does not exist (give a diffusers model folder)")
    from huggingface_hub import snapshot_download

    repo_id = str(pretrained)
    try:  # already in the local hub cache: no network needed
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"'{repo_id}' is not in the local hub cache and the hub cannot be reached (offline); "
            "pass a local diffusers folder instead, e.g. model.pretrained=/path/to/model-folder"
        )
    patterns = [f"{s}/*" for s in SUBFOLDERS] + ["model_index.json"]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def load_frozen_parts(
    root: Path,
    *,
    denoiser: tuple[type, str],
    text_encoders: tuple[tuple[type, str], ...],
    tokenizers: tuple[tuple[type, str], ...],
    scheduler: tuple[type, str],
    dtype,
    variant: str | None = None,
    load_vae: bool = True,
    load_text_encoders: bool = True,
) -> tuple:
    """The parts of a diffusers pipeline folder, frozen and in eval mode: (denoiser, vae, text encoders,
    tokenizers, noise scheduler). Each spec is (class, subfolder); the VAE is the folder's ``AutoencoderKL``.
    ``load_vae`` / ``load_text_encoders`` = False give None in those places (cached training needs none)."""
    from diffusers import AutoencoderKL

    kw = {"torch_dtype": dtype, "variant": variant} if variant else {"torch_dtype": dtype}
    model = denoiser[0].from_pretrained(root, subfolder=denoiser[1], **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw) if load_vae else None
    if load_text_encoders:
        encoders = tuple(cls.from_pretrained(root, subfolder=sub, **kw) for cls, sub in text_encoders)
        toks = tuple(cls.from_pretrained(root, subfolder=sub) for cls, sub in tokenizers)
    else:
        encoders, toks = (None,) * len(text_encoders), (None,) * len(tokenizers)
    noise_scheduler = scheduler[0].from_pretrained(root, subfolder=scheduler[1])
    for m in (model, vae, *encoders):
        if m is not None:
            m.requires_grad_(False).eval()
    return model, vae, encoders, toks, noise_scheduler
