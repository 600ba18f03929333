"""The original LLaVA's evaluation runners, at its module paths and with its flags and files, answering through
`llava.engine` (continuous batching, image-feature cache).

`python -m llava.eval.model_vqa`, `llava.eval.model_vqa_loader` and `llava.eval.model_vqa_science` are thin
command lines over `llava.eval.vqa` (the one place in `llava/` that parses arguments, for that compatibility).
"""
