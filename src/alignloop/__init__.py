"""alignloop: online iterative alignment of language models (sample, label, feedback, train, repeat)."""

__version__ = "0.1.0"
