"""nt_dist: distributed training of nasty teachers (Ma et al., ICLR 2021) on accelerate."""

__version__ = "0.1.0"
