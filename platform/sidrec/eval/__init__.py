"""Offline evaluation: metrics, baselines (most-popular, SASRec), the evaluator and its report."""
