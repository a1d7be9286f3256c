"""Dataset distillation (issue 14 item 2): the ConvNet, DSA's Siamese augmentation, the DM loop,
DC's gradient distance, and ``deldist distill`` on a real local Ray cluster."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from deldist import distill, storage
from deldist.distill_ray import mean_spread, random_subset, split_per_class

TRANSFORMS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _two_classes(n: int = 12, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Two classes of noisy images: bright-left vs bright-right, with per-image variation."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, size).view(1, 1, 1, size)
    base = torch.randn(2 * n, 3, size, size, generator=gen)
    return [base[:n] + 2 * ramp + torch.randn(n, 3, 1, 1, generator=gen),
            base[n:] - 2 * ramp + torch.randn(n, 3, 1, 1, generator=gen)]


def test_convnet_shapes():
    net = distill.ConvNet(channels=3, n_classes=5, image_size=32)  # 3 x [conv-128, IN, ReLU, avgpool 2]
    x = torch.randn(4, 3, 32, 32)
    assert net.embed(x).shape == (4, 128 * 4 * 4)
    assert net(x).shape == (4, 5)
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net.features if isinstance(m, torch.nn.GroupNorm)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 and [c.out_channels for c in convs] == [128] * 3
    assert all(n.num_groups == n.num_channels == 128 for n in norms)  # instance norm
    assert distill.ConvNet(1, 2, 16, width=8, depth=2).embed(torch.randn(2, 1, 16, 16)).shape == (2, 8 * 4 * 4)
    with pytest.raises(ValueError, match="divisible"):
        distill.ConvNet(3, 2, 20)


@pytest.mark.parametrize("strategy", [*TRANSFORMS, distill.DSA_STRATEGY])
def test_augmentation_is_shared_by_real_and_synthetic_with_one_seed(strategy):
    gen = torch.Generator().manual_seed(1)
    real, syn = torch.randn(7, 3, 16, 16, generator=gen), torch.randn(3, 3, 16, 16, generator=gen)
    changed = 0
    for seed in range(12):
        together = distill.dsa_augment(torch.cat([real, syn]), seed, strategy)
        apart = torch.cat([distill.dsa_augment(real, seed, strategy), distill.dsa_augment(syn, seed, strategy)])
        torch.testing.assert_close(together, apart)  # the same transform for both batches
        assert together.shape == (10, 3, 16, 16)
        changed += not torch.allclose(together, torch.cat([real, syn]))
    assert changed >= 4  # it does transform (flip leaves half the draws alone)
    outputs = {distill.dsa_augment(real, seed, strategy).sum().item() for seed in range(12)}
    assert len(outputs) > 1  # the seed decides


def test_augmentation_is_differentiable_and_each_transform_does_what_it_says():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    for name in TRANSFORMS:
        distill.dsa_augment(x, 3, name).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    img = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    flipped = [distill.dsa_augment(img, s, "flip") for s in range(10)]
    assert any(torch.equal(f, img.flip(3)) for f in flipped) and any(torch.equal(f, img) for f in flipped)
    cut = distill.dsa_augment(torch.ones(1, 1, 16, 16), 5, "cutout")
    assert (cut == 0).sum() > 0 and (cut == 0).sum() <= 8 * 8
    assert distill.dsa_augment(img, 0, "") is img
    with pytest.raises(ValueError, match="unknown"):
        distill.dsa_augment(img, 0, "blur")


def test_dm_matching_loss_falls_and_images_move_from_their_init():
    real = _two_classes()
    settings = distill.DistillSettings(iterations=60, real_batch=12, width=16, strategy="")
    result = distill.distill_dm(real, per_class=2, settings=settings, seed=0)
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.75 * first, (first, last)  # measured 1.21 -> 0.70
    init = torch.cat(distill.init_synthetic(real, 2, torch.Generator().manual_seed(0)))

    def held_out_loss(images: torch.Tensor) -> float:  # on 20 networks the loop never saw
        losses = []
        for k in range(20):
            torch.manual_seed(1000 + k)
            net = distill.ConvNet(3, 2, 16, width=16)
            losses.append(float(distill.dm_loss(net, real, [images[:2], images[2:]], 0, "").detach()))
        return float(np.mean(losses))

    assert held_out_loss(result.images) < 0.85 * held_out_loss(init)  # measured 0.72 vs 1.04
    moved = (result.images - init).abs().mean()
    assert moved > 0.05
    assert result.images.shape == (4, 3, 16, 16) and result.labels.tolist() == [0, 0, 1, 1]
    # every init image is one of its class's real images
    for c in range(2):
        assert all(any(torch.equal(s, r) for r in real[c]) for s in init[2 * c:2 * c + 2])


def test_dm_loss_is_zero_for_the_same_set_and_grows_with_a_shift():
    real = _two_classes(n=6)
    net = distill.ConvNet(3, 2, 16, width=8)
    assert float(distill.dm_loss(net, real, [r.clone() for r in real], seed=4).detach()) == pytest.approx(0.0, abs=1e-10)
    shifted = [r + 1.0 for r in real]
    assert float(distill.dm_loss(net, real, shifted, seed=4).detach()) > 1e-3


def test_gradient_distance_against_a_hand_computed_case():
    # conv (2 out, 1 in, 1 x 1): rows [1], [2] vs [1], [-2]: cosines 1 and -1 -> (1-1) + (1+1) = 2
    conv_a, conv_b = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1), torch.tensor([1.0, -2.0]).view(2, 1, 1, 1)
    # linear (2 x 2): rows [1, 0] vs [0, 1] (cosine 0 -> 1) and [0, 1] vs [0, 3] (cosine 1 -> 0)
    lin_a, lin_b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    # a bias: ignored, as in DC's reference code
    bias_a, bias_b = torch.tensor([1.0, 5.0]), torch.tensor([-3.0, 0.5])
    d = distill.gradient_distance([conv_a, lin_a, bias_a], [conv_b, lin_b, bias_b])
    assert float(d) == pytest.approx(3.0, abs=1e-5)
    # conv rows are whole (in * h * w) filters: [1, 0, 0, 1] vs [1, 0, 0, -1] has cosine 0
    assert float(distill.gradient_distance([torch.tensor([1.0, 0, 0, 1]).view(1, 1, 2, 2)],
                                           [torch.tensor([1.0, 0, 0, -1]).view(1, 1, 2, 2)])) == pytest.approx(1.0)
    same = [torch.randn(4, 3, 3, 3)]
    assert float(distill.gradient_distance(same, [2 * same[0]])) == pytest.approx(0.0, abs=1e-5)


def test_dc_and_dsa_run_and_move_the_images():
    real = _two_classes(n=6)
    settings = distill.DistillSettings(iterations=4, image_lr=0.1, real_batch=6, width=8)
    init = torch.cat(distill.init_synthetic(real, 1, torch.Generator().manual_seed(2)))
    for augment in (False, True):
        result = distill.distill_dc(real, 1, settings, seed=2, augment=augment)
        assert len(result.losses) == 4 and all(math.isfinite(v) and v >= 0 for v in result.losses)
        assert (result.images - init).abs().max() > 0


def test_evaluation_learns_a_separable_set():
    real = _two_classes(n=16, seed=3)
    x = torch.cat([r[:10] for r in real])
    y = torch.tensor([0] * 10 + [1] * 10)
    test_x, test_y = torch.cat([r[10:] for r in real]), torch.tensor([0] * 6 + [1] * 6)
    acc = distill.train_and_test(x, y, test_x, test_y, 2, distill.EvalSettings(epochs=15, width=16, strategy=""), 0)
    assert acc >= 0.9


def test_split_subset_and_spread():
    targets = np.array([0] * 10 + [1] * 3 + [2] * 2)
    train, test = split_per_class(targets, 0.4, 0)
    assert set(train) | set(test) == set(range(15)) and not set(train) & set(test)
    assert [int((targets[test] == c).sum()) for c in range(3)] == [4, 1, 1]
    sub = random_subset(targets, 2, 1)
    assert np.bincount(targets[sub]).tolist() == [2, 2, 2]
    assert not np.array_equal(random_subset(targets, 2, 1), random_subset(targets, 2, 2)) or \
        not np.array_equal(random_subset(targets, 2, 3), random_subset(targets, 2, 1))
    with pytest.raises(ValueError, match="need 2"):
        split_per_class(np.array([0, 0, 1]), 0.5, 0)
    assert mean_spread([0.5, 0.7]) == pytest.approx({"mean": 0.6, "std": math.sqrt(0.02), "min": 0.5, "max": 0.7})


def test_distill_on_ray_writes_a_frame_store_and_summary_finetune_reads(ray_session, tmp_path):
    from pathlib import Path

    from PIL import Image

    from deldist import cli
    from deldist.few_shot import Classification, labelled_images
    from deldist.materialize import FRAMES_SCHEMA
    from deldist.sample import write_kvasir

    write_kvasir(Path(tmp_path / "kvasir"), np.random.default_rng(0), 24, 32)  # 16 polyp, 4 normal, 4 inflamed
    out = tmp_path / "run"
    result_file = tmp_path / "result.json"
    argv = ["distill", f"data={tmp_path / 'kvasir'}", f"output={out}", "image_size=16", "images_per_class=2",
            "seeds=2", "iterations=6", "width=8", "eval_epochs=3", "real_batch=8", "task_cpus=0.5",
            "--json", str(result_file)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "distill" / "dm" / "summary.json").read_text())
    assert json.loads(result_file.read_text())["summary"].endswith("distill/dm/summary.json")
    assert storage.is_published(str(out / "distill" / "dm"))
    assert summary["method"] == "dm" and summary["seeds"] == [0, 1] and summary["synthetic_images"] == 6
    assert summary["train_per_class"] == {"inflamed": 2, "normal": 2, "polyp": 10}
    for method in ("distilled", "random", "initial", "full"):
        assert 0 <= summary["accuracy"][method]["mean"] <= 1 and summary["accuracy"][method]["std"] >= 0
    assert set(summary["fraction_of_full"]) == {"distilled", "random"}
    assert all(r["moved_rms"] > 0 for r in summary["per_seed"])
    for seed in (0, 1):
        store = out / "distill" / "dm" / "synthetic" / f"seed{seed}"
        table = storage.read_published(str(store / "frames"))
        assert table.schema.equals(FRAMES_SCHEMA) and table.num_rows == 6
        assert Image.open(io.BytesIO(table.column("jpeg")[0].as_py())).size == (16, 16)
        images, targets, classes, multilabel = labelled_images(Classification(data=str(store)), 16)
        assert images.shape == (6, 3, 16, 16) and not multilabel
        assert classes == ["inflamed", "normal", "polyp"] and np.bincount(targets).tolist() == [2, 2, 2]
        with open(store / "labels.csv") as f:
            assert sorted(table.column("id").to_pylist()) == sorted(r["name"] for r in csv.DictReader(f))
