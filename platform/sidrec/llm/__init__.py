"""The SID-extended causal LM: base model + tokenizer, instruction rows, SFT encoding, the Ray Train worker."""
