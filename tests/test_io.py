"""Source listing: prefixes, manifests with dataset/center labels, non-media files."""

from __future__ import annotations

import pytest

from deldist.io import list_sources


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_prefix_listing_labels_by_first_component(tmp_path):
    for rel in ["center_a/v1.MP4", "center_a/sub/v2.mkv", "center_b/img.png", "loose.jpg", "readme.txt",
                ".hidden.mp4"]:
        _touch(tmp_path / rel)
    sources, skipped = list_sources(str(tmp_path))
    assert [(s.key, s.dataset, s.kind) for s in sources] == [
        ("center_a/sub/v2.mkv", "center_a", "video"),
        ("center_a/v1.MP4", "center_a", "video"),
        ("center_b/img.png", "center_b", "image"),
        ("loose.jpg", tmp_path.name, "image"),
    ]
    assert skipped == [str(tmp_path / "readme.txt")]
    with pytest.raises(FileNotFoundError):
        list_sources(str(tmp_path / "missing"))


def test_manifest_csv_with_centers(tmp_path):
    for rel in ["data/x/a.mp4", "data/y/b.jpg"]:
        _touch(tmp_path / rel)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"uri,center\ndata/x/a.mp4,hospital_1\n{tmp_path}/data/y/b.jpg,hospital_2\n"
                        "data/x/a.mp4,hospital_1\n")
    sources, _ = list_sources(str(tmp_path / "data"), manifest=str(manifest))
    assert [(s.key, s.dataset, s.uri) for s in sources] == [
        ("x/a.mp4", "hospital_1", str(tmp_path / "data/x/a.mp4")),
        ("y/b.jpg", "hospital_2", str(tmp_path / "data/y/b.jpg")),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.mp4\n")
    with pytest.raises(ValueError, match="uri"):
        list_sources(str(tmp_path), manifest=str(bad))
