"""switchd: the model-switching front door of a GPU host."""

__version__ = "0.1.0"
