"""The model: memory tiers, building, tokenizers, memory-state export."""
