"""Two-stage LLaVA training (data, stage presets, cached vision features, DeepSpeed configs), the embedded default's
recipe (`python -m train.build_default`) and evaluation (`python -m train.evaluate`). Imports llava/, never serve/."""
