"""Input pipelines: TFDS data sets, including the offline default (digits), and text files."""

import os

# TensorFlow runs only the host-side input pipelines here; its oneDNN notice (printed at
# import, whatever TF_CPP_MIN_LOG_LEVEL says) is noise on every run. A user's setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
