"""Dataset distillation math: the ConvNet, DSA's differentiable Siamese augmentation, the
Distribution Matching loss and loop (DM), the gradient-matching distance and loop (DC / DSA),
and the evaluation protocol (train fresh ConvNets on a set, test on real data). Pure: torch
tensors in and out, no Ray, no I/O (the stage is :mod:`deldist.distill_ray`).

Sources. Our copy of the study that motivates this (``papers/003_*``, "Dataset Distillation
in Medical Imaging: A Feasibility Study") is its abstract only: it compares DC, DSA and DM and
reports that 1-5 % of a dataset, distilled, recovers >= 90 % of full-data accuracy. The rules
below are those of the original methods and of their authors' reference code
(VICO-UoE/DatasetCondensation):

- DC: Zhao, Mopuri, Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021.
- DSA: Zhao, Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021.
- DM: Zhao, Bilen, "Dataset Condensation with Distribution Matching", WACV 2023.

Tensors are float32 images (N, C, H, W) normalised per channel (the callers' mean / std), and
int64 labels (N,). Where deldist departs from the papers the docstring says "deldist's rule".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# DSA's transforms ('S' mode draws one of these per call) and their ranges (ParamDiffAug)
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class AugmentRanges:
    """DSA's augmentation ranges (the reference code's ``ParamDiffAug`` defaults)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125  # translation, fraction of the side
    ratio_cutout: float = 0.5  # side of the erased square, fraction of the side
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


# ------------------------------------------------------------------ the network


