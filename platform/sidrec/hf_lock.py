"""One process-wide lock for building Hugging Face models.

transformers 5 builds a model inside context managers (``init.no_tie_weights``, ``init.no_init_weights``)
that replace methods on ``PreTrainedModel`` itself and put them back on exit. Two threads doing this at
once restore each other's no-op: ``tie_weights`` then stays disabled for the rest of the process, and every
later tied model (the preset, SmolLM2) loads with a random or meta ``lm_head`` (tests/test_hf_lock.py).
A Serve replica loads a new model version in a worker thread while a catalog write may load the text
encoder in another, so every model construction in sidrec holds this lock.
"""

from __future__ import annotations

import threading

MODEL_BUILD_LOCK = threading.RLock()

