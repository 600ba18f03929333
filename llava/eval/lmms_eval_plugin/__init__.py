"""lmms-eval plugin: this repository's models as an lmms-eval model, and a local easy-VQA task (no hub).

    LMMS_EVAL_PLUGINS=llava.eval.lmms_eval_plugin python -m lmms_eval eval --model llava_engine \
        --model_args pretrained=default --tasks easyvqa_local,easyvqa_local_yesno --batch_size 16

lmms-eval imports `<plugin>.models` (its `AVAILABLE_MODELS`: name -> class in `<plugin>.models.<name>`) and adds
`<plugin>/tasks` to its task search path. `manifests()` gives the same model for lmms-eval's entry-point group
`lmms_eval.models` (pyproject's `[project.entry-points."lmms_eval.models"]`, active once the package is installed).
Needs the `eval` extra (`pip install -e .[eval]`); nothing else in `llava` imports this package.
"""


def manifests():
    """lmms-eval's entry-point payload: the model manifest of `llava_engine`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="llava_engine",
                          simple_class_path="llava.eval.lmms_eval_plugin.models.llava_engine.LlavaEngine")]
