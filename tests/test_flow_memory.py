"""The FLUX memory report's counting (bench.flux_memory) on a small config: parameters and LoRA sizes equal
a real build's, and the saved-activation count is the same on the meta device as on real tensors."""

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
