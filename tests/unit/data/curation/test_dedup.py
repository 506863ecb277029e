"""Near-duplicate detection (seed §2.1): perceptual hashes and grouping."""

import cv2
import numpy as np
import pytest

from _c2_videos import texture, write_scrolling_video
from mugen.data.curation.dedup import (
    DedupConfig,
    clip_frame_hashes,
    dhash,
    find_duplicates,
    hamming,
    hash_to_hex,
    mark_duplicates,
    phash,
)
from mugen.errors import MugenError


def _distance(first: int, second: int) -> int:
    return hamming(first, second)


@pytest.mark.parametrize("hasher", [phash, dhash])
def test_hashes_match_near_copies_and_separate_different_images(hasher):
    image = texture(1, 96, 128)
    other = texture(2, 96, 128)
    resized = cv2.resize(cv2.resize(image, (64, 48), interpolation=cv2.INTER_AREA), (128, 96))
    noisy = np.clip(image.astype(np.int16) + np.random.default_rng(0).integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    assert _distance(hasher(image), hasher(image)) == 0
    assert _distance(hasher(image), hasher(resized)) <= 8
    assert _distance(hasher(image), hasher(noisy)) <= 8
    assert _distance(hasher(image), hasher(other)) >= 16
    assert 0 <= hasher(image) < 2**64


def test_hamming_and_hex():
    assert hamming(0b1011, 0b0001) == 2
    assert hash_to_hex(255) == "00000000000000ff"
    assert int(hash_to_hex(2**64 - 1), 16) == 2**64 - 1


def _row(clip_id, hashes, num_frames=50, caption="", passed=True):
    return {"clip_id": clip_id, "frame_hashes": [hash_to_hex(h) for h in hashes], "num_frames": num_frames, "caption": caption, "passed_filters": passed}


def test_groups_keep_the_longest_clip_and_point_others_at_it():
    base = [0x0F0F0F0F0F0F0F0F, 0x00FF00FF00FF00FF, 0x123456789ABCDEF0]
    near = [base[0] ^ 0b111, base[1] ^ 0b1, base[2]]  # mean distance (3 + 1 + 0) / 3
    far = [~h & (2**64 - 1) for h in base]
    rows = [_row("a", base, 40), _row("b", near, 80), _row("c", far, 50), _row("d", base, 40, passed=False)]
    duplicates = mark_duplicates(rows, DedupConfig(hash_max_distance=2.0, use_captions=False))
    assert duplicates == 1
    assert rows[0]["duplicate_of"] == "b" and rows[0]["duplicate_reason"] == "frame_hash"
    assert rows[1]["duplicate_of"] is None and rows[2]["duplicate_of"] is None
    assert rows[3]["duplicate_of"] is None  # clips that failed the filters take no part
    # a tighter threshold separates them
    assert mark_duplicates(rows, DedupConfig(hash_max_distance=1.0, use_captions=False)) == 0


def test_transitive_groups_have_one_keeper():
    h = 0
    chain = [_row(f"c{i}", [h ^ ((1 << (4 * i)) - 1)] * 3, 10 + i) for i in range(4)]  # each 4 bits from the next
    found = find_duplicates(chain, DedupConfig(hash_max_distance=4.0, use_captions=False))
    assert sorted(found) == [0, 1, 2]
    assert {keeper for keeper, _ in found.values()} == {3}


def test_caption_similarity_needs_close_frames():
    hashes_a = [0] * 3
    hashes_b = [(1 << 12) - 1] * 3  # 12 bits away: not a frame duplicate at 6, close for captions at 20
    hashes_c = [2**64 - 1] * 3  # 64 bits away
    rows = [_row("a", hashes_a, caption="x"), _row("b", hashes_b, caption="x"), _row("c", hashes_c, caption="x")]
    same = np.ones((3, 4), dtype=np.float32) / 2.0  # identical unit embeddings: cosine 1
    found = find_duplicates(rows, DedupConfig(), caption_embeddings=same)
    assert found == {1: (0, "caption")}
    different = np.eye(3, 4, dtype=np.float32)
    assert find_duplicates(rows, DedupConfig(), caption_embeddings=different) == {}


def test_clip_frame_hashes_find_a_reencoded_copy(tmp_path):
    original = write_scrolling_video(tmp_path / "a.mp4", seed=3, num_frames=30, size=(160, 96))
    copy = write_scrolling_video(tmp_path / "b.mp4", seed=3, num_frames=30, size=(160, 96))
    unrelated = write_scrolling_video(tmp_path / "c.mp4", seed=4, num_frames=30, size=(160, 96))
    rows = []
    for name, path in (("a", original), ("b", copy), ("c", unrelated)):
        rows.append(_row(name, [], 30))
        rows[-1]["frame_hashes"] = clip_frame_hashes(path, 25.0, 0, 30)
    assert all(len(row["frame_hashes"]) == 3 for row in rows)
    found = find_duplicates(rows, DedupConfig(use_captions=False))
    assert set(found) == {1} and found[1][0] == 0


def test_bad_thresholds_are_user_errors():
    with pytest.raises(MugenError, match="hash_max_distance"):
        DedupConfig(hash_max_distance=70)
    with pytest.raises(MugenError, match="unknown"):
        clip_frame_hashes("x.mp4", 25.0, 0, 10, method="ahash")
