"""What a careful user of plain transformers runs: the Trainer (hf_trainer) and `generate` (hf_generate)."""
