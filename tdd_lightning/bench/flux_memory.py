"""FLUX.1-dev training memory on paper, from a meta-device build (no download, no GPU): parameters, LoRA,
gradients, optimizer state and the student's saved activations, with and without gradient checkpointing,
and what FSDP over 2, 4, 8 GPUs leaves per GPU (docs/results/performance.md).

    python -m tdd_lightning.bench.flux_memory [--size 1024] [--batch 1] [--rank 64]

How each number is got:
- parameters: the ``FluxTransformer2DModel`` of FLUX.1-dev's config built on the meta device, counted, at
  bf16 (2 bytes); LoRA: the adapters peft adds for the family's targets (r (in + out) per adapted linear),
  fp32 (4 bytes) master weights for the student and the EMA target, an fp32 gradient for the student;
  optimizer: AdamW's two fp32 moments (8 bytes per student parameter; bitsandbytes' 8-bit AdamW: 2).
- activations: the student forward (LoRA on, gradients to the LoRA only) run on the meta device under a
  saved-tensors hook that sums every tensor autograd keeps for the backward (each storage once, frozen
  weights excluded), at bf16, with attention as the flash kernel saves it (q, k, v, out, logsumexp: what
  SDPA does on a GPU; the meta device's math fallback would keep the 4608^2 attention matrices).
  With gradient checkpointing (diffusers checkpoints each transformer block): the block inputs are kept,
  plus the activations outside the blocks, plus one block's recomputed activations at the backward's peak.
- the teacher and target forwards run without gradients: they add only one layer's working memory.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch

GiB = 2**30
# FLUX.1-dev's transformer/config.json
FLUX1_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
T5_TOKENS = 512  # FLUX.1-dev's max_sequence_length


def matches(name: str, targets) -> bool:
    """peft's rule for a list of target names: the module's name is the target or ends with '.target'."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_parameter_count(model: torch.nn.Module, targets, rank: int) -> int:
    """r (in + out) summed over the Linear layers peft would adapt."""
    return sum(
        rank * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and matches(n, targets)
    )


def meta_flux(config: dict | None = None, dtype: torch.dtype = torch.bfloat16):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**(config or FLUX1_DEV)).to(dtype)


