"""The benchmark's bookkeeping on a tiny run, the merged-weight LoRA forward, and the SDXL architecture."""

import re
import statistics

import pytest
import torch

from tdd_lightning.bench.build import BenchConfig
from tdd_lightning.bench.report import format_report
from tdd_lightning.bench.runner import PHASES, run_bench
from tdd_lightning.bench.timing import PhaseTimer
from tdd_lightning.models.families.sdxl import unet_eps
from tdd_lightning.models.roles import SDXL_LORA_TARGETS, LoRARoles


@pytest.fixture(scope="module")
def result(tiny_sdxl_dir, tmp_path_factory):
    cfg = BenchConfig(
        pretrained=str(tiny_sdxl_dir), batch=4, rank=4, warmup=1, steps=4, naive_steps=2, ablation=True
    )
    return run_bench(cfg, tmp_path_factory.mktemp("bench"))


def test_phases_sum_to_the_step_time(result):
    phases, step = result["phases_mean_s"], result["step_mean_s"]
    assert result["steps"] == 4 and set(phases) == set(PHASES)
    assert sum(phases.values()) == pytest.approx(step, rel=1e-6)  # the partition covers the step
    assert phases["other"] >= -1e-9 and phases["other"] < 0.3 * step  # the named phases explain it
    for k in ("teacher fwd", "target fwd", "student fwd", "student bwd", "optimizer", "ema", "logging"):
        assert phases[k] > 0, k
    assert 4 <= result["teacher_batch_mean"] <= 8  # B + (B - dropped)


def test_floor_ratios_and_the_summary_line(result):
    floor = result["floor_s"]
    floor_i = result["floor_totals_s"]
    assert len(floor_i) == len(result["step_times_s"]) == result["steps"]  # one floor set per step
    assert result["floor_total_s"] == pytest.approx(statistics.median(floor_i))
    ratios = [s / f for s, f in zip(result["step_times_s"], floor_i, strict=True)]
    assert result["overhead_ratio"] == pytest.approx(statistics.median(ratios))
    assert result["naive"]["steps"] == 2 and result["naive_ratio"] > 0
    assert 0 < result["lora_vs_bare"]["target"] < 10 and floor["bare fwd"] > 0
    assert result["flops"]["step"] > 0 and result["peak_rss_mib"] > 0
    text = format_report(result)
    last = text.splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert last.startswith("BENCH ") and float(fields["overhead"]) == pytest.approx(
        result["overhead_ratio"], 1e-3
    )
    assert re.search(r"overhead ratio = step / floor = [0-9.]+x", text)


def test_phase_timer_is_exclusive():
    ticks = iter(range(100))
    timer = PhaseTimer(clock=lambda: float(next(ticks)))
    timer.armed = True
    with timer("outer"):  # outer 0..1, inner 1..2, outer 2..3
        with timer("inner"):
            pass
    assert timer.take() == {"outer": 2.0, "inner": 1.0}


def _roles(tiny_sdxl_dir, fused):
    from tdd_lightning.models import load_sdxl_components

    unet = load_sdxl_components(tiny_sdxl_dir, load_vae=False, load_text_encoders=False).unet
    roles = LoRARoles(unet, rank=4, alpha=8, target_modules=SDXL_LORA_TARGETS, fused=fused)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in roles.student_params + roles.target_params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return roles


