"""Model lifecycle: the manager, loaded models and leases, model files, GGUF metadata, LoRAs, presets, load options."""
