"""Stage: text encoding (prompt, negative prompt) with UMT5, as Wan does it: clean the text as diffusers'
WanPipeline does (its own ``prompt_clean``: ftfy when installed, HTML unescape, whitespace collapsed), pad to a fixed
length and zero the embeddings past each prompt's own tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass
class TextEmbeddings:
    """Conditional and (for classifier-free guidance) unconditional embeddings, each (1, text_len, text_dim)."""

    cond: torch.Tensor
    uncond: torch.Tensor | None

    def check(self, text_dim: int) -> None:
        for name, t in (("cond", self.cond), ("uncond", self.uncond)):
            if t is not None and (t.ndim != 3 or t.shape[-1] != text_dim or not torch.isfinite(t).all()):
                raise InputError(f"text embeddings ({name}): expected finite (1, L, {text_dim}), got {tuple(t.shape)}")


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], max_length: int, device, dtype) -> torch.Tensor:
    """(len(prompts), max_length, dim) embeddings of the cleaned prompts; positions past a prompt's tokens are zero."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    batch = tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state.to(dtype)  # (B, L, dim)
    return hidden * mask[..., None].to(dtype)  # zero past each prompt's length, as Wan's pipeline does


def encode_prompts(
    tokenizer, text_encoder, prompt: str, negative_prompt: str, *, max_length: int, use_cfg: bool, device, dtype
) -> TextEmbeddings:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    if not isinstance(prompt, str) or not prompt_clean(prompt):
        raise InputError("prompt: must be a non-empty text (after cleaning)")
    prompts = [prompt] + ([negative_prompt or ""] if use_cfg else [])
    emb = encode_text(tokenizer, text_encoder, prompts, max_length, device, dtype)
    out = TextEmbeddings(emb[:1], emb[1:2] if use_cfg else None)
    out.check(text_encoder.config.d_model)
    return out
