"""Near-duplicate clips: frame perceptual hashes plus caption-embedding similarity (seed §2.1).

Each clip carries the 64-bit perceptual hashes of three frames, at 1/4, 1/2 and 3/4 of its length
(`frame_hashes`, computed while the video is open, see `clip_frame_hashes`):

- pHash (default): grey frame shrunk to 32x32 (area), 2-D DCT, the 8x8 lowest frequencies,
  bit = coefficient > their median;
- dHash: grey frame shrunk to 9x8, bit = pixel brighter than its right neighbour.

Two clips are near-duplicates when either
  (a) their frame-hash distance (mean Hamming distance of the three aligned hashes, 0-64 bits) is
      at most `hash_max_distance`, or
  (b) their captions' MiniLM embeddings have cosine similarity >= `caption_min_similarity` and
      their frame-hash distance is at most `caption_hash_max_distance` (a caption alone is weak
      evidence: "a man walks down a street" describes many different clips; set it to 64 to let
      captions decide alone).
Pairs are joined into groups (union-find); each group keeps one clip, the longest (then the
first by clip_id), and the others record `duplicate_of` = that clip's id and the evidence in
`duplicate_reason`. Only clips that passed the filters take part.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from mugen.errors import MugenError

HASH_METHODS = ("phash", "dhash")
HASH_POSITIONS = (0.25, 0.5, 0.75)  # where in a clip the hashed frames lie
_BLOCK = 2048  # rows compared at once (memory ~ _BLOCK * N)


@dataclass
class DedupConfig:
    hash_max_distance: float = 6.0  # bits of 64 (mean over the three frames)
    caption_min_similarity: float = 0.95  # cosine of MiniLM caption embeddings
    caption_hash_max_distance: float = 20.0  # caption matches need frames at least this close
    use_captions: bool = True

    def __post_init__(self) -> None:
        for name in ("hash_max_distance", "caption_hash_max_distance"):
            if not 0 <= getattr(self, name) <= 64:
                raise MugenError(f"dedup {name}={getattr(self, name)} must lie in [0, 64] bits")
        if not -1 <= self.caption_min_similarity <= 1:
            raise MugenError(f"dedup caption_min_similarity={self.caption_min_similarity} must lie in [-1, 1]")


# ----------------------------------------------------------------------------------------------
# Perceptual hashes


def _grey(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 3:
        return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return frame


def phash(frame: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a grey (H, W) or RGB (H, W, 3) uint8 frame."""
    small = cv2.resize(_grey(frame), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]  # (8, 8) lowest frequencies
    bits = (low > np.median(low)).flatten()
    return _bits_to_int(bits)


