"""One module per pipeline stage, in order: dataset, embeddings, quantizer, sids, instructions, base_model,
model, eval; `run` holds what they share (`run_stage`). Each exposes `build(store, cfg, force)`."""
