"""deldist.nearcopy: the multi-index-hashing join against all pairs, the near-copy rule against
a brute-force greedy, and the pass on a near-duplicate set built from real images."""

from __future__ import annotations

import numpy as np
import pytest

from deldist import cluster, copyset, dedup, embed, nearcopy, storage
from deldist.frames import perceptual_hash


def weight32(n: int, seed: int, copies: int = 0, flips: int = 5) -> np.ndarray:
    """(n,) uint64 codes with 32 bits set, like pHashes; the last ``copies`` are copies of
    earlier ones with up to ``flips`` pairs of bits swapped (still 32 bits set)."""
    rng = np.random.default_rng(seed)
    bits = np.zeros((n, 64), bool)
    for i in range(n):
        bits[i, rng.choice(64, 32, replace=False)] = True
    for i in range(n - copies, n):
        bits[i] = bits[rng.integers(0, n - copies)]
        k = rng.integers(0, flips + 1)
        ones, zeros = np.flatnonzero(bits[i]), np.flatnonzero(~bits[i])
        bits[i, rng.choice(ones, k, replace=False)] = False
        bits[i, rng.choice(zeros, k, replace=False)] = True
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def all_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    d = nearcopy.hamming(hashes[:, None], hashes[None, :])
    i, j = np.nonzero(np.triu(d <= max_distance, 1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("max_distance", [0, 4, 6, 10])
def test_every_plan_finds_the_all_pairs_set_once(max_distance):
    hashes = weight32(400, seed=max_distance, copies=200)
    hashes[[50, 51, 52]] = hashes[7]  # identical hashes
    expected = all_pairs(hashes, max_distance)
    plans = [nearcopy.plan_join(len(hashes), max_distance)] + [
        nearcopy.JoinPlan(nearcopy._bands(b), r) for r in range(4) for b in (2, 3, 4, 6, 11) if b * (r + 1) > max_distance]
    for plan in plans:
        i, j, d = nearcopy.hamming_pairs(hashes, max_distance, plan)
        assert set(zip(i.tolist(), j.tolist())) == expected and len(i) == len(expected), plan
        np.testing.assert_array_equal(d, nearcopy.hamming(hashes[i], hashes[j]))
        # a task's share of the passes: the shares together give each pair once
        passes = plan.passes()
        parts = [nearcopy.hamming_pairs(hashes, max_distance, plan, passes[k::3]) for k in range(3)]
        assert sum(len(p[0]) for p in parts) == len(expected)


def test_chance_pairs_model_matches_random_codes():
    hashes = weight32(4000, seed=1)
    found = len(all_pairs(hashes, 18))
    expected = nearcopy.chance_pairs(4000, 18)
    assert 0.5 * expected < found < 1.5 * expected  # independent codes: the model's count


def brute_force_near_copies(hashes, candidate, preference, max_distance, fixed=None):
    n = len(hashes)
    fixed = np.zeros(n, bool) if fixed is None else fixed
    kept = np.zeros(n, bool)
    removed = np.zeros(n, bool)
    for x in np.argsort(preference, kind="stable"):
        if not candidate[x]:
            continue
        earlier = np.flatnonzero(kept)
        if not fixed[x] and len(earlier) and (nearcopy.hamming(hashes[earlier], hashes[x]) <= max_distance).any():
            removed[x] = True
        else:
            kept[x] = True
    return removed, kept


@pytest.mark.parametrize("seed", range(4))
def test_near_copy_rule_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    hashes = weight32(300, seed=seed, copies=200, flips=6)
    hashes[[10, 11]] = hashes[3]
    candidate = rng.random(300) < 0.85
    preference = rng.permutation(300)
    fixed = np.zeros(300, bool)
    if seed % 2:  # a corpus's retained frames: first in the order, kept whatever
        fixed[np.argsort(preference)[:20]] = True
        candidate |= fixed
    near, copy_of, distance = nearcopy.near_copies(hashes, candidate, preference, 10, fixed=fixed if seed % 2 else None)
    removed, kept = brute_force_near_copies(hashes, candidate, preference, 10, fixed)
    np.testing.assert_array_equal(near, removed)
    assert kept[copy_of[near]].all()  # every copy names a kept frame
    np.testing.assert_array_equal(distance[near], nearcopy.hamming(hashes[near], hashes[copy_of[near]]))
    assert (distance[near] <= 10).all() and not near[fixed].any()


def test_perceptual_hash_is_imagehash_phash():
    import imagehash
    from PIL import Image

    rgb = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    bits = imagehash.phash(Image.fromarray(rgb)).hash.reshape(-1)
    value = perceptual_hash(rgb)
    assert [(value >> (63 - k)) & 1 for k in range(64)] == bits.astype(int).tolist()
    assert bin(value).count("1") == 32  # the median split: always 32 bits set


@pytest.fixture(scope="module")
def copies_run(ray_session, tmp_path_factory):
    """The real-image near-duplicate set (scikit-image photographs and medical images, 10
    copies per group) embedded with a random-initialised ViT-Ti, clustered and scored."""
    out = tmp_path_factory.mktemp("copyset")
    table = copyset.write_set(out)
    root = str(out / "run")
    embed.run(embed.Config(input=str(out / "images"), output=root, model="vit_tiny_patch16_224", random_init=True,
                           pooling="mean", batch_size=32, encoder_cpus=1.0, torch_threads=2))
    cluster.run(cluster.Config(output=root, k=8, max_iter=20, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, task_cpus=0.5))
    return root, table


def test_near_copy_pass_on_real_image_copies(copies_run):
    """Acceptance: the near-copy pass at its default keeps every group and at most 10 % more
    frames than groups; with the dedup at a budget of one frame per group, >= 95 % of the groups
    keep a frame. The hash-only baseline at the same budget is recorded beside it."""
    root, table = copies_run
    figures = copyset.evaluate(root, table)
    print("COPYSET", figures)
    near, budget = figures["near_copy"], figures["budget"]
    assert near["groups"] == 45 and near["groups_lost"] == 0
    assert near["frames_kept"] <= 1.1 * near["groups"]
    assert budget["frames_kept"] <= round(1.005 * budget["groups"]) + 1
    assert budget["groups_kept"] >= 0.95 * budget["groups"]
    assert figures["hash_only"]["frames_kept"] <= near["groups"]
    for name in ("copies_near", "copies_budget"):
        removed = storage.read_published(storage.join(root, "selections", name, "removed"))
        kept = set(storage.read_published(storage.join(root, "selections", name, "retained")).column("id").to_pylist())
        assert set(removed.column("duplicate_of").drop_null().to_pylist()) <= kept  # nothing lost
