"""pefteval-harness: FFT vs PEFT vs merged models, scored by lm-evaluation-harness, scheduled by Ray."""

__version__ = "0.2.0.dev0"
