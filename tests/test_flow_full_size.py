"""FLUX at full size without weights: the memory report's counting (bench.flux_memory: parameters and LoRA
sizes equal a real build's, saved activations the same on the meta device as on real tensors), and the
kohya FLUX layout read back by diffusers' own converter at FLUX.1-dev's shapes."""

import pytest
import torch

from tdd_lightning.bench.flux_memory import FLUX1_DEV, lora_parameter_count, meta_flux, student_activations
from tdd_lightning.models.families.flux import FLUX_LORA_TARGETS
from tdd_lightning.models.roles import LoRARoles

SMALL = {**FLUX1_DEV, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
         "axes_dims_rope": (4, 6, 6), "in_channels": 16}  # fmt: skip


def real_flux(dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**SMALL).to(dtype)


def test_parameter_and_lora_counts_equal_a_real_build():
    meta, real = meta_flux(SMALL), real_flux()
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    roles = LoRARoles(real, rank=4, alpha=4, target_modules=FLUX_LORA_TARGETS, fused=False)
    assert lora_parameter_count(meta, FLUX_LORA_TARGETS, 4) == sum(p.numel() for p in roles.student_params)
    # the final proj_out is adapted too (peft's name rule), the AdaLN linears are not
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in real.named_parameters() if ".lora_A." in n}
    assert "proj_out" in adapted and not any("norm" in n for n in adapted)


def test_saved_activations_on_meta_equal_those_on_real_tensors():
    from tdd_lightning.models.roles import lora_config

    counts = []
    for model, device in ((meta_flux(SMALL), "meta"), (real_flux(torch.bfloat16), "cpu")):
        model.add_adapter(lora_config(4, 4, FLUX_LORA_TARGETS), adapter_name="student")
        model.to(torch.bfloat16)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        counts.append(student_activations(model, 1, 16, 8, device=device))
    meta, real = counts
    # the same to within the meta kernels' bookkeeping (a few bytes per block, 0.4% here)
    assert meta.total == pytest.approx(real.total, rel=0.01)
    assert meta.checkpointed == pytest.approx(real.checkpointed, rel=0.01)
    assert 0 < meta.checkpointed < meta.total
    # two 16-token images keep about twice the activations of one (the rotary tables are shared)
    model = meta_flux(SMALL)
    model.add_adapter(lora_config(4, 4, FLUX_LORA_TARGETS), adapter_name="student")
    model.to(torch.bfloat16)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    assert student_activations(model, 2, 16, 8).total == pytest.approx(2 * meta.total, rel=0.02)


def test_kohya_flux_layout_reads_back_through_diffusers_own_converter():
    """The BFL-named kohya file of a LoRA on every default FLUX target at FLUX.1-dev's shapes (diffusers'
    converter hard-codes 19 + 38 blocks and 3072 / 12288 widths), read back by
    ``_convert_kohya_flux_lora_to_diffusers``: each module's (alpha / r) B A is what it loads at scale 1."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from tdd_lightning.bench.flux_memory import matches
    from tdd_lightning.models.families.flux import flux_kohya_state_dict

    rank, alpha = 2, 3.0
    g = torch.Generator().manual_seed(0)
    ours = {}
    for name, m in meta_flux().named_modules():
        if isinstance(m, torch.nn.Linear) and matches(name, FLUX_LORA_TARGETS):
            ours[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g)
            ours[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g)
    kohya = flux_kohya_state_dict(ours, alpha)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 4 * rank)
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    back = {k.removeprefix("transformer."): v for k, v in back.items()}
    assert set(back) == set(ours)
    for key in (k for k in ours if k.endswith("lora_A.weight")):
        module = key.removesuffix(".lora_A.weight")
        v = torch.randn(ours[key].shape[1], generator=g, dtype=torch.float64)
        want = (alpha / rank) * ours[f"{module}.lora_B.weight"].double() @ (ours[key].double() @ v)
        got = back[f"{module}.lora_B.weight"].double() @ (back[key].double() @ v)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)  # the converter's float32 scaling
