"""The text stages of a run: fine-tune, embed (pretrained and fine-tuned), per-customer features.

Each stage writes under `<run_dir>/text/` and is skipped on re-run like every other stage.
The pretrained encoder's features feed the `gbm_text_pretrained` variant of the ablation, the
fine-tuned encoder's the `gbm_text_finetuned` one.
"""

from __future__ import annotations

import pandas as pd

from clvray.io import read_parquet, write_parquet
from clvray.storage import join
from clvray.text.embed import embed_reviews
from clvray.text.features import build_text_features
from clvray.text.finetune import finetune_encoder

TEXT_PRETRAINED = "gbm_text_pretrained"
TEXT_FINETUNED = "gbm_text_finetuned"


def run_text_stages(run, customers, cutoff: pd.Timestamp) -> dict[str, str]:
    """Returns `{variant: URI of its per-customer text features}`."""
    cfg, storage, run_dir = run.cfg, run.storage, run.run_dir
    reviews = read_parquet(join(run_dir, "ingest", "reviews"), storage)
    encoders = {TEXT_PRETRAINED: cfg.text.model}
    if cfg.text.finetune.enabled:
        stage = "text/finetune"
        if run.done(stage):
            run.skipped.append(stage)
        else:
            with run.timed(stage):
                model_uri = finetune_encoder(
                    reviews,
                    customers,
                    cfg.text,
                    cutoff,
                    join(run_dir, "text", "finetune"),
                    storage,
                    # Train V2 resumes a run found under the same name: one name per run dir.
                    name=f"encoder-{run.fingerprint}",
                )
            run.mark(stage, {"model_uri": model_uri})
        encoders[TEXT_FINETUNED] = run.info(stage)["model_uri"]

    out = {}
    for variant, model in encoders.items():
        base = join(run_dir, "text", variant)
        embeddings_uri = join(base, "embeddings")
        stage = f"text/{variant}/embed"
        if run.done(stage):
            run.skipped.append(stage)
        else:
            with run.timed(stage):
                write_parquet(
                    embed_reviews(reviews, model, cfg.text, cutoff=cutoff, storage=storage),
                    embeddings_uri,
                    storage,
                )
            run.mark(stage)
        features_uri = join(base, "features", "customers")
        stage = f"text/{variant}/features"
        if run.done(stage):
            run.skipped.append(stage)
        else:
            with run.timed(stage):
                text_features = build_text_features(
                    read_parquet(embeddings_uri, storage),
                    customers,
                    cutoff,
                    cfg.text,
                    storage,
                    join(base, "features"),
                )
                write_parquet(text_features, features_uri, storage)
            run.mark(stage)
        out[variant] = features_uri
    return out
