"""Models and the training math they need: MAE on a timm ViT, segmentation and
classification heads, losses, weight-decay groups, the learning-rate schedule.

Pure PyTorch: no Ray, no I/O. Shapes use B batch, C channels, H x W image, p patch side,
N = (H / p) * (W / p) patches, K kept (visible) patches, D encoder width, Dd decoder width,
P = p * p * C values per patch.

The MAE encoder *is* a timm ``VisionTransformer`` built by :func:`deldist.encoders.build_encoder`
(same name, same keys), so ``MaskedAutoencoderViT.encoder.state_dict()`` is a plain timm state
dict that ``deldist embed weights=...`` loads as is. Decoder keys start with ``decoder`` and
``mask_token``, which :func:`deldist.encoders.load_weights` drops from full MAE checkpoints.
Position embeddings are fixed 2-D sin-cos (He et al. 2021, "Masked Autoencoders Are Scalable
Vision Learners"); written from the paper, not from the reference repository.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deldist.encoders import build_encoder, pool_tokens

# ------------------------------------------------------------------ patches, position embeddings, masking


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings -> (cls + grid_h * grid_w, dim) float32.

    Half the channels encode the row, half the column; each half is [sin(pos * w), cos(pos * w)]
    with w_k = 1 / 10000^(k / (dim / 4)). The class token's row is zeros. Row-major patch order,
    the order of timm's ``PatchEmbed`` output.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:  # (G,) -> (G, dim/2)
        angles = pos[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([encode(rows.reshape(-1)), encode(cols.reshape(-1))], axis=1)  # (G, dim)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb.astype(np.float32))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C), patches in row-major order, values (p, p, C) inside."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible into {patch}x{patch} patches")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid_h: int, grid_w: int, channels: int = 3) -> torch.Tensor:
    """(B, N, p * p * C) -> (B, C, grid_h * p, grid_w * p); inverse of :func:`patchify`."""
    b = patches.shape[0]
    x = patches.reshape(b, grid_h, grid_w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid_h * patch, grid_w * patch)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches each sample keeps: round((1 - mask_ratio) * N), at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, round((1.0 - mask_ratio) * num_patches))


def random_masking(tokens: torch.Tensor, mask_ratio: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample uniform random masking.

    tokens: (B, N, D). Returns ``visible`` (B, K, D) with K = :func:`num_visible`, the kept
    tokens in a random order; ``mask`` (B, N) float, 1 = masked (to reconstruct), 0 = visible,
    in the original patch order; ``restore`` (B, N) long, the permutation that puts
    [visible tokens, then K..N-1 placeholders] back into patch order.
    """
    b, n, d = tokens.shape
    keep = num_visible(n, mask_ratio)
    noise = torch.rand(b, n, device=tokens.device, generator=generator)
    shuffle = torch.argsort(noise, dim=1)  # ascending noise: the first `keep` are visible
    restore = torch.argsort(shuffle, dim=1)
    visible = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    return visible, mask, restore


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      norm_pix_loss: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over the masked patches only -> scalar.

    pred, target: (B, N, P); mask: (B, N), 1 = masked. With ``norm_pix_loss`` each target patch
    is normalised by its own mean and variance first (MAE's better-representation variant).
    """
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


# ------------------------------------------------------------------ MAE


def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_plain_vit(encoder: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"MAE needs a timm VisionTransformer, got {type(encoder).__name__}")
    if encoder.cls_token is None or encoder.reg_token is not None or encoder.no_embed_class \
            or encoder.pos_embed is None or encoder.dynamic_img_size:
        raise ValueError("MAE supports plain class-token ViTs (pos_embed covering the class token, "
                         "no register tokens, fixed image size)")


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder: a timm ViT encoder on the visible patches, a light ViT decoder
    that predicts the pixels of the masked ones.

    ``forward(images (B, 3, H, W)) -> (loss scalar, pred (B, N, P), mask (B, N))``; images are
    normalised RGB, H = W = the encoder's image size.
    """

    def __init__(self, encoder: nn.Module, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 mlp_ratio: float = 4.0):
        super().__init__()
        from timm.models.vision_transformer import Block

        _check_plain_vit(encoder)
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch = int(encoder.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        dim = int(encoder.embed_dim)
        # the encoder's learnable pos_embed becomes a fixed sin-cos table (kept as a parameter
        # so the encoder's state dict keeps timm's keys)
        encoder.pos_embed.data.copy_(sincos_pos_embed_2d(dim, *self.grid).unsqueeze(0))
        encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, *self.grid).unsqueeze(0),
                             persistent=True)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * self.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_xavier_init)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> latent (B, 1 + K, D) (class token first), mask (B, N), restore (B, N)."""
        enc = self.encoder
        x = enc.patch_embed(images)  # (B, N, D)
        x = x + enc.pos_embed[:, 1:, :]
        x, mask, restore = random_masking(x, mask_ratio, generator)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.blocks(x)
        return enc.norm(x), mask, restore

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + K, D), restore (B, N) -> predicted patches (B, N, P)."""
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        b, n = restore.shape
        placeholders = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], placeholders], dim=1)  # (B, N, Dd), shuffled order
        patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> (loss, pred (B, N, P), mask (B, N))."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, restore = self.forward_encoder(images, ratio, generator)
        pred = self.forward_decoder(latent, restore)
        loss = masked_patch_loss(pred, patchify(images, self.patch), mask, self.norm_pix_loss)
        return loss, pred, mask


