"""ViT encoders from timm, with weights the user brings (never a hub download).

Checkpoint layouts understood: a plain timm/torch state dict (``.pth`` / ``.pt`` /
``.safetensors``), facebookresearch MAE checkpoints (``{"model": state_dict}`` with
``decoder_*`` keys, which are dropped), wrappers such as ``{"state_dict": ...}`` and
``module.`` / ``encoder.`` / ``backbone.`` key prefixes, and deldist's own pretraining exports.
Missing or unexpected keys are an error that lists them, never silently ignored.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import torch

from deldist import storage

# timm's register_model appends the tiny ViT names to this list
__all__ = ["TINY_VITS", "LoadReport", "WeightsError", "build_encoder", "load_weights", "map_checkpoint_keys",
           "pool_tokens", "read_checkpoint", "register_tiny_vits"]

# Keys that belong to a pretraining or classification head, not to the encoder.
_DROPPED_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.")
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "encoder", "module")
_KEY_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "_orig_mod.")


TINY_VITS: dict[str, dict[str, int]] = {
    # name -> VisionTransformer arguments; patch 16 like ViT-B/16, just narrower and shallower
    "deldist_vit_micro_patch16": {"embed_dim": 192, "depth": 4, "num_heads": 3},
    "deldist_vit_nano_patch16": {"embed_dim": 96, "depth": 2, "num_heads": 3},
}


def register_tiny_vits() -> None:
    """Register :data:`TINY_VITS` as timm model names in this process (idempotent;
    :func:`build_encoder` calls it, so every actor knows them)."""
    from timm.models import is_model, register_model
    from timm.models.vision_transformer import VisionTransformer

    for name, arch in TINY_VITS.items():
        if is_model(name):
            continue

        def factory(pretrained: bool = False, _arch: dict[str, int] = arch, **kwargs) -> VisionTransformer:
            if pretrained:
                raise ValueError("deldist's tiny ViTs have no pretrained weights")
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            return VisionTransformer(patch_size=16, mlp_ratio=4.0, qkv_bias=True, **_arch, **kwargs)

        factory.__name__ = name
        factory.__module__ = __name__
        globals()[name] = factory  # timm's registry finds it in this module (and adds it to __all__)
        register_model(factory)


class WeightsError(ValueError):
    """The weights are missing, unreadable, or do not fit the model."""


@dataclass
class LoadReport:
    uri: str | None
    sha256: str | None
    random_init: bool
    dropped_keys: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"weights": self.uri, "weights_sha256": self.sha256, "random_init": self.random_init,
                "dropped_keys": len(self.dropped_keys), "resized_keys": self.resized}


def build_encoder(model_name: str, image_size: int = 224, seed: int = 0) -> torch.nn.Module:
    """A timm ViT without head or pooling: ``forward_features`` gives (B, prefix + N, D).

    Initialised from ``seed``, so a random-init encoder (tests) is the same model in every
    actor and every run; loaded weights replace the init anyway.
    """
    import timm

    register_tiny_vits()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="",
                                 img_size=image_size)


def encoder_with_weights(model_name: str, image_size: int, seed: int, weights: str | None,
                         random_init: bool) -> torch.nn.Module:
    """``build_encoder`` + ``load_weights``: the encoder a finetuning run starts from."""
    encoder = build_encoder(model_name, image_size, seed)
    load_weights(encoder, weights, random_init)
    return encoder


def pool_tokens(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """(B, prefix + N, D) -> (B, D): the CLS token or the mean of the patch tokens."""
    if pooling == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("pooling='cls' needs a model with a class token; use pooling='mean'")
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"unknown pooling {pooling!r}: use 'cls' or 'mean'")


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise WeightsError(f"no state dict found in checkpoint (top-level keys: {sorted(obj)[:10]})")
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def map_checkpoint_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename checkpoint keys onto the timm model's names; returns (mapped, dropped keys)."""
    for prefix in _KEY_PREFIXES:
        stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        if len(model_keys & stripped.keys()) > len(model_keys & state.keys()):
            state = stripped
    mapped, dropped = {}, []
    for k, v in state.items():
        if k not in model_keys and k.startswith(_DROPPED_PREFIXES):
            dropped.append(k)
        else:
            mapped[k] = v
    return mapped, dropped


def read_checkpoint(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict from a local path or object-store URI; returns (state, sha256)."""
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, OSError) as e:
        raise WeightsError(f"cannot read weights {uri}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch / safetensors raise many types for corrupt files
        raise WeightsError(f"cannot load weights {uri}: {e}") from e
    return _unwrap(state), digest


def load_weights(model: torch.nn.Module, uri: str | None, random_init: bool = False) -> LoadReport:
    """Load ``uri`` into ``model`` strictly (after key mapping). ``uri=None`` is an error unless
    ``random_init`` is set explicitly; random weights are for tests only."""
    if uri is None:
        if not random_init:
            raise WeightsError(
                "no encoder weights given: set `weights` to a local path or s3:// URI of a timm/MAE "
                "checkpoint (nothing is downloaded), or `random_init: true` for tests only"
            )
        return LoadReport(uri=None, sha256=None, random_init=True)
    from timm.layers import resample_abs_pos_embed

    state, digest = read_checkpoint(uri)
    own = model.state_dict()
    mapped, dropped = map_checkpoint_keys(state, set(own))
    resized = []
    if "pos_embed" in mapped and mapped["pos_embed"].shape != own["pos_embed"].shape:
        prefix = getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        mapped["pos_embed"] = resample_abs_pos_embed(mapped["pos_embed"], list(grid), num_prefix_tokens=prefix)
        resized.append("pos_embed")
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape)
    if missing or unexpected or wrong_shape:
        raise WeightsError(
            f"weights {uri} do not fit the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''} "
            f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), "
            f"wrong shape {wrong_shape[:8]} ({len(wrong_shape)})"
        )
    model.load_state_dict(mapped, strict=True)
    return LoadReport(uri=uri, sha256=digest, random_init=False, dropped_keys=dropped, resized=resized)
