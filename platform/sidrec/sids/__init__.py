"""Item Semantic IDs: the SID token grammar, text embedding, quantizers, collision handling, report, trie index."""
