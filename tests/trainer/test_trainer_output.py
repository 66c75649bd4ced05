"""What ``mnist-train`` shows (issue 14): its own progress, not TensorFlow's C++ log lines
(``E0000 … node_def_util.cc:682] NodeDef mentions attribute …``, ``I0000 … loader.cc:236] …``),
while native errors stay visible; and ``--help`` claims no training time it did not measure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT

ABSL_LINE = re.compile(r"^[EWIF]\d{4} ")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def test_train_shows_its_progress_and_no_native_tensorflow_line(
    synthetic_data_dir: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "digitserve.trainer", "train", "--data-dir", str(synthetic_data_dir),
         "--model-repo", str(tmp_path), "--model-name", "quiet", "--preset", "seed", "--epochs", "1",
         "--batch-size", "16", "--no-report"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert not [line for line in lines if ABSL_LINE.match(line)], done.stderr
    assert "NodeDef" not in done.stderr and "absl::InitializeLog" not in done.stderr, done.stderr
    assert "Assets written to" not in done.stderr, done.stderr  # TensorFlow's Python INFO records
    ours = [STAMP.sub("", line) for line in lines]
    assert "INFO digitserve.trainer.train: training preset seed for 1 epoch(s) of 29 batches of 16, seed 42" \
        in ours, done.stderr
    trained = re.compile(r"INFO digitserve\.trainer\.train: trained in \d+\.\ds")
    assert any(trained.fullmatch(line) for line in ours), done.stderr
    assert f"INFO digitserve.repository: published model quiet version 1 at {tmp_path}/quiet/1" in ours
    assert done.stdout.splitlines()[-1] == f"published quiet version 1: {tmp_path}/quiet/1"


def test_native_errors_stay_visible_in_the_trainer_s_format() -> None:
    # The bridge mnist-train puts on its stderr: native ERROR and FATAL lines become its records
    # (the last line of a process that dies included), INFO and TensorFlow's harmless ERROR are
    # dropped, anything else passes as it is.
    script = (
        "import logging, os\n"
        "from digitserve.nativelog import bridge_native_stderr\n"
        "from digitserve.trainer.cli import LOG_FORMAT\n"
        "bridge_native_stderr(logging.ERROR, text_format=LOG_FORMAT)\n"
        "os.write(2, b'I0000 00:00:1795931393.568074   31912 loader.cc:236] Restoring SavedModel "
        "bundle.\\n')\n"
        "os.write(2, b'E0000 00:00:1795931388.679263   31912 node_def_util.cc:682] NodeDef mentions "
        "attribute use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset> This "
        "may be expected if your graph generating binary is newer  than this binary. Unknown attributes "
        "will be ignored. NodeDef: {{node ParallelMapDatasetV2/_15}}\\n')\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written "
        "to STDERR\\n')\n"
        "os.write(2, b'E0000 00:00:1.5 7 cuda_dnn.cc:9] could not create cudnn handle\\n')\n"
        "os.write(2, b'a line of its own\\n')\n"
        "os.write(2, b'F0000 00:00:1.5 7 check.cc:9] Check failed: x\\n')\n"
        "os._exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3
    assert [STAMP.sub("", line) for line in done.stderr.splitlines()] == [
        "ERROR native: could not create cudnn handle [cuda_dnn.cc:9]",
        "a line of its own",
        "CRITICAL native: Check failed: x [check.cc:9]",
    ], done.stderr


def test_help_claims_no_training_time() -> None:
    done = subprocess.run([sys.executable, "-m", "digitserve.trainer", "train", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    line = ("  default  a small two-convolution network (16 and 48 filters) with batch normalisation, "
            "dropout and light shift augmentation, Adam with cosine decay, 4 epochs, 90/10 split\n")
    assert line in done.stdout
    assert "minute" not in done.stdout
