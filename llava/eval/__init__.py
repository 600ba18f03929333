"""The original LLaVA's evaluation, at its module paths and with its flags and files (the one place in `llava/`
that parses arguments, for that compatibility).

- Runners (`python -m llava.eval.model_vqa`, `model_vqa_loader`, `model_vqa_science`, `model_vqa_mmbench`): thin
  command lines over `vqa`, which answers through `llava.engine` (continuous batching, image-feature cache).
- Scorers (`eval_pope`, `eval_science_qa`, `eval_textvqa`, `eval_gqa`, `eval_mme`, `eval_mmbench`) and the
  repository's `scripts/convert_*`: thin command lines over the rules in `scoring`, `m4c_evaluator` (VQA answer
  normalisation and soft accuracy), `mmbench` (TSV, rotations, circular scoring) and `convert` (upload files).
- `files`: the one reader and writer of JSONL / JSON evaluation files.
"""
