"""The comparisons against KerasCV's full-size models (its guides, generate_image parity)
hold KerasCV's and keras-sd's SD 1.x models and train through them: more than the CI
machine's 24 GB in one process. They run when KERAS_SD_KERAS_CV_FULL=1 is set."""

import os

collect_ignore = []
if os.environ.get("KERAS_SD_KERAS_CV_FULL") != "1":
    collect_ignore = [
        "test_keras_cv_guides.py",
        "test_keras_cv_parity.py",
        "test_keras_cv_textual_inversion.py",
    ]
