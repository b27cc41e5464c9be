"""Constrained beam search over SIDs (`beam`) and its Hugging Face `generate` reference (`hf_reference`)."""
