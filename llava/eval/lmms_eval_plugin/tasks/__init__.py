"""Tasks lmms-eval finds through LMMS_EVAL_PLUGINS (this folder is added to its task search path)."""