class ConvNet(nn.Module):
    """The ConvNet of DC / DSA / DM (their experiments' default network; reference ``ConvNet`` with ``instancenorm``,
    ``avgpooling``): ``depth`` x [conv 3x3 (``width`` channels, padding 1), instance norm
    (``GroupNorm(width, width)``, affine, as the reference code builds it), ReLU, average pool 2],
    then one linear classifier.

    x (N, channels, S, S) -> :meth:`embed` (N, width * (S / 2**depth)**2) -> logits (N, n_classes).
    S must be divisible by 2**depth."""

    def __init__(self, channels: int, n_classes: int, image_size: int, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        if image_size % (2 ** depth):
            raise ValueError(f"image_size {image_size} is not divisible by 2**depth = {2 ** depth}")
        layers: list[nn.Module] = []
        for d in range(depth):
            layers += [nn.Conv2d(channels if d == 0 else width, width, kernel_size=3, padding=1),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
        self.features = nn.Sequential(*layers)
        self.embed_dim = width * (image_size // 2 ** depth) ** 2
        self.classifier = nn.Linear(self.embed_dim, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, embed_dim): the feature extractor psi_theta that DM matches."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# ------------------------------------------------------------------ DSA augmentation


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _color(x: torch.Tensor, gen: torch.Generator, r: AugmentRanges) -> torch.Tensor:
    x = x + (_uniform(gen) - 0.5) * r.brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(gen) * r.saturation) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(gen) + r.contrast) + mean


def _crop(x: torch.Tensor, gen: torch.Generator, r: AugmentRanges) -> torch.Tensor:
    """Translation by up to ``ratio_crop_pad`` of the side, zero padded (DSA's "crop")."""
    h, w = x.shape[2:]
    sh, sw = int(h * r.ratio_crop_pad + 0.5), int(w * r.ratio_crop_pad + 0.5)
    dy = int(torch.randint(-sh, sh + 1, (), generator=gen))
    dx = int(torch.randint(-sw, sw + 1, (), generator=gen))
    padded = F.pad(x, (sw, sw, sh, sh))
    return padded[:, :, sh + dy:sh + dy + h, sw + dx:sw + dx + w]


def _cutout(x: torch.Tensor, gen: torch.Generator, r: AugmentRanges) -> torch.Tensor:
    h, w = x.shape[2:]
    ch, cw = int(h * r.ratio_cutout + 0.5), int(w * r.ratio_cutout + 0.5)
    cy = int(torch.randint(0, h + (1 - ch % 2), (), generator=gen))
    cx = int(torch.randint(0, w + (1 - cw % 2), (), generator=gen))
    mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
    mask[max(0, cy - ch // 2):max(0, cy + ch - ch // 2), max(0, cx - cw // 2):max(0, cx + cw - cw // 2)] = 0
    return x * mask


def _flip(x: torch.Tensor, gen: torch.Generator, r: AugmentRanges) -> torch.Tensor:
    return x.flip(3) if _uniform(gen) < r.prob_flip else x


def _scale(x: torch.Tensor, gen: torch.Generator, r: AugmentRanges) -> torch.Tensor:
    lo = 1.0 / r.ratio_scale
    sx, sy = (_uniform(gen) * (r.ratio_scale - lo) + lo for _ in range(2))
    return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def _rotate(x: torch.Tensor, gen: torch.Generator, r: AugmentRanges) -> torch.Tensor:
    a = (_uniform(gen) - 0.5) * 2 * r.ratio_rotate / 180 * math.pi
    return _affine(x, [[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]])


_TRANSFORMS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def dsa_augment(x: torch.Tensor, seed: int, strategy: str = DSA_STRATEGY,
                ranges: AugmentRanges = AugmentRanges()) -> torch.Tensor:
    """DSA's differentiable Siamese augmentation A(x, omega) (DSA §3, 'S' mode of the reference
    ``DiffAugment``): one transform of ``strategy`` ("color" = brightness, saturation, contrast;
    "crop" = translation; "cutout"; "flip"; "scale"; "rotate") drawn by ``seed``, with its
    parameters drawn by ``seed`` and shared by every image of the batch (the reference code's
    ``Siamese`` mode). The same seed gives the same transform whatever the batch, so real and
    synthetic batches augmented with one seed are transformed identically; every op is
    differentiable in x. x (N, C, H, W) -> (N, C, H, W). An empty strategy returns x.

    deldist's rule: one ``torch.Generator`` seeded once per call (the reference reseeds the
    global generator with seed, seed + 1, ... per op): the same property, no global state."""
    names = [s for s in strategy.split("_") if s and s.lower() != "none"]
    if not names:
        return x
    unknown = set(names) - set(_TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown augmentation {sorted(unknown)}; known: {sorted(_TRANSFORMS)}")
    gen = torch.Generator().manual_seed(int(seed))
    name = names[int(torch.randint(0, len(names), (), generator=gen))]
    return _TRANSFORMS[name](x, gen, ranges)


# ------------------------------------------------------------------ DM


def dm_loss(net: ConvNet, real: list[torch.Tensor], synthetic: list[torch.Tensor], seed: int,
            strategy: str = DSA_STRATEGY) -> torch.Tensor:
    """The DM objective for one sampled network theta and augmentation omega (DM §3, the objective
    with DSA's augmentation A(., omega); the reference ``main_DM.py``):

        sum_c || mean_i psi_theta(A(x_i^c, omega_c)) - mean_j psi_theta(A(s_j^c, omega_c)) ||^2

    real[c] (B_c, C, H, W) a batch of class c's real images, synthetic[c] (M, C, H, W) its
    synthetic images; one seed per class (``seed + c``) shared by its real and synthetic batch.
    Real embeddings carry no gradient; the loss is differentiable in the synthetic images."""
    loss = torch.zeros((), dtype=synthetic[0].dtype)
    for c, (x, s) in enumerate(zip(real, synthetic)):
        with torch.no_grad():
            mean_real = net.embed(dsa_augment(x, seed + c, strategy)).mean(dim=0)
        mean_syn = net.embed(dsa_augment(s, seed + c, strategy)).mean(dim=0)
        loss = loss + ((mean_real - mean_syn) ** 2).sum()
    return loss


@dataclass(frozen=True)
class DistillSettings:
    """The learning of the synthetic set (DM defaults: SGD on the images, lr 1.0, momentum 0.5)."""

    iterations: int = 500
    image_lr: float = 1.0
    momentum: float = 0.5
    real_batch: int = 64  # real images per class per iteration (DM: 256)
    width: int = 128
    depth: int = 3
    strategy: str = DSA_STRATEGY
    # DC / DSA only: network updates on the synthetic set between image updates
    net_steps: int = 1
    net_lr: float = 0.01


@dataclass
class DistillResult:
    """The learned images (M x classes, C, H, W), their labels, and the loss per iteration."""

    images: torch.Tensor
    labels: torch.Tensor
    losses: list[float] = field(default_factory=list)


def init_synthetic(real: list[torch.Tensor], per_class: int, gen: torch.Generator) -> list[torch.Tensor]:
    """DM / DC initialisation: ``per_class`` real images of each class drawn without replacement
    (with replacement only when a class has fewer). real[c] (N_c, C, H, W) -> list of (M, C, H, W)."""
    out = []
    for x in real:
        replace = len(x) < per_class
        idx = torch.randint(0, len(x), (per_class,), generator=gen) if replace else \
            torch.randperm(len(x), generator=gen)[:per_class]
        out.append(x[idx].clone())
    return out


def _class_batches(real: list[torch.Tensor], size: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [x[torch.randperm(len(x), generator=gen)[:size]] for x in real]


def distill_dm(real: list[torch.Tensor], per_class: int, settings: DistillSettings, seed: int) -> DistillResult:
    """Distribution Matching (DM §3, reference ``main_DM.py``): per iteration a freshly initialised
    ConvNet (parameters not trained: DM samples theta from its initialisation distribution), a
    real batch per class and one augmentation seed per class; SGD on the synthetic images
    (lr ``image_lr``, momentum ``momentum``) of :func:`dm_loss`. real[c] (N_c, C, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    syn = [s.requires_grad_(True) for s in init_synthetic(real, per_class, gen)]
    opt = torch.optim.SGD(syn, lr=settings.image_lr, momentum=settings.momentum)
    c, size = real[0].shape[1], real[0].shape[2]
    losses = []
    for it in range(settings.iterations):
        net = ConvNet(c, len(real), size, settings.width, settings.depth)
        net.requires_grad_(False)
        loss = dm_loss(net, _class_batches(real, settings.real_batch, gen), syn,
                       int(torch.randint(0, 2**31 - 1, (), generator=gen)), settings.strategy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    images = torch.cat([s.detach() for s in syn])
    labels = torch.arange(len(real)).repeat_interleave(per_class)
    return DistillResult(images, labels, losses)


# ------------------------------------------------------------------ DC / DSA


def gradient_distance(grads_real: list[torch.Tensor], grads_syn: list[torch.Tensor]) -> torch.Tensor:
    """DC's layer-wise gradient distance (DC §3, the distance d(A, B); reference ``match_loss`` 'ours'):

        D = sum_layers sum_i (1 - <A_i, B_i> / (||A_i|| ||B_i|| + 1e-6))

    over the output nodes i of each layer: a conv weight (out, in, h, w) is reshaped to
    (out, in*h*w), a linear weight (out, in) is kept; one-dimensional parameters (biases, norm
    scales) contribute 0, as in the reference code."""
    total = torch.zeros(())
    for a, b in zip(grads_real, grads_syn):
        if a.dim() == 1:
            continue
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        total = total + (1 - (a2 * b2).sum(-1) / (a2.norm(dim=-1) * b2.norm(dim=-1) + 1e-6)).sum()
    return total


def dc_loss(net: ConvNet, real: list[torch.Tensor], synthetic: list[torch.Tensor], seed: int | None,
            strategy: str = DSA_STRATEGY) -> torch.Tensor:
    """sum_c D(grad_theta CE(net(A(x^c)), c), grad_theta CE(net(A(s^c)), c)) (DC §3, gradient matching;
    with ``seed`` (one per class, shared by real and synthetic) it is DSA §3's matching with
    A(., omega); ``seed=None``: plain DC, no augmentation). Differentiable in the synthetic
    images (second order through the synthetic gradient)."""
    params = [p for p in net.parameters()]
    loss = torch.zeros(())
    for c, (x, s) in enumerate(zip(real, synthetic)):
        aug = (lambda t: dsa_augment(t, seed + c, strategy)) if seed is not None else (lambda t: t)
        y_real = torch.full((len(x),), c, dtype=torch.long)
        y_syn = torch.full((len(s),), c, dtype=torch.long)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(aug(x)), y_real), params)]
        g_syn = torch.autograd.grad(F.cross_entropy(net(aug(s)), y_syn), params, create_graph=True)
        loss = loss + gradient_distance(g_real, list(g_syn))
    return loss


def distill_dc(real: list[torch.Tensor], per_class: int, settings: DistillSettings, seed: int,
               augment: bool = True) -> DistillResult:
    """Gradient matching, DC (``augment=False``) or DSA (``augment=True``) (DC Algorithm 1 with one
    outer and one inner loop per network, the reference setting for 1 image per class): per
    iteration a fresh ConvNet; update the images on :func:`dc_loss`, then train the network
    ``net_steps`` SGD steps on the (augmented) synthetic set. deldist's rule: one network
    per iteration whatever ``per_class`` (the reference uses 10 / 50 outer loops for 10 / 50
    images per class), so that a run costs what a DM run of the same iterations costs."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    syn = [s.requires_grad_(True) for s in init_synthetic(real, per_class, gen)]
    opt = torch.optim.SGD(syn, lr=settings.image_lr, momentum=settings.momentum)
    c, size = real[0].shape[1], real[0].shape[2]
    labels = torch.arange(len(real)).repeat_interleave(per_class)
    losses = []
    for _ in range(settings.iterations):
        net = ConvNet(c, len(real), size, settings.width, settings.depth)
        aug_seed = int(torch.randint(0, 2**31 - 1, (), generator=gen)) if augment else None
        loss = dc_loss(net, _class_batches(real, settings.real_batch, gen), syn, aug_seed, settings.strategy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        net_opt = torch.optim.SGD(net.parameters(), lr=settings.net_lr, momentum=0.5)
        x_syn = torch.cat([s.detach() for s in syn])
        for _ in range(settings.net_steps):
            x = dsa_augment(x_syn, int(torch.randint(0, 2**31 - 1, (), generator=gen)), settings.strategy) \
                if augment else x_syn
            net_opt.zero_grad()
            F.cross_entropy(net(x), labels).backward()
            net_opt.step()
    return DistillResult(torch.cat([s.detach() for s in syn]), labels, losses)


# ------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class EvalSettings:
    """Training a fresh ConvNet on a (synthetic or real) set: the DM / DSA evaluation recipe, SGD
    lr 0.01, momentum 0.9, weight decay 5e-4, lr x 0.1 at half the epochs, DSA augmentation on
    every batch. deldist's rules: 300 epochs by default (the DM paper trains 1,000; the stage's
    config sets 100) to fit a 2-core machine, and the augmentation draws one transform per batch
    (Siamese mode) where the reference draws per image."""

    epochs: int = 300
    lr: float = 0.01
    batch_size: int = 256
    weight_decay: float = 5e-4
    width: int = 128
    depth: int = 3
    strategy: str = DSA_STRATEGY


def train_and_test(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   n_classes: int, settings: EvalSettings, seed: int) -> float:
    """Train a fresh ConvNet (seeded) on (train_x, train_y), return its accuracy on the real
    test set. train_x (N, C, S, S), train_y (N,), test_x (T, C, S, S), test_y (T,)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ConvNet(train_x.shape[1], n_classes, train_x.shape[2], settings.width, settings.depth)
    opt = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [settings.epochs // 2], 0.1)
    net.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), settings.batch_size):
            b = order[i:i + settings.batch_size]
            x = dsa_augment(train_x[b], int(torch.randint(0, 2**31 - 1, (), generator=gen)), settings.strategy)
            opt.zero_grad()
            F.cross_entropy(net(x), train_y[b]).backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(test_x[i:i + 256]).argmax(1) for i in range(0, len(test_x), 256)])
    return float((pred == test_y).float().mean())
