"""qlora-tune: the driver side - CLI, search, tracking, promotion, serving."""

__version__ = "0.1.0"
