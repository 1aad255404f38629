"""The toy evaluation suite: one fixed prompt set, real references and teacher references, many models.

A :class:`Suite` holds what every evaluated cell shares: the first ``n`` held-out captions (their
conditions and labels), the evaluator's features of ``n`` other held-out real images (for FD at equal
counts), the teacher's VAE and noise schedule. :meth:`Suite.cell` samples one model at one setting
(a :class:`~tdd_lightning.pipelines.Setting`: steps, eta, guidance, sampling seed) and scores it.
Agreement compares with the teacher's reference image of the same prompt and initial noise
(``ref_steps`` DDIM steps, eta 0, ``ref_guidance``).

Teacher cells are deterministic functions of the shipped teacher and the settings, so they are cached
on disk (``cache_dir``; keyed by the teacher's UNet file hash and the settings; written atomically and
checked on read, a bad file is recomputed: :mod:`tdd_lightning.toy.cache`).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from tdd_lightning.pipelines import Setting
from tdd_lightning.strategies.guidance import UNCOND_CONVENTIONS
from tdd_lightning.toy.cache import TeacherCache
from tdd_lightning.toy.data import labels_tensor, load_split
from tdd_lightning.toy.metrics import agreement, classify, score
from tdd_lightning.toy.sampling import encode_prompts, initial_noise, sample_images, trailing_timesteps

# a model's K-step schedule (descending timesteps)
TimestepFn = Callable[[int], list[int]]


def student_timesteps(scheduler) -> TimestepFn:
    """A TDDScheduler's or TDDFlowScheduler's K-step schedule as indices of the training schedule (its
    trained grid; warnings for untrained K silenced): its ``grid_indices`` (a flow scheduler's ``timesteps``
    are sigma * T)."""

    def timesteps(k: int) -> list[int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if getattr(scheduler.config, "use_dynamic_shifting", False):
                scheduler.set_timesteps(k, mu=0.0)  # the indices do not depend on the shift
            else:
                scheduler.set_timesteps(k)
        return [int(t) for t in scheduler.grid_indices]

    return timesteps


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def teacher_family(teacher: str | Path):
    """The model family of a teacher pipeline folder (``model_index.json``): FLUX for the flow toy teacher,
    otherwise SDXL (the UNet toy teacher's)."""
    from tdd_lightning.models.families import family_of_folder, get_family

    return get_family(family_of_folder(teacher))  # no index: the default family, SDXL


def check_uncond(uncond: str) -> str:
    if uncond not in UNCOND_CONVENTIONS:
        choices = ", ".join(UNCOND_CONVENTIONS)
        raise ValueError(f"uncond={uncond!r}: choose one of {choices} (CFG's negative condition)")
    return uncond


class Suite:
    def __init__(
        self,
        components,
        evaluator,
        data: str | Path,
        n: int = 1000,
        ref_steps: int = 50,
        ref_guidance: float = 2.0,
        cache_dir: str | Path | None = None,
        teacher_id: str = "teacher",
        device: str | torch.device = "cpu",
        progress: bool = True,
        family=None,
        uncond: str | None = None,
    ):
        from tdd_lightning.models.families.sdxl import SDXL

        self.device = torch.device(device)
        self.unet, self.vae = components.unet.to(self.device), components.vae.to(self.device)
        evaluator = evaluator.to(self.device)
        self.family = family or SDXL
        config = components.noise_scheduler.config
        self.schedule = self.family.noise_schedule(config)
        self.prediction_type = self.family.prediction_type(config)
        self.evaluator, self.n = evaluator, n
        self.ref_steps, self.ref_guidance = ref_steps, ref_guidance
        pixels, attrs = load_split(data, "heldout")
        if 2 * n > len(pixels):
            raise ValueError(f"n={n}: the held-out split of {data} has {len(pixels)} images; need 2n")
        self.prompts = attrs[:n]
        self.labels = labels_tensor(self.prompts)
        self.real_pixels = pixels[:n]
        _, self.real_feats = classify(evaluator, pixels[n : 2 * n])
        cond = encode_prompts(components, [a["caption"] for a in self.prompts], self.family)
        self.cond = {k: v.to(self.device) for k, v in cond.items()}
        # CFG's negative: the convention the teacher was trained with (None: its family's stock pipeline's)
        self.uncond = check_uncond(uncond or self.family.pipeline_uncond)
        self.uncond_text = None
        if self.uncond == "empty_prompt":
            empty = encode_prompts(components, [""], self.family)
            self.uncond_text = {k: empty[k][0].to(self.device) for k in self.family.text_keys}
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache = TeacherCache(self.cache_dir) if self.cache_dir else None
        self.teacher_id = teacher_id
        self.progress = progress  # a bar (stderr) over each cell's sampling steps
        self._refs: dict[int, torch.Tensor] = {}

    @classmethod
    def from_teacher(cls, teacher: str | Path, evaluator: str | Path, data: str | Path, **kwargs) -> Suite:
        """Load the teacher pipeline folder and the evaluator; teacher cells are cached under the hash of the
        teacher's UNet weights (``kwargs``: the other ``__init__`` arguments)."""
        from tdd_lightning.toy.classifier import load_evaluator

        family = teacher_family(teacher)
        components = family.load(str(teacher))
        weights = next(Path(teacher, family.denoiser_subfolder).glob("*.safetensors"))
        teacher_id = file_hash(weights)
        if kwargs.get("uncond") not in (None, family.pipeline_uncond):  # another negative, other cells
            teacher_id += f"/{kwargs['uncond']}"
        evaluator = load_evaluator(evaluator)
        return cls(components, evaluator, data, teacher_id=teacher_id, family=family, **kwargs)

    @property
    def teacher_name(self) -> str:
        """The teacher's rows: "teacher DDIM"; on a flow schedule the same sampler is Euler's."""
        return "teacher Euler" if self.prediction_type == "flow" else "teacher DDIM"

    @property
    def captions(self) -> list[str]:
        return [a["caption"] for a in self.prompts]

    # ---- references -----------------------------------------------------------------------------
    def real_rows(self) -> dict[str, dict[str, float]]:
        """The ceilings: real held-out images and their VAE reconstructions, scored like samples."""
        preds, feats = classify(self.evaluator, self.real_pixels)
        rows = {"real images": score(preds, feats, self.labels, self.real_feats)}
        with torch.no_grad():
            from tdd_lightning.toy.data import to_uint8, to_unit

            z = self.vae.encode(to_unit(self.real_pixels).to(self.device)).latent_dist.mode()
            recon = to_uint8(self.vae.decode(z).sample).cpu()
        preds, feats = classify(self.evaluator, recon)
        rows["VAE reconstructions"] = score(preds, feats, self.labels, self.real_feats)
        return rows

    def reference_setting(self, seed: int) -> Setting:
        return Setting(self.ref_steps, 0.0, self.ref_guidance, seed)

    def reference_features(self, seed: int) -> torch.Tensor:
        """Evaluator features of the teacher's reference images for ``seed`` (cached: memory, disk)."""
        if seed not in self._refs:
            key = self._cache_key(self.reference_setting(seed))
            shape = (self.n, self.real_feats.shape[1])  # one feature row per prompt
            cached = self.cache.read_features(key, shape) if self.cache is not None else None
            if cached is not None:
                self._refs[seed] = cached
            else:  # sampling the reference stores its features
                self._teacher_sample(self.reference_setting(seed))
        return self._refs[seed]

    # ---- cells ----------------------------------------------------------------------------------
    def images(
        self, unet, timesteps: Sequence[int], s: Setting, count: int | None = None, clip_x0=None
    ) -> torch.Tensor:
        """Samples of the first ``count`` prompts (default all n); at eta 0 the same images either way.
        ``clip_x0``: the sampler's x0 clipping (``sample_images``)."""
        x_T = initial_noise(self.n, s.seed)[:count].to(
            self.device
        )  # drawn on the CPU: the same on any device
        cond = {k: v[:count] for k, v in self.cond.items()}
        return sample_images(
            unet, self.vae, cond, x_T, list(timesteps), s.guidance, self.schedule, eta=s.eta, seed=s.seed,
            progress=self.progress, family=self.family, uncond_text=self.uncond_text,
            prediction_type=self.prediction_type, clip_x0=clip_x0,
        )  # fmt: skip

    def cell(
        self, unet, timesteps: TimestepFn, s: Setting, clip_x0=None
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics of one model at one setting (and its images, for grids); ``clip_x0`` as ``images``."""
        t0 = time.time()
        images = self.images(unet, timesteps(s.steps), s, clip_x0=clip_x0)
        preds, feats = classify(self.evaluator, images)
        res = score(preds, feats, self.labels, self.real_feats)
        res["agree"] = agreement(feats, self.reference_features(s.seed))
        res["seconds"] = time.time() - t0
        return res, images

    def teacher_cell(self, s: Setting) -> tuple[dict[str, float], torch.Tensor | None]:
        """The teacher: DDIM (trailing spacing) at ``s``; cached cells come without images."""
        key = self._cache_key(s)
        cached = self._cache_read(key)
        if cached is not None:
            return cached | {"seconds": 0.0}, None
        t0 = time.time()
        images, preds, feats = self._teacher_sample(s)
        res = score(preds, feats, self.labels, self.real_feats)
        res["agree"] = agreement(feats, self.reference_features(s.seed))
        res["seconds"] = time.time() - t0
        self._cache_write(key, res)
        return res, images

    def _teacher_sample(self, s: Setting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = self.images(self.unet, trailing_timesteps(s.steps), s)
        preds, feats = classify(self.evaluator, images)
        if s == self.reference_setting(s.seed):
            self._refs[s.seed] = feats
            if self.cache is not None:
                self.cache.write_features(self._cache_key(s), feats)
        return images, preds, feats

    # ---- teacher cache ----------------------------------------------------------------------------
    def _cache_key(self, s: Setting) -> str:
        raw = json.dumps([self.teacher_id, self.n, self.ref_steps, self.ref_guidance, asdict(s)])
        return hashlib.sha256(raw.encode()).hexdigest()[:20]

    def _cache_read(self, key: str) -> dict | None:
        return self.cache.read_cell(key) if self.cache is not None else None

    def _cache_write(self, key: str, res: dict) -> None:
        if self.cache is not None:
            self.cache.write_cell(key, res)