def build_mae(model_name: str, image_size: int, decoder_dim: int = 512, decoder_depth: int = 8,
              decoder_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
              seed: int = 0) -> MaskedAutoencoderViT:
    """An MAE whose encoder is ``build_encoder(model_name, image_size, seed)`` (seeded init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return MaskedAutoencoderViT(build_encoder(model_name, image_size, seed), decoder_dim, decoder_depth,
                                    decoder_heads, mask_ratio, norm_pix_loss)


# ------------------------------------------------------------------ downstream heads


class SegmentationViT(nn.Module):
    """ViT encoder + a light per-token MLP head, upsampled to the input size.

    ``forward(images (B, 3, H, W)) -> logits (B, num_classes, H, W)``: patch tokens (B, N, D)
    -> MLP (D -> hidden -> num_classes) per token -> (B, num_classes, H/p, W/p) -> bilinear x p.
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 2, hidden: int = 256):
        super().__init__()
        self.encoder = encoder
        self.prefix = int(getattr(encoder, "num_prefix_tokens", 1))
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        dim = int(encoder.embed_dim)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)[:, self.prefix:, :]  # (B, N, D)
        logits = self.head(tokens)  # (B, N, classes)
        b, _, k = logits.shape
        logits = logits.transpose(1, 2).reshape(b, k, *self.grid)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


class ClassifierViT(nn.Module):
    """ViT encoder + linear head on the pooled tokens.

    ``forward(images (B, 3, H, W)) -> logits (B, num_classes)``; ``features(images) -> (B, D)``
    (class token or mean of the patch tokens).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "cls"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.prefix = int(getattr(encoder, "num_prefix_tokens", 1))
        self.head = nn.Linear(int(encoder.embed_dim), num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.encoder.forward_features(images), self.pooling, self.prefix)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                 smooth: float = 1.0) -> torch.Tensor:
    """Cross-entropy + soft Dice over the foreground classes -> scalar.

    logits: (B, K, H, W); target: (B, H, W) long in [0, K). Dice is computed per class over
    the whole batch (classes 1..K-1; class 0 is background), then averaged.
    """
    ce = F.cross_entropy(logits.float(), target)
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (total + smooth)  # (K,)
    return ce + dice_weight * (1 - dice[1:].mean())


# ------------------------------------------------------------------ optimisation math


_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "reg_token")


def vit_depth(name: str, num_layers: int) -> int:
    """Depth of a ViT parameter for layer-wise lr decay: patch / position embeddings and tokens
    0, ``blocks.i.*`` i + 1, everything after the blocks (final norm) ``num_layers`` + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on weight matrices, none on norms, biases and
    tokens / position embeddings (1-D parameters and :data:`_NO_DECAY_NAMES`). Frozen
    parameters are left out.

    layer_decay (a ViT encoder; MAE / BEiT finetuning): each group also carries ``lr_scale`` =
    layer_decay ** (L + 1 - depth) (:func:`vit_depth`, L = number of blocks), so the patch
    embedding learns slowest and the last block fastest; callers multiply their lr by it.
    """
    num_layers = len(getattr(model, "blocks", ()))
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in _NO_DECAY_NAMES
        depth = vit_depth(name, num_layers) if layer_decay is not None else 0
        groups.setdefault((depth, no_decay), []).append(p)
    if layer_decay is None:
        return [{"params": groups.get((0, True), []), "weight_decay": 0.0},
                {"params": groups.get((0, False), []), "weight_decay": weight_decay}]
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_scale": layer_decay ** (num_layers + 1 - depth)}
            for (depth, no_decay), params in sorted(groups.items())]


def lr_at_step(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Per-step schedule: linear warmup 0 -> ``peak_lr`` over ``warmup_steps``, then half-cosine
    to ``min_lr`` at ``total_steps``. ``step`` counts optimizer steps from 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """MAE's linear scaling rule: lr = blr * global batch / 256."""
    return base_lr * global_batch / 256


def lr_lambda(total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float):
    """A ``LambdaLR`` multiplier (optimizer lr set to ``peak_lr``) following :func:`lr_at_step`."""
    def factor(step: int) -> float:
        return lr_at_step(step, total_steps, warmup_steps, peak_lr, min_lr) / peak_lr if peak_lr > 0 else 0.0
    return factor


def trainable(params: Iterable[torch.nn.Parameter]) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in params if p.requires_grad)
