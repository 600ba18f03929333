"""LLaVA core: model assembly from parts, templates and the one prompt renderer, image processing,
checkpoint loading/conversion and the generation engine. No HTTP, no Gradio, no argparse here."""

__version__ = "0.1.0"
