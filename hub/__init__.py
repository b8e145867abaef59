"""Hub folders: loading (`loading`: the model resolver, `load_local`, `load_processor`, `load_for_eval`), writing
(`folder`: shards, remote-code files, `auto_map`), `export`, `convert` (original checkpoints) and `model_card`.

The modules are imported where they are used (`from dynamic_llava.hub.export import export_model`); this file
imports none of them, so that loading one does not load the others.
"""
