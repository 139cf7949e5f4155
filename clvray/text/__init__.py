"""The text path: fine-tune an encoder on the customers' reviews, embed reviews, aggregate.

Stage functions (import them from their modules; this package imports nothing heavy, so
`import clvray.text` stays cheap and torch is loaded only where a model runs):

- `clvray.text.encoder`: `resolve_model_path`, `load_encoder`, `load_text_model`,
  `build_tiny_encoder`, `pick_device`, `pick_dtype`.
- `clvray.text.finetune`: `finetune_encoder` (Ray Train TorchTrainer, DDP, checkpoints, resume).
- `clvray.text.finetune_data`: `build_finetune_datasets` (the exact train/valid sets it reads).
- `clvray.text.embed`: `embed_reviews` (CPU tokenization tasks + `ReviewEncoder` actor pool).
- `clvray.text.features`: `build_text_features` (per-customer aggregates, train-only reduction).

Time rule: only reviews with `ts < cutoff` reach fine-tuning or the features.
"""
