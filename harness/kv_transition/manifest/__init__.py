"""The manifest stage: examples → prompts → token-length bins → manifest.json + SQLite.

    prepare.py   the stage's entry (`prepare(cfg, paths)`): load the dataset, build, bin, select, write
    prompts.py   official prompt templates, chat template, exact middle truncation to the token limit
    tokens.py    the model's tokenizer (local dir, GGUF, Hub) and its fingerprint
    binning.py   token-length bins and the per-bin selection
    store.py     the manifest's format: seal (content hash), JSON, and its SQLite tables
"""
