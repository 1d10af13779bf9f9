"""The CLIP text encoder: transformers' `CLIPTextModelWithProjection`, returning what Meissonic consumes.

Meissonic conditions on the projected pooled output (`text_embeds`, [B,P]) and on the penultimate hidden
state (`hidden_states[-2]`, [B,77,J], before the final layer norm).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection


class TextEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        # "eager" attention traces to plain matmul/softmax in both ONNX and Core ML; sdpa gives the same numbers.
        config._attn_implementation = "eager"
        self.config = config
        self.clip = CLIPTextModelWithProjection(config)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.clip(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return out.text_embeds, out.hidden_states[-2]