def test_merged_lora_forward_matches_peft(tiny_sdxl_dir):
    roles = _roles(tiny_sdxl_dir, fused=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999, 500, 3])
    c = {
        "prompt_embeds": torch.randn(3, 77, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(3, 32, generator=g),
        "time_ids": torch.randn(3, 6, generator=g),
    }

    def run(fused, role):
        roles.set_fused(fused)
        for p in roles.student_params:
            p.grad = None
        with roles.role(role) as unet:
            out = unet_eps(unet, x, t, c)
        if role != "student":
            return out.detach(), None
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in roles.student_params]

    for role in ("student", "target", "teacher"):
        (ref, ref_grads), (ours, grads) = run(False, role), run(True, role)
        tol = 0 if role == "teacher" else 1e-5  # the teacher runs the base layers exactly
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
        for a, b in zip(grads or [], ref_grads or [], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_merged_lora_falls_back_to_peft_outside_fp32(tiny_sdxl_dir):
    roles = _roles(tiny_sdxl_dir, fused=True)
    layer = next(m for m in roles.layers if type(m).__name__ == "FusedLoraLinear")
    x = torch.randn(2, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = layer(x)
        roles.set_fused(False)
        ref = layer(x)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref)


def test_sd15_arch_has_sd15_parameter_count_and_no_added_condition():
    from tdd_lightning.models.families.sd15 import SD15
    from tdd_lightning.models.sd15_arch import SD15_UNET_PARAMS, sd15_unet, text_shapes

    unet = sd15_unet(device="meta")
    assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMS
    assert text_shapes() == {"prompt_embeds": (77, unet.config.cross_attention_dim)}
    SD15.check_unet(unet.config)  # the SD1.5 family's UNet


def test_bench_offers_sd15_arch_with_its_defaults():
    from tdd_lightning.bench.cli import parse

    cfg, _ = parse(["--model", "sd15_arch"])
    assert (cfg.model, cfg.sample_size, cfg.rank) == ("sd15_arch", 64, 64)


def test_sdxl_arch_has_sdxl_base_parameter_count():
    from tdd_lightning.models.sdxl_arch import SDXL_UNET_PARAMS, sdxl_unet, text_dims

    unet = sdxl_unet(device="meta")
    assert sum(p.numel() for p in unet.parameters()) == SDXL_UNET_PARAMS
    assert text_dims() == (unet.config.cross_attention_dim, 1280)
    cfg = unet.config
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + text_dims()[1]


def test_cli_options_are_the_config_fields():
    import dataclasses

    from tdd_lightning.bench.cli import parse

    assert parse([]) == (BenchConfig(), None)
    cfg, path = parse(["--model", "sdxl_arch", "--gradient-checkpointing", "false", "--json", "out.json"])
    assert (cfg.rank, cfg.sample_size, cfg.gradient_checkpointing, path) == (64, 128, False, "out.json")
    argv = ["--channels", "8", "16", "--rank", "4", "--compile", "--peak-tflops", "2.5", "--seed", "3", "a=1"]
    cfg, _ = parse(argv)
    assert cfg == dataclasses.replace(
        BenchConfig(), channels=(8, 16), rank=4, compile=True, peak_tflops=2.5, seed=3, overrides=["a=1"]
    )
    with pytest.raises(SystemExit):
        parse(["--lora", "other"])  # choices come from the field


def test_naive_phases_and_ablation_are_reported(result):
    from tdd_lightning.bench.floor import ABLATION, bf16_supported
    from tdd_lightning.bench.naive import PHASES as NAIVE_PHASES
    from tdd_lightning.bench.naive import SCRIPT_SPLIT_MS

    phases = result["naive"]["phases_mean_s"]
    assert tuple(phases) == NAIVE_PHASES
    for k in SCRIPT_SPLIT_MS:  # every phase of the script's split is measured in the naive step
        assert phases[k] > 0, k
    # the phases partition the naive step (the rest is the timer's own calls and the role restore)
    assert sum(phases.values()) <= result["naive"]["step_s"] * 1.2
    abl = result["ablation"]
    expected = set(ABLATION) if bf16_supported(torch.device("cpu")) else set(ABLATION[:2])
    assert set(abl) == expected and all(v["n"] == result["steps"] and v["ratio"] > 0 for v in abl.values())
    text = format_report(result)
    assert re.search(r"  vae +363\.0 +[0-9.]+ +- *$", text, re.M)  # script | this run's baseline | ours
    assert re.search(r"  peft low-rank +[0-9.]+ ms  [0-9.]+x  \(4 pairs\)", text)


def _naive(tiny_sdxl_dir, tmp_path):
    from tdd_lightning.bench.build import build
    from tdd_lightning.bench.naive import NaiveTrainer
    from tdd_lightning.models.families.sdxl import SDXLEncoder

    cfg = BenchConfig(pretrained=str(tiny_sdxl_dir), batch=2, rank=4, ema_decay=0.5)
    built = build(cfg, tmp_path)
    encoder = SDXLEncoder.from_pretrained(tiny_sdxl_dir)
    return built.module, NaiveTrainer(built.module, encoder, 2, torch.device("cpu"))


def test_naive_step_does_the_scripts_work(tiny_sdxl_dir, tmp_path):
    """Four UNet forwards of B (student with grad, teacher cond + uncond without adapters, target through
    the student's own adapter, no grad), no set_adapter, no EMA; the student's LoRA gets a step."""
    module, naive = _naive(tiny_sdxl_dir, tmp_path)
    roles, unet = module.roles, module.unet
    layer = roles.layers[0]
    seen = []

    def hook(_, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        seen.append(
            (x.shape[0], torch.is_grad_enabled(), layer.disable_adapters, tuple(layer.active_adapters))
        )

    def no_set_adapter(*a, **k):
        raise AssertionError("the script does not call set_adapter")

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    unet.set_adapter = no_set_adapter
    target_before = [p.clone() for p in roles.target_params]
    student_before = [p.clone() for p in roles.student_params]
    naive.enter()
    try:
        loss = naive.step(record=True)
    finally:
        naive.exit()
        handle.remove()
        del unet.set_adapter
    assert seen == [
        (2, True, False, ("student",)),
        (2, False, True, ("student",)),
        (2, False, True, ("student",)),
        (2, False, False, ("student",)),
    ]
    assert loss > 0 and len(naive.records) == 1 and naive.records[0]["toggles"] > 0
    assert all(torch.equal(a, b) for a, b in zip(roles.target_params, target_before, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(roles.student_params, student_before, strict=True))
    assert all(p.requires_grad for p in roles.student_params)  # exit restores the module's roles
    assert not any(p.requires_grad for p in roles.target_params) and roles.fused


def test_sample_size_overrides_the_pretrained_folder(tiny_sdxl_dir, tmp_path):
    from tdd_lightning.bench.build import build
    from tdd_lightning.errors import ConfigError

    folder = build(BenchConfig(pretrained=str(tiny_sdxl_dir), rank=4), tmp_path / "a")
    assert folder.unet_config["sample_size"] == 8  # not given: the folder's
    built = build(BenchConfig(pretrained=str(tiny_sdxl_dir), rank=4, sample_size=4, batch=2), tmp_path / "b")
    assert built.unet_config["sample_size"] == 4 == built.module.unet.config.sample_size
    assert next(iter(built.loader))["latents"].shape == (2, 4, 4, 4)
    with pytest.raises(ConfigError, match="--sample-size"):
        build(BenchConfig(pretrained=str(tiny_sdxl_dir), sample_size=0), tmp_path / "c")
    with pytest.raises(ConfigError, match="--pretrained"):
        build(BenchConfig(model="sdxl_arch", pretrained=str(tiny_sdxl_dir)), tmp_path / "d")
