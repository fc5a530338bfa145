"""Batch Q&A: a Ray Data job that answers files of questions and writes Parquet (python -m batch)."""
