"""Everything the benchmark runs, built the way train.py builds it: the real configs, module and trainer.

The module comes from ``conf/train.yaml`` composed with ``model=<name>`` through ``run.build_module`` (so
the strategies, optimizer and lr scheduler are the configured ones); the trainer from the ``trainer``
group (cpu or gpu), minus checkpoints, progress bar and callbacks; the data are cached-format synthetic
batches (SyntheticLatents through the project's ResumableLoader).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY_SAMPLE_SIZE = 32  # the tiny model's latent side when --sample-size is not given (256 px)
ARCH_MODELS = ("sdxl_arch", "sd15_arch")  # published UNet configs with random weights


def option(default=None, help: str | None = None, **argparse_kwargs):
    """A BenchConfig field and its command-line option (``bench.cli`` builds the parser from these).

    ``argparse_kwargs``: ``choices``; ``by_model`` ({model: default}: the option's default depends on
    ``--model``; the field's own default is the tiny model's); ``positional`` (the trailing arguments).
    """
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class BenchConfig:
    model: str = option("tiny", "conf/model/<name>.yaml", choices=("tiny", *ARCH_MODELS))
    device: str = option("cpu", "cpu | cuda | cuda:N")
    precision: str = option(
        "fp32", "bf16: bf16 base weights + bf16 autocast, fp32 LoRA", choices=("fp32", "bf16")
    )
    batch: int = option(8)
    sample_size: int | None = option(
        None,
        "latent side (default: the --pretrained folder's, else tiny 32 = 256 px; sdxl_arch 128; "
        "sd15_arch 64); given with --pretrained it overrides the folder's UNet sample_size",
        by_model={"sdxl_arch": 128, "sd15_arch": 64},
    )
    channels: tuple[int, ...] = option((32, 64), "tiny UNet blocks (block_out_channels)")
    rank: int = option(
        8, "LoRA rank (tiny 8, sdxl_arch and sd15_arch 64)", by_model={m: 64 for m in ARCH_MODELS}
    )
    threads: int = option(2, "torch CPU threads")
    clock: str = option(
        "wall", "cpu: main-thread CPU time (robust to other load; with --threads 1)", choices=("wall", "cpu")
    )
    warmup: int = option(3)
    steps: int = option(12, "measured training steps")
    naive_steps: int = option(6, "0: skip the naive mode (the diffusers script's work per step)")
    ablation: bool = option(False, "also time student fwd+bwd variants: peft low-rank, channels_last, bf16")
    budget_s: float = option(150.0, "stop measuring early past this (0: never)")
    lora: str = option("fused", "LoRA forward: fused (merged-weight fp32) | peft", choices=("fused", "peft"))
    ema_decay: float = option(0.95)
    gradient_checkpointing: bool | None = option(None, "default: the model config's")
    attention: str = option("sdpa", "sdpa | eager (diffusers AttnProcessor)", choices=("sdpa", "eager"))
    compile: bool = option(False, "torch.compile the UNet forward (minutes on CPU)")
    pretrained: str | None = option(None, "a tiny-style diffusers folder instead of building one")
    sync_debug: bool = option(False, "CUDA: list the host syncs of one step")
    peak_tflops: float | None = option(None, "device peak for MFU (default: by name)")
    seed: int = option(0)
    adversarial: str = option(
        "none",
        "hinge: also run the step with the adversarial term, its extra cost per phase next to the plain step",
        choices=("none", "hinge"),
    )
    overrides: list[str] = option([], "extra Hydra overrides, e.g. guidance.p_empty=0.5", positional=True)


def compose(cfg: BenchConfig, pretrained: str, out_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tdd_lightning.training import resolvers

    resolvers.register()
    cuda = cfg.device.startswith("cuda")
    overrides = [
        "~experiment",  # the bare defaults of conf/train.yaml, not the smoke run `python train.py` runs
        f"model={cfg.model}",
        f"model.pretrained={pretrained}",
        "model.build_if_missing=false",
        f"model.base_dtype={'bf16' if cfg.precision == 'bf16' else 'fp32'}",
        f"model.lora.rank={cfg.rank}",
        f"module.ema_decay={cfg.ema_decay}",
        f"trainer={'gpu' if cuda else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if cfg.precision == 'bf16' else '32-true'}",
        f"paths.output_dir={out_dir}",
        f"seed={cfg.seed}",
        "logger=csv",
        "callbacks=none",
        *cfg.overrides,
    ]
    if cfg.gradient_checkpointing is not None:
        overrides.append(f"model.gradient_checkpointing={str(cfg.gradient_checkpointing).lower()}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def tiny_pipeline(cfg: BenchConfig, out_dir: Path) -> Path:
    """The given folder, or a tiny SDXL-shaped pipeline (with VAE and text encoders) built for the run."""
    if cfg.pretrained:
        return Path(cfg.pretrained)
    from tdd_lightning.models.tiny import TinySDXLConfig, build_tiny_sdxl

    side = TINY_SAMPLE_SIZE if cfg.sample_size is None else cfg.sample_size
    tiny = TinySDXLConfig.from_channels(cfg.channels, sample_size=side, seed=cfg.seed)
    return build_tiny_sdxl(out_dir / "tiny-sdxl", tiny)


@dataclass
class Built:
    module: object  # TDDModule with the UNet attached
    trainer_cfg: object  # the composed trainer node
    loader: object  # ResumableLoader of cached-format batches
    bare: torch.nn.Module | None  # the UNet without LoRA layers (None: use the teacher role)
    unet_config: dict
    text: dict  # the family's text tensors' per-sample shapes
    pretrained: Path | None  # folder with VAE + text encoders (naive mode), if any


def check_config(cfg: BenchConfig) -> None:
    """The one-line errors a run would otherwise hit late (ConfigError naming the option)."""
    from tdd_lightning.errors import check, check_int

    if cfg.sample_size is not None:
        check_int("--sample-size", cfg.sample_size, minimum=1)
    check(cfg.model == "tiny" or not cfg.pretrained, "--pretrained", cfg.pretrained, "only with --model tiny")


def composed_family(composed):
    """The ModelFamily of a composed config's ``model.family``."""
    from tdd_lightning.models.families import get_family

    return get_family(composed.model.get("family"))


