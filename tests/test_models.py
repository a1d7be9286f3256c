"""MAE and heads: shapes, masking counts, loss, learning on sample frames, export loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deldist.encoders import build_encoder, load_weights
from deldist.models import (
    ClassifierViT,
    SegmentationViT,
    build_mae,
    dice_ce_loss,
    lr_at_step,
    masked_patch_loss,
    num_visible,
    param_groups,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)

MODEL = "deldist_vit_micro_patch16"  # registered by deldist.models: 192 wide, 4 deep
SIZE = 64  # 4 x 4 patches


def _tiny_mae(**kw):
    return build_mae(MODEL, SIZE, decoder_dim=64, decoder_depth=1, decoder_heads=4, **kw)


def test_mae_forward_backward_shapes():
    mae = _tiny_mae()
    x = torch.randn(3, 3, SIZE, SIZE)
    loss, pred, mask = mae(x)
    assert loss.ndim == 0 and pred.shape == (3, 16, 16 * 16 * 3) and mask.shape == (3, 16)
    latent, mask, restore = mae.forward_encoder(x, 0.75)
    assert latent.shape == (3, 1 + 4, 192) and restore.shape == (3, 16)
    loss.backward()
    grads = {n: p.grad for n, p in mae.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert not mae.encoder.pos_embed.requires_grad  # fixed sin-cos


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (196, 0.75), (196, 0.9), (49, 0.6), (10, 0.0)])
def test_masking_keeps_round_fraction_per_sample(n, ratio):
    tokens = torch.arange(5 * n, dtype=torch.float32).view(5, n, 1).expand(5, n, 2).contiguous()
    visible, mask, restore = random_masking(tokens, ratio, torch.Generator().manual_seed(0))
    keep = round((1 - ratio) * n)
    assert num_visible(n, ratio) == keep
    assert visible.shape == (5, keep, 2)
    assert (mask.sum(1) == n - keep).all()
    # the visible tokens are exactly the unmasked positions; samples are masked differently
    for b in range(5):
        kept_positions = set((visible[b, :, 0] - b * n).long().tolist())
        assert kept_positions == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    if 0 < ratio:
        assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])
    # restore puts [visible, placeholders] back in patch order
    padded = torch.cat([visible, torch.full((5, n - keep, 2), -1.0)], dim=1)
    unshuffled = torch.gather(padded, 1, restore[:, :, None].expand(-1, -1, 2))
    assert torch.equal(unshuffled[mask == 0], tokens[mask == 0])


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 6, 768)
    assert torch.equal(p[0, 1].view(16, 16, 3), x[0, :, :16, 16:32].permute(1, 2, 0))  # row-major
    assert torch.equal(unpatchify(p, 16, 2, 3), x)


def test_sincos_pos_embed():
    emb = sincos_pos_embed_2d(8, 2, 3)
    assert emb.shape == (7, 8) and torch.equal(emb[0], torch.zeros(8))
    # patch (row 1, col 2): first half encodes row 1, second half col 2; w = [1, 1e-2]
    expected = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
                math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    assert np.allclose(emb[1 + 1 * 3 + 2].numpy(), expected, atol=1e-6)


def test_masked_loss_by_hand():
    pred = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 1, 1, 1], [0, 2, 0, 2]]])
    mask = torch.tensor([[0.0, 1.0]])
    assert masked_patch_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(2.0)
    # norm_pix: patch [0, 2, 0, 2] -> mean 1, var 4/3 (unbiased) -> values +-sqrt(3/4)
    assert masked_patch_loss(pred, target, mask, norm_pix_loss=True).item() == pytest.approx(0.75, rel=1e-4)


def test_loss_falls_on_sample_frames(tiny_sample):
    """A few AdamW steps on real sample frames (fixed mask per step: the same batch) lower the loss."""
    from deldist.frames import Sampling, decode_video

    video = sorted((tiny_sample / "videos").rglob("*.mp4"))[0]
    frames = [rgb for _, _, rgb in decode_video(str(video), SIZE, Sampling(stride=4))][:8]
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    x = (x - 0.45) / 0.25
    torch.manual_seed(0)
    mae = _tiny_mae()
    opt = torch.optim.AdamW(param_groups(mae, 0.05), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(12):
        loss, _, _ = mae(x, generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_param_groups_no_decay_on_norms_biases_tokens():
    mae = _tiny_mae()
    no_decay, decay = param_groups(mae, 0.05)
    names = {id(p): n for n, p in mae.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert "encoder.cls_token" in nd and "mask_token" in nd and "encoder.blocks.0.norm1.weight" in nd
    assert "encoder.blocks.0.attn.qkv.bias" in nd and "encoder.blocks.0.attn.qkv.weight" in d
    assert "encoder.pos_embed" not in nd | d  # frozen


def test_lr_schedule():
    assert lr_at_step(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at_step(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at_step(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at_step(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at_step(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_heads_shapes_and_dice_ce():
    seg = SegmentationViT(build_encoder(MODEL, SIZE), num_classes=2, hidden=32)
    x = torch.randn(2, 3, SIZE, SIZE)
    logits = seg(x)
    assert logits.shape == (2, 2, SIZE, SIZE)
    target = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    target[:, 10:30, 10:30] = 1
    loss = dice_ce_loss(logits, target)
    loss.backward()
    perfect = torch.stack([1 - target, target], 1).float() * 20 - 10
    assert dice_ce_loss(perfect, target).item() < 1e-3
    cls = ClassifierViT(build_encoder(MODEL, SIZE), num_classes=3)
    assert cls(x).shape == (2, 3) and cls.features(x).shape == (2, 192)


def test_encoder_export_loads_in_build_encoder(tmp_path):
    """The MAE encoder's state dict is a timm ViT state dict: load_weights takes it as is,
    and as a full MAE checkpoint (decoder dropped); outputs are identical."""
    from safetensors.torch import save_file

    mae = _tiny_mae()
    with torch.no_grad():
        for p in mae.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in mae.encoder.state_dict().items()}, str(plain))
    full = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict()}, full)
    x = torch.randn(2, 3, SIZE, SIZE)
    mae.eval()
    with torch.no_grad():
        expected = mae.encoder.forward_features(x)
    for uri in (plain, full):
        encoder = build_encoder(MODEL, SIZE, seed=5)
        report = load_weights(encoder, str(uri))
        encoder.eval()
        with torch.no_grad():
            assert torch.equal(encoder.forward_features(x), expected)
        assert not report.random_init


def test_layer_decay_scales_lr_by_depth():
    vit = build_encoder("deldist_vit_micro_patch16", 224)
    depth = len(vit.blocks)
    groups = param_groups(vit, 0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(vit.named_parameters())
    assert len(scale_of) == len(params) == sum(len(g["params"]) for g in groups)  # each parameter once
    assert scale_of[id(params["patch_embed.proj.weight"])] == 0.5 ** (depth + 1)
    assert scale_of[id(params["pos_embed"])] == 0.5 ** (depth + 1)
    assert scale_of[id(params["blocks.0.attn.qkv.weight"])] == 0.5 ** depth
    assert scale_of[id(params[f"blocks.{depth - 1}.mlp.fc1.weight"])] == 0.5
    assert scale_of[id(params["norm.weight"])] == 1.0
    assert decay_of[id(params["blocks.0.attn.qkv.weight"])] == 0.05 and decay_of[id(params["blocks.0.norm1.weight"])] == 0.0
    # without layer_decay: the two plain groups, no lr_scale
    assert [sorted(g) for g in param_groups(vit, 0.05)] == [["params", "weight_decay"]] * 2
