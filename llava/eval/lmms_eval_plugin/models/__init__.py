"""The models lmms-eval's LMMS_EVAL_PLUGINS mechanism reads: name -> class name in `models/<name>.py`.

Compatibility: lmms-eval 0.7.3's evaluator imports `filelock._api` (filelock 3.x); filelock 4 moved those classes
to `filelock._core`. lmms-eval imports this module before evaluating, so the old name is aliased here."""

import importlib
import sys

AVAILABLE_MODELS = {"llava_engine": "LlavaEngine"}

try:
    importlib.import_module("filelock._api")
except ImportError:
    try:
        sys.modules["filelock._api"] = importlib.import_module("filelock._core")
    except ImportError:
        pass
