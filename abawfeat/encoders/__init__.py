"""Stage-one encoders: a registry of image networks, each owning its preprocessing, weights, calibration
and trainable blocks (the contract: abawfeat/encoders/base.py; adding one: docs/encoders.md).

    from abawfeat.encoders import build_encoder, list_encoders
    encoder = build_encoder("ddamfn", weights="affectnet8")      # or random_init=True, or a checkpoint path
    features, logits = encoder(encoder.transform(image)[None])

Importing this package registers the built-in encoders (``ddamfn``, ``clip``, ``dinov2``, ``timm``, and the
speech encoders ``wav2vec2``, ``hubert``, ``wavlm`` of the audio modality); open_clip, transformers and timm
are only imported when such an encoder is described or built.
"""

from __future__ import annotations

from abawfeat.encoders import clip as _clip  # noqa: F401  (registers "clip")
from abawfeat.encoders import ddamfn as _ddamfn  # noqa: F401  (registers "ddamfn")
from abawfeat.encoders import dinov2 as _dinov2  # noqa: F401  (registers "dinov2")
from abawfeat.encoders import speech as _speech  # noqa: F401  (registers "wav2vec2", "hubert", "wavlm")
from abawfeat.encoders import timm_models as _timm  # noqa: F401  (registers "timm")
from abawfeat.encoders.base import (
    ATTENTION_MAPS,
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_INIT,
    Block,
    Encoder,
    EncoderInfo,
    ImageTransform,
    build_encoder,
    encoder_options,
    list_encoders,
    list_named_weights,
    make_config,
    parse_options,
)
from abawfeat.encoders.ddamfn import (
    DDAMFNConfig,
    DDAMFNEncoder,
    DDAMFNNet,
    DDAMFNOutput,
    load_ddamfn_net,
    save_published_checkpoint,
)
from abawfeat.encoders.weights import NamedWeights, resolve_weights

__all__ = [
    "ATTENTION_MAPS",
    "ENCODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM_INIT",
    "Block",
    "DDAMFNConfig",
    "DDAMFNEncoder",
    "DDAMFNNet",
    "DDAMFNOutput",
    "Encoder",
    "EncoderInfo",
    "ImageTransform",
    "NamedWeights",
    "build_encoder",
    "encoder_options",
    "list_encoders",
    "list_named_weights",
    "load_ddamfn_net",
    "make_config",
    "parse_options",
    "resolve_weights",
    "save_published_checkpoint",
]
