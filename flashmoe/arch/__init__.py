"""Architecture facts: ModelConfig (config.json keys), one Family record per model_type, canonical tensor
names and the presets of real models' shapes. Everything that differs between families lives here."""