def dhash(frame: np.ndarray) -> int:
    """64-bit difference hash: each of 8x8 pixels brighter than its right neighbour."""
    small = cv2.resize(_grey(frame), (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)  # (8, 9)
    return _bits_to_int((small[:, 1:] > small[:, :-1]).flatten())


def _bits_to_int(bits: np.ndarray) -> int:
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


HASHERS = {"phash": phash, "dhash": dhash}


def hash_to_hex(value: int) -> str:
    return f"{value:016x}"


def hamming(first: int, second: int) -> int:
    return (first ^ second).bit_count()


def hash_frame_indices(start_frame: int, end_frame: int) -> list[int]:
    """Frame numbers hashed for a clip [start_frame, end_frame): at `HASH_POSITIONS` of it."""
    length = end_frame - start_frame
    return [start_frame + min(length - 1, int(length * position)) for position in HASH_POSITIONS]


def clip_frame_hashes(path: str | os.PathLike, fps: float, start_frame: int, end_frame: int, method: str = "phash") -> list[str]:
    """Hex hashes of a clip's `hash_frame_indices`, decoding only those frames (small, grey)."""
    from mugen.data.curation.decode import read_frames

    if method not in HASHERS:
        raise MugenError(f"hash method {method!r} is unknown; use one of {HASH_METHODS}")
    indices = hash_frame_indices(start_frame, end_frame)
    frames = read_frames(path, fps, indices, size=(64, 64), pixel_format="gray")
    return [hash_to_hex(HASHERS[method](frames[index])) for index in indices if index in frames]


# ----------------------------------------------------------------------------------------------
# Grouping


def _hash_matrix(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) uint64 hashes and (N,) whether each row has all three (others never match by hash)."""
    matrix = np.zeros((len(rows), len(HASH_POSITIONS)), dtype=np.uint64)
    valid = np.zeros(len(rows), dtype=bool)
    for index, row in enumerate(rows):
        hashes = row.get("frame_hashes") or []
        if len(hashes) == len(HASH_POSITIONS):
            matrix[index] = [int(value, 16) for value in hashes]
            valid[index] = True
    return matrix, valid


def hash_distances(matrix: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Mean Hamming distance (bits) between rows [start, stop) and all rows: (stop - start, N)."""
    xor = matrix[start:stop, None, :] ^ matrix[None, :, :]  # (b, N, 3)
    return np.bitwise_count(xor).mean(axis=-1)


class _UnionFind:
    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, first: int, second: int) -> None:
        a, b = self.find(first), self.find(second)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def find_duplicates(rows: list[dict], config: DedupConfig, caption_embeddings: np.ndarray | None = None) -> dict[int, tuple[int, str]]:
    """{index of a duplicate: (index of the clip kept for it, reason)} over `rows`.

    `caption_embeddings` (N, D), L2-normalised, one per row (zeros for uncaptioned rows), enables
    rule (b)."""
    count = len(rows)
    if count < 2:
        return {}
    matrix, valid = _hash_matrix(rows)
    captioned = np.array([bool(row.get("caption")) for row in rows])
    use_captions = config.use_captions and caption_embeddings is not None
    groups = _UnionFind(count)
    evidence: dict[int, str] = {}  # index -> how it was first matched ("frame_hash" wins)
    for start in range(0, count, _BLOCK):
        stop = min(count, start + _BLOCK)
        distance = hash_distances(matrix, start, stop)  # (b, N)
        both_valid = valid[start:stop, None] & valid[None, :]
        by_hash = both_valid & (distance <= config.hash_max_distance)
        by_caption = np.zeros_like(by_hash)
        if use_captions:
            similarity = caption_embeddings[start:stop] @ caption_embeddings.T  # (b, N)
            close_frames = ~both_valid | (distance <= config.caption_hash_max_distance)
            by_caption = captioned[start:stop, None] & captioned[None, :] & (similarity >= config.caption_min_similarity) & close_frames
        for local, other in zip(*np.nonzero(by_hash | by_caption)):
            first = start + int(local)
            if int(other) <= first:
                continue
            groups.union(first, int(other))
            reason = "frame_hash" if by_hash[local, other] else "caption"
            for index in (first, int(other)):
                if evidence.get(index) != "frame_hash":
                    evidence[index] = reason
    members: dict[int, list[int]] = {}
    for index in range(count):
        members.setdefault(groups.find(index), []).append(index)
    duplicates: dict[int, tuple[int, str]] = {}
    for group in members.values():
        if len(group) < 2:
            continue
        keeper = min(group, key=lambda i: (-int(rows[i].get("num_frames") or 0), str(rows[i].get("clip_id"))))
        for index in group:
            if index != keeper:
                duplicates[index] = (keeper, evidence.get(index, "frame_hash"))
    return duplicates


def mark_duplicates(rows: list[dict], config: DedupConfig, embed=None) -> int:
    """Fill `duplicate_of` / `duplicate_reason` in place over the clips that passed the filters;
    `embed` (texts -> (N, D) normalised) is the caption embedder. Returns the number of duplicates."""
    for row in rows:
        row["duplicate_of"] = None
        row["duplicate_reason"] = None
    candidates = [row for row in rows if row.get("passed_filters", True)]
    embeddings = None
    if config.use_captions and embed is not None and any(row.get("caption") for row in candidates):
        embeddings = np.asarray(embed([row.get("caption") or "" for row in candidates]), dtype=np.float32)
        embeddings[[not row.get("caption") for row in candidates]] = 0.0
    duplicates = find_duplicates(candidates, config, embeddings)
    for index, (keeper, reason) in duplicates.items():
        candidates[index]["duplicate_of"] = candidates[keeper]["clip_id"]
        candidates[index]["duplicate_reason"] = reason
    return len(duplicates)