def build(cfg: BenchConfig, out_dir: Path) -> Built:
    from tdd_lightning.data.resumable import ResumableLoader
    from tdd_lightning.data.synthetic import synthetic_latents
    from tdd_lightning.training.run import build_module

    check_config(cfg)
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    if cfg.model in ARCH_MODELS:  # models/<name>.py: the published UNet config, random weights
        from importlib import import_module

        arch = import_module(f"tdd_lightning.models.{cfg.model}")
        pretrained = None
        composed = compose(cfg, str(out_dir / cfg.model.replace("_", "-")), out_dir)
        side = arch.SAMPLE_SIZE if cfg.sample_size is None else cfg.sample_size
        unet = arch.unet(side, device=device, dtype=dtype, seed=cfg.seed)
        scheduler_config, text = arch.SCHEDULER, arch.text_shapes()
        bare = (
            None  # a second multi-billion-parameter copy is not worth its memory: the teacher role stands in
        )
    else:
        pretrained = tiny_pipeline(cfg, out_dir)
        composed = compose(cfg, str(pretrained), out_dir)
        family = composed_family(composed)
        parts = family.load(pretrained, dtype=dtype, load_vae=False, load_text_encoders=False)
        unet, scheduler_config, text = (
            parts.unet,
            parts.noise_scheduler.config,
            family.text_shapes(pretrained),
        )
        if cfg.sample_size is not None:  # honoured over the folder's (the UNet is size-agnostic)
            unet.register_to_config(sample_size=cfg.sample_size)
        bare = copy.deepcopy(unet).to(device)
    if cfg.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
        if bare is not None:
            bare.set_attn_processor(AttnProcessor())
    module = build_module(composed)
    module.attach(unet, scheduler_config)
    module.roles.set_fused(cfg.lora == "fused")
    if cfg.compile:  # the forward only: the timing hooks stay outside the compiled region
        unet.forward = torch.compile(unet.forward)
        if bare is not None:
            bare.forward = torch.compile(bare.forward)
    size = unet.config.sample_size
    data = synthetic_latents(
        module.family, max(4 * cfg.batch, 16), (unet.config.in_channels, size, size), text, seed=cfg.seed
    )
    loader = ResumableLoader(data, cfg.batch, seed=cfg.seed, pin_memory=device.type == "cuda")
    return Built(module, composed.trainer, loader, bare, dict(unet.config), text, pretrained)
