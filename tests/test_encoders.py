"""Encoder weight loading: checkpoint layouts, strictness, no silent random weights."""

from __future__ import annotations

import pytest
import torch

from deldist.encoders import WeightsError, build_encoder, load_weights, pool_tokens

MODEL = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def reference():
    """Weights that differ from a fresh build_encoder (seed 0), so loading must change them."""
    model = build_encoder(MODEL, seed=123)
    assert not _same(model, build_encoder(MODEL))
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plain_state_dict_pth(tmp_path, reference):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    model = build_encoder(MODEL)
    report = load_weights(model, str(path))
    assert _same(model, reference) and not report.random_init and len(report.sha256) == 64


def test_mae_layout_drops_decoder(tmp_path, reference):
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    state["decoder_embed.weight"] = torch.zeros(4, 4)
    state["decoder_pred.bias"] = torch.zeros(4)
    state["mask_token"] = torch.zeros(1, 1, 4)
    path = tmp_path / "mae.pth"
    torch.save({"model": state, "epoch": 3}, path)
    model = build_encoder(MODEL)
    report = load_weights(model, str(path))
    assert _same(model, reference)
    assert sorted(report.dropped_keys) == ["decoder_embed.weight", "decoder_pred.bias", "mask_token"]


def test_safetensors(tmp_path, reference):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = build_encoder(MODEL)
    load_weights(model, str(path))
    assert _same(model, reference)


def test_missing_and_unexpected_keys_are_errors(tmp_path, reference):
    state = dict(reference.state_dict())
    del state["blocks.0.attn.qkv.weight"]
    state["blocks.99.mlp.fc1.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing \['blocks.0.attn.qkv.weight'\].*unexpected \['blocks.99"):
        load_weights(build_encoder(MODEL), str(path))


def test_random_init_is_deterministic():
    assert _same(build_encoder(MODEL), build_encoder(MODEL))


def test_no_weights_needs_explicit_random_init(tmp_path):
    with pytest.raises(WeightsError, match="random_init"):
        load_weights(build_encoder(MODEL), None)
    assert load_weights(build_encoder(MODEL), None, random_init=True).random_init
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(build_encoder(MODEL), str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot load"):
        load_weights(build_encoder(MODEL), str(junk))


def test_pos_embed_resampled_for_other_input_size(tmp_path, reference):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    small = build_encoder(MODEL, image_size=112)
    report = load_weights(small, str(path))
    assert report.resized == ["pos_embed"] and small.pos_embed.shape == (1, 1 + 49, 192)


def test_pooling_shapes():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # (B, 1 + N, D)
    assert torch.equal(pool_tokens(tokens, "cls", 1), tokens[:, 0])
    assert torch.allclose(pool_tokens(tokens, "mean", 1), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError):
        pool_tokens(tokens, "max", 1)
