"""Dynamic-LLaVA in other tools: `integrations.lmms_eval` is the lmms-eval model (`lmms-eval --model dynamic_llava`,
registered through the `lmms_eval.models` entry point) and the local synthetic lmms-eval task. Needs the `eval` extra
and lmms-eval (docs/integrations.md)."""
