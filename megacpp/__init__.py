"""megacpp: declarative parallelism planner and launcher for Megatron-Core hybrid models."""

__version__ = "0.1.0"
