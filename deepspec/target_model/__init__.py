"""The frozen target model: file resolution (HF dir, GGUF, hub id), loading and hidden-state capture."""
