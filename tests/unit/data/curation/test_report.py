"""The curation report: funnel, one histogram per score, reasons, captions, tags."""

import cv2
import numpy as np

from mugen.data.curation.filters import FilterConfig
from mugen.data.curation.pipeline import stage_counts
from mugen.data.curation.report import REPORT_ASSETS, write_report


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for index in range(12):
        passed = index % 3 != 0
        rows.append({
            "clip_id": f"v{index // 4}-{index:04d}", "video_id": f"v{index // 4}", "passed_filters": passed,
            "filter_reasons": [] if passed else ["motion<1"], "score_sharpness": float(rng.uniform(100, 900)),
            "score_motion": float(rng.uniform(0, 5)), "score_motion_backend": "dis", "score_aesthetic": None,
            "score_aesthetic_unavailable": "no aesthetic_clip_dir / aesthetic_mlp_weights given",
            "caption": "a dog" if passed else "", "duplicate_of": "v0-0001" if index == 2 else None, "duplicate_reason": "frame_hash" if index == 2 else None,
            "tag_subjects": ["dog"] if passed else [], "tag_actions": [], "tag_scenes": [], "keep": passed and index != 2,
            "sample_weight": 1.0 if passed and index != 2 else 0.0,
        })
    return rows


def test_report_has_funnel_histograms_reasons_and_tags(tmp_path):
    rows = _rows()
    rejections = [{"video_id": "x", "source_path": "/data/broken.mp4", "stage": "probe", "reason": "truncated", "message": "cut <short> & gone"}]
    counts = stage_counts(rows, rejections, videos=4)
    assert counts["clips split"] == 12 and counts["clips passing filters"] == 8 and counts["clips kept"] == 7
    assert counts["videos"] == 4 and counts["videos readable"] == 3 and counts["videos with clips"] == 3
    path = write_report(tmp_path, rows, rejections, counts, caption_counts={"sidecar": 8, "uncaptioned": 0},
                        notes=["4 clips are uncaptioned"], filter_config=FilterConfig())
    html = path.read_text()
    for name, value in counts.items():
        assert f"<td>{name}</td><td>{value}</td>" in html
    assert "<td>motion&lt;1</td><td>4</td>" in html  # drop reasons counted
    assert "<td>duplicate (frame_hash)</td><td>1</td>" in html
    assert "cut &lt;short&gt; &amp; gone" in html  # messages escaped
    assert "<td>dog</td><td>7</td>" in html  # ontology over kept clips
    assert "4 clips are uncaptioned" in html and "aesthetic score unavailable for 12 clips" in html
    images = sorted(p.name for p in (tmp_path / REPORT_ASSETS).glob("*.png"))
    assert images == ["funnel.png", "hist_motion.png", "hist_sharpness.png"]  # numeric scores only
    for name in images:
        assert f"{REPORT_ASSETS}/{name}" in html
        picture = cv2.imread(str(tmp_path / REPORT_ASSETS / name))
        assert picture is not None and picture.shape[0] > 50 and picture.std() > 0
    assert not list(tmp_path.rglob(".*.tmp*"))  # atomic writes leave no temporaries
