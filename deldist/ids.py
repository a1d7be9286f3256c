"""Frame ids, made and parsed in one place: ``<source key>#<frame_index>``.

The source key is the path relative to the input root (``id_prefix`` first, e.g. ``v2/`` for
curate-new batches); images use frame index 0. The key may itself hold ``#`` (a file named
``a#b.mp4``): the frame index is what follows the *last* ``#``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SEPARATOR = "#"


def frame_id(key: str, frame_index: int) -> str:
    """The id of frame ``frame_index`` of the source at ``key``."""
    return f"{key}{SEPARATOR}{frame_index}"


def split_id(frame_id_: str) -> tuple[str, int]:
    """``<key>#<frame_index>`` -> (key, frame_index)."""
    key, index = frame_id_.rsplit(SEPARATOR, 1)
    return key, int(index)


def split_ids(ids: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """:func:`split_id` over an Arrow array -> (keys, frame_index int64; null where an id has
    no ``#<integer>`` suffix)."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    parts = pc.extract_regex(ids, r"^(?P<key>.*)#(?P<frame>-?[0-9]+)$")
    return pc.struct_field(parts, "key"), pc.cast(pc.struct_field(parts, "frame"), pa.int64())


def join_ids(keys: pa.Array, frame_index: pa.Array) -> pa.Array:
    """Vector form of :func:`frame_id`."""
    return pc.binary_join_element_wise(keys, pc.cast(frame_index, pa.string()), SEPARATOR)
