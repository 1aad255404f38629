"""The flow behind `python sample.py lora=<exported LoRA file or folder>` (conf/sample.yaml).

A stock diffusers pipeline of the LoRA's model family (SDXL or SD1.5/SD2.x, from its ``tdd.family``)
+ the LoRA + TDDScheduler (conf/sample.yaml lists every option). Writes
one PNG per image to <output>/images/ and a labelled grid (rows: prompts, columns: settings) to
<output>/grid.png. Lists of steps, eta or guidance_scale make the grid's columns. Every option is
checked before anything is loaded: a bad one is one line naming the key.
"""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tdd_lightning.errors import ConfigError, UserError, check, is_int, is_number
from tdd_lightning.models.dtypes import DTYPES

log = logging.getLogger("sample")


# option -> (what each value must satisfy, the rule in words); a list of values makes grid columns
GRID_OPTIONS = {
    "steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "eta": (lambda v: is_number(v, finite=True) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "guidance_scale": (lambda v: is_number(v, finite=True) and v >= 0.0, "a number >= 0 (1: no CFG)"),
}


def check_options(cfg: DictConfig) -> None:
    """Every sampling option in range and of the right type (ConfigError naming the key), before loading."""
    for key, (ok, rule) in GRID_OPTIONS.items():
        value = cfg[key]
        value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
        if value is None:  # the LoRA's recommendation
            continue
        values = value if isinstance(value, list) else [value]
        valid = bool(values) and all(ok(v) for v in values)
        check(valid, key, value, f"must be null, {rule} or a list of them")
    check(is_int(cfg.batch) and cfg.batch >= 1, "batch", cfg.batch, "must be an integer >= 1")
    check(is_int(cfg.seed), "seed", cfg.seed, "must be an integer")
    check(is_number(cfg.lora_scale, finite=True), "lora_scale", cfg.lora_scale, "must be a finite number")
    check(is_int(cfg.cell) and cfg.cell >= 1, "cell", cfg.cell, "must be an integer >= 1 (pixels)")
    for key in ("height", "width"):
        value = cfg[key]
        ok = value is None or (is_int(value) and value >= 8 and value % 8 == 0)
        check(ok, key, value, "must be null or a positive multiple of 8 (pixels)")
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise ConfigError("dtype", cfg.dtype, f"choose auto, {', '.join(DTYPES)}")
    family = cfg.get("family")
    if family is not None:
        from tdd_lightning.models.families import FAMILIES

        check(family in FAMILIES, "family", family, f"must be null or one of {', '.join(FAMILIES)}")


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UserError(f"prompt_file: {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [cfg.prompts] if isinstance(cfg.prompts, str) else list(cfg.prompts or [])
    if not prompts:
        raise UserError("no prompts: set prompts=[...] or prompt_file=<one prompt per line>")
    return prompts


def resolve_inputs(cfg: DictConfig) -> tuple[Path | None, dict, str]:
    """(LoRA file or None, its metadata, base model); one-line errors for what is missing."""
    from tdd_lightning.export import read_metadata
    from tdd_lightning.models.loading import ModelNotFoundError, resolve_model_path
    from tdd_lightning.pipelines import resolve_lora_file

    if OmegaConf.is_missing(cfg, "lora"):
        raise UserError(
            "lora: give an exported LoRA, e.g. lora=<ckpt>_lora/student (or lora=null for the base)"
        )
    lora, metadata = None, {}
    if cfg.lora is not None:
        try:
            lora = resolve_lora_file(cfg.lora)
            metadata = read_metadata(lora)
        except FileNotFoundError as e:
            raise UserError(f"lora: {e}") from None
        except Exception as e:  # not a safetensors file
            hint = ""
            if lora.suffix == ".ckpt":
                hint = "; export a checkpoint first: python -m tdd_lightning.export CKPT --out DIR"
            raise UserError(f"lora: {lora} is not a readable LoRA safetensors file ({e}){hint}") from None
    base = cfg.base or metadata.get("base_model")
    if not base:
        raise UserError("base: give the base model (a diffusers folder or a hub id)")
    try:
        resolve_model_path(str(base))
    except ModelNotFoundError as e:
        raise UserError(f"base: {e}") from None
    return lora, metadata, str(base)


def run(cfg: DictConfig) -> Path:
    check_options(cfg)  # before torch, the LoRA, the base model or the pipeline
    import torch

    from tdd_lightning.pipelines import generate, load_tdd_pipeline, recommended_call_kwargs, settings_grid
    from tdd_lightning.plotting import label_grid, to_pil

    prompts = read_prompts(cfg)
    lora, metadata, base = resolve_inputs(cfg)
    rec = recommended_call_kwargs(metadata)
    names = {"steps": "num_inference_steps", "eta": "eta", "guidance_scale": "guidance_scale"}
    pick = {k: rec[name] if cfg[k] is None else cfg[k] for k, name in names.items()}
    pick = {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in pick.items()}
    settings, varying = settings_grid(**pick)

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(cfg.dtype, torch.float16 if str(device).startswith("cuda") else torch.float32)
    log.info(
        "base %s, LoRA %s, %d prompt(s), %d setting(s) on %s", base, lora, len(prompts), len(settings), device
    )
    family = cfg.get("family") or metadata.get("family")
    pipe = load_tdd_pipeline(base, lora, lora_scale=cfg.lora_scale, device=device, dtype=dtype, family=family)

    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    columns, records = [], []
    for setting in settings:
        rows = []
        for p, prompt in enumerate(prompts):
            images = generate(
                pipe, prompt, setting, seed=cfg.seed, batch=cfg.batch, negative_prompt=cfg.negative_prompt,
                height=cfg.height, width=cfg.width,
            )  # fmt: skip
            for b, image in enumerate(images):
                path = out / "images" / f"p{p:02d}_b{b}_{setting.slug()}.png"
                to_pil(image).save(path)
                records.append({"file": str(path.relative_to(out)), "prompt": prompt, "seed": cfg.seed + b,
                                "steps": setting.steps, "eta": setting.eta,
                                "guidance_scale": setting.guidance})  # fmt: skip
            rows.append(images)
        columns.append(torch.cat(rows))
    labels = [f"{q} #{b}" if cfg.batch > 1 else q for q in prompts for b in range(cfg.batch)]
    grid = label_grid(columns, [s.title(varying) for s in settings], labels, cell=cfg.cell)
    grid_path = out / "grid.png"
    grid.save(grid_path)
    settings_json = {"base": base, "lora": str(lora) if lora else None, "lora_scale": cfg.lora_scale,
                     "negative_prompt": cfg.negative_prompt, "images": records}  # fmt: skip
    (out / "samples.json").write_text(json.dumps(settings_json, indent=2))
    log.info("wrote %d images and %s", len(records), grid_path)
    return grid_path
