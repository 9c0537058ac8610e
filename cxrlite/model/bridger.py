"""Bridgers: map vision patch features [B, P, Dv] to LLM input embeddings [B, N, Dl].

MLPBridger is LLaVA's projector (one image token per patch): Linear layers with GELU between, 2 of
them as LLaVA-1.5's mlp2x_gelu (parameter names match LlavaMultiModalProjector's linear_1 /
linear_2, so export to LlavaForConditionalGeneration is a rename), 4 as MAIRA-2's, 1 as
CXR-LLaVA's linear projector. QFormerBridger is BLIP-2's Q-Former (CheXagent): learned queries
cross-attend to the patches, so an image costs `num_queries` LLM positions whatever the patch
count — less prefill. Gemma 3's projector (MedGemma) average-pools the patch grid to
`tokens_per_image`, then RMSNorm and one projection: transformers' own module.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrlite.model.config import BridgerConfig, VisionConfig


class MLPBridger(nn.Module):
    """linear_1 -> GELU -> linear_2 (-> GELU -> linear_3 ...): vision width in, LLM width out."""

    def __init__(self, vision_width: int, llm_width: int, n_layers: int = 2) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.act = nn.GELU()  # exact erf GELU = transformers' "gelu", which LLaVA configs name
        for k in range(1, n_layers + 1):
            width_in = vision_width if k == 1 else llm_width
            setattr(self, f"linear_{k}", nn.Linear(width_in, llm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(features)
        for k in range(2, self.n_layers + 1):
            x = getattr(self, f"linear_{k}")(self.act(x))
        return x


class QFormerBridger(nn.Module):
    """Learned queries + transformers' Blip2QFormerModel (self-attention over the queries,
    cross-attention to the patch features in every layer), then a linear to the LLM width.
    Names follow Blip2ForConditionalGeneration (query_tokens, qformer, language_projection)."""

    def __init__(self, cfg: BridgerConfig, vision_width: int, llm_width: int) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        qformer_config = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            encoder_hidden_size=vision_width,
            cross_attention_frequency=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.query_tokens = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=qformer_config.initializer_range)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.language_projection = nn.Linear(cfg.hidden_size, llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        return self.language_projection(out.to(self.language_projection.weight.dtype))


def gemma3_projector(
    cfg: BridgerConfig, vision: VisionConfig, llm_width: int, eps: float = 1e-6
) -> nn.Module:
    """transformers' Gemma3MultiModalProjector (mm_soft_emb_norm, mm_input_projection_weight)
    for this patch grid and LLM width."""
    from transformers import Gemma3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    config = Gemma3Config(
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": vision.hidden_size,
            "image_size": vision.image_size, "patch_size": vision.patch_size,
            "layer_norm_eps": vision.layer_norm_eps or eps,
        },
        text_config={"hidden_size": llm_width},
        mm_tokens_per_image=cfg.tokens_per_image,
    )  # fmt: skip
    return Gemma3MultiModalProjector(config)


def build_bridger(cfg: BridgerConfig, vision: VisionConfig, llm_width: int) -> nn.Module:
    vision_width = vision.hidden_size
    if cfg.kind == "gemma3":
        return gemma3_projector(cfg, vision, llm_width)
    if cfg.kind == "qformer":
        return QFormerBridger(cfg, vision_width, llm_width)
    return MLPBridger(vision_width, llm_width, cfg.mlp_layers)
