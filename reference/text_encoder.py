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

    def trained_token_ids(self) -> tuple[int, ...] | None:
        """The token ids whose embedding rows are not all zero, where some are (a closed-vocabulary model
        such as the shapes model zeroes the rows its training never used); None where every row is set."""
        embedding = self.clip.text_model.embeddings.token_embedding.weight.detach()
        trained = tuple(embedding.abs().sum(1).nonzero().flatten().tolist())
        return trained if len(trained) < len(embedding) else None
