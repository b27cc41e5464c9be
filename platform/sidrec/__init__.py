"""sidrec: generative recommendation with Semantic IDs, distributed by Ray."""

__version__ = "0.1.0"
