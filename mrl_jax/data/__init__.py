"""Input pipelines: TFDS data sets, including the offline default (digits)."""
