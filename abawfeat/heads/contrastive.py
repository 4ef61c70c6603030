"""The seed paper's CLIP contrastive head (section 3.2): a projection of the frozen CLIP image embedding,
compared by cosine similarity with the frozen text embeddings of one prompt per expression class."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from abawfeat.constants import EXPR_CLASSES
from abawfeat.errors import ConfigError
from abawfeat.heads import HEADS, Head, HeadConfig
from abawfeat.losses import CLIP_LOGIT_SCALE_INIT, LogitScale


@dataclasses.dataclass
class ContrastiveConfig(HeadConfig):
    tasks: tuple[str, ...] = ("expr",)  # prompts exist for expression classes only
    # CLIP's embedding space has meaningful signs and scale; the paper projects it as is, unstandardised.
    normalize: bool = False
    embed_dim: int = 512  # output of the final linear layer = the text embeddings' dimension (paper: 512)
    class_names: tuple[str, ...] = EXPR_CLASSES  # prompt order = output order; must be Aff-Wild2's order
    logit_scale_init: float = CLIP_LOGIT_SCALE_INIT  # log of the temperature-inverse, CLIP's 1/0.07
    learn_scale: bool = True  # learn the temperature (CLIP does); a fixed scale of 1 barely trains


@HEADS.register("contrastive")
class ContrastiveHead(Head):
    """Trunk (the paper: FC 512 + ReLU), linear projection, scaled cosine similarity to CLIP prompts."""

    Config = ContrastiveConfig

    def __init__(self, config: ContrastiveConfig) -> None:
        super().__init__(config)
        if tuple(config.tasks) != ("expr",):
            raise ConfigError(f"the contrastive head predicts expressions only, not {list(config.tasks)}")
        # Linear on purpose: CLIP's space has negative coordinates that a final ReLU would erase.
        self.project = nn.Linear(self.trunk.out_dim, config.embed_dim)
        self.logit_scale = LogitScale(config.logit_scale_init, learnable=config.learn_scale)
        # Filled from the cache before training, then saved with the weights: prediction needs no CLIP.
        self.register_buffer("text_emb", torch.zeros(len(config.class_names), config.embed_dim))

    def set_text_embeddings(self, embeddings: Tensor) -> None:
        emb = torch.as_tensor(embeddings, dtype=torch.float32)
        if tuple(emb.shape) != tuple(self.text_emb.shape):
            raise ConfigError(
                f"text embeddings have shape {tuple(emb.shape)}, "
                f"the head expects {tuple(self.text_emb.shape)}"
            )
        self.text_emb.copy_(emb)

    def embed(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """The projected image embedding [B, T, embed_dim] (what the contrastive loss compares)."""
        return self.project(self.represent(features, mask))

    def forward(self, features: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        z = self.embed(features, mask)
        img = nn.functional.normalize(z.float(), dim=-1)
        txt = nn.functional.normalize(self.text_emb.float(), dim=-1)
        # Scaled cosine similarity to each class prompt: the argmax is the predicted class, a softmax the
        # class probabilities (the same as losses.contrastive_logits, kept in [B, T, C] shape).
        logits = self.logit_scale() * img @ txt.T
        return self.apply_mask({"expr": logits, "expr_embedding": z}, mask)
