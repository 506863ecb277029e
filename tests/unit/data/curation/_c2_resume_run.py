"""A curation run in its own process, for the kill-and-resume test.

usage: python _c2_resume_run.py INPUT OUTPUT CALL_LOG [HANG_ON_FILE_NAME]

Every call of the probe stage appends the video's file name to CALL_LOG (flushed to disk before
the stage runs); the video named HANG_ON blocks forever, so the test can SIGKILL the run at a
known point: after every earlier video finished and while this one is in flight.
"""

import os
import sys
import time
from pathlib import Path

from mugen.data.curation import pipeline

sys.path.insert(0, str(Path(__file__).parent))
from _c2_pipeline_config import lenient_config  # noqa: E402

input_dir, output_dir, call_log = sys.argv[1:4]
hang_on = sys.argv[4] if len(sys.argv) > 4 else None
original_probe = pipeline.probe_video


def logged_probe(path):
    with open(call_log, "a") as handle:
        handle.write(Path(path).name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    if Path(path).name == hang_on:
        while True:
            time.sleep(1)
    return original_probe(path)


pipeline.probe_video = logged_probe
pipeline.run_curation(input_dir, output_dir, lenient_config(), stages=("probe", "split", "filter", "dedup"), write_report_files=False)