@contextlib.contextmanager
def flash_attention():
    """F.scaled_dot_product_attention as the flash kernel (what autograd saves for it on a GPU)."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
        if query.device.type == "cpu":  # the CPU's flash kernel (tests compare it with the meta count)
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        else:
            flash = torch.ops.aten._scaled_dot_product_flash_attention
        return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


class SavedBytes:
    """Bytes of the tensors autograd saves, each storage once, parameters excluded; split by the block
    (``where``) that was running when they were saved."""

    def __init__(self, params):
        self.params = {id(p) for p in params}
        self.seen: dict[int, torch.Tensor] = {}
        self.by_block: dict[str, int] = {}
        self.where = "outside"

    def pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if not base.is_floating_point():  # the kernels' random-number states, not activations
            return t
        if id(base) not in self.params and id(base) not in self.seen:
            self.seen[id(base)] = base  # kept alive, so the id is not reused
            self.by_block[self.where] = self.by_block.get(self.where, 0) + base.numel() * base.element_size()
        return t

    @staticmethod
    def unpack(t):
        return t


@dataclass
class Activations:
    total: int  # no checkpointing
    checkpointed: int  # every transformer block checkpointed
    largest_block: int


def student_activations(model, batch: int, tokens: int, text_tokens: int, device="meta") -> Activations:
    """Saved activations of one student forward of ``model`` (LoRA already added) at ``tokens`` image and
    ``text_tokens`` text tokens, on ``device`` (the model's: meta, or real tensors for a check)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    meta = dict(device=device, dtype=dtype)
    counter = SavedBytes(model.parameters())
    blocks = {**{f"double.{i}": b for i, b in enumerate(model.transformer_blocks)},
              **{f"single.{i}": b for i, b in enumerate(model.single_transformer_blocks)}}  # fmt: skip
    inputs: dict[str, int] = {}
    hooks = []
    for name, block in blocks.items():

        def enter(module, args, kwargs, name=name):
            counter.where = name
            held = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            inputs[name] = sum(a.numel() * a.element_size() for a in held if a.ndim == 3)

        def leave(module, args, out):
            counter.where = "outside"

        hooks += [
            block.register_forward_pre_hook(enter, with_kwargs=True),
            block.register_forward_hook(leave),
        ]
    x = torch.zeros(batch, tokens, cfg.in_channels, **meta)
    text = torch.zeros(batch, text_tokens, cfg.joint_attention_dim, **meta)
    side = int(tokens**0.5)
    ids = torch.zeros(side, side, 3, device=device).reshape(tokens, 3)
    try:
        with torch.enable_grad(), flash_attention():
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                model(
                    hidden_states=x, timestep=torch.ones(batch, **meta),
                    guidance=torch.ones(batch, device=device) if cfg.guidance_embeds else None,
                    pooled_projections=torch.zeros(batch, cfg.pooled_projection_dim, **meta),
                    encoder_hidden_states=text, txt_ids=torch.zeros(text_tokens, 3, device=device),
                    img_ids=ids, return_dict=False,
                )  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    per_block = {k: v for k, v in counter.by_block.items() if k != "outside"}
    outside = counter.by_block.get("outside", 0)
    largest = max(per_block.values())
    return Activations(
        total=sum(counter.by_block.values()),
        checkpointed=outside + sum(inputs.values()) + largest,
        largest_block=largest,
    )


@dataclass
class MemoryReport:
    size: int
    batch: int
    rank: int
    base_params: int
    lora_params: int
    largest_block_params: int
    activations: Activations

    # bytes
    @property
    def base(self) -> int:
        return 2 * self.base_params  # bf16

    @property
    def lora(self) -> int:
        return 4 * 2 * self.lora_params  # fp32 student + EMA target

    @property
    def grads(self) -> int:
        return 4 * self.lora_params  # the student's fp32 gradient

    def optimizer(self, eight_bit: bool = False) -> int:
        return (2 if eight_bit else 8) * self.lora_params

    def per_gpu(self, gpus: int, checkpointing: bool, eight_bit: bool = False) -> float:
        """GiB per GPU: sharded states / gpus + activations (+ two unsharded blocks' bf16 weights under FSDP,
        the one computing and the one prefetched)."""
        states = self.base + self.lora + self.grads + self.optimizer(eight_bit)
        act = self.activations.checkpointed if checkpointing else self.activations.total
        gather = 2 * 2 * self.largest_block_params if gpus > 1 else 0
        return (states / gpus + act + gather) / GiB

    def table(self) -> str:
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        a = self.activations
        lines = [
            f"FLUX.1-dev transformer at {self.size} px ({(self.size // 16) ** 2} image + {T5_TOKENS} text "
            f"tokens), batch {self.batch}, bf16 base, LoRA rank {self.rank} (fp32)",
            "",
            "| what | GiB |",
            "|---|---|",
            f"| frozen base parameters ({self.base_params / 1e9:.2f} B, bf16) | {g(self.base)} |",
            f"| LoRA, student + EMA target ({self.lora_params / 1e6:.1f} M each, fp32) | {g(self.lora)} |",
            f"| student gradient (fp32) | {g(self.grads)} |",
            f"| AdamW moments (fp32) / 8-bit AdamW | {g(self.optimizer())} / {g(self.optimizer(True))} |",
            f"| student activations, no checkpointing | {g(a.total)} |",
            f"| student activations, gradient checkpointing | {g(a.checkpointed)} |",
            "",
            "| GPUs | no checkpointing | checkpointing | checkpointing + 8-bit AdamW |",
            "|---|---|---|---|",
        ]
        for n in (1, 2, 4, 8):
            label = "1 (DDP / single)" if n == 1 else f"{n} (FSDP)"
            cells = [self.per_gpu(n, False), self.per_gpu(n, True), self.per_gpu(n, True, True)]
            lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        return "\n".join(lines)


def flux_memory(size: int = 1024, batch: int = 1, rank: int = 64, config: dict | None = None) -> MemoryReport:
    """The report for FLUX.1-dev (or ``config``) at ``size`` px (latents size/8, 2x2 packed)."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    from tdd_lightning.models.families.flux import FLUX_LORA_TARGETS
    from tdd_lightning.models.roles import lora_config

    diffusers_logging.set_verbosity_error()  # the meta build's dtype notice
    model = meta_flux(config)
    base = sum(p.numel() for p in model.parameters())
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    lora = lora_parameter_count(model, FLUX_LORA_TARGETS, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(lora_config(rank, rank, FLUX_LORA_TARGETS), adapter_name="student")
    model.to(torch.bfloat16)  # the LoRA computes in bf16 under autocast: its saved inputs are bf16
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    tokens = (size // 16) ** 2
    text_tokens = T5_TOKENS if config is None else 8
    act = student_activations(model, batch, tokens, text_tokens)
    return MemoryReport(size, batch, rank, base, lora, largest_block, act)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tdd_lightning.bench.flux_memory", description=__doc__.split("\n")[0]
    )
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=64)
    a = p.parse_args(argv)
    print(flux_memory(a.size, a.batch, a.rank).table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
