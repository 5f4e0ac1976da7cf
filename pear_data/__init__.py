"""pear-data: PEAR-weighted SFT datasets (arXiv 2602.01058) for a downstream RL stage."""

__version__ = "0.1.0"
