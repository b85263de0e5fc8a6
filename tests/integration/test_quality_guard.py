"""A quality guard: a few minutes of real training on real data must reach a known level, so that a change
that still "runs" but learns worse (a broken loss, a wrong gradient, a lost table update, a shuffled
label) fails the suite. The full measurements are bench/quality.py's (docs/quality.md).

Amazon Beauty (the bundled S3-Rec release, 22,363 users, 12,101 items) converted by the real converter,
an fMRL-LRU of width 32 (sizes 8, 16, 32) over a learnable ID table and the item-attribute table, both
TorchRec tables with their fused optimizer, 2 epochs at batch 256, then full-ranking test metrics.

Measured while writing it (seeds 42 and 43, on the 2-core VM): test NDCG@10 at size 32 = 0.0185 and
0.0172, most-popular 0.0055. The floors below sit well under that and well over most-popular.
"""

from __future__ import annotations

import os

from data_pipeline.converters import convert_seqrec
from trainer.config import load_config
from trainer.train import train

BEAUTY = os.path.join(os.path.dirname(__file__), "..", "..", "real-data", "amazon-beauty")
NDCG_FLOOR = 0.011
POPULAR_FACTOR = 2.0


def test_a_short_run_on_amazon_beauty_clears_the_quality_floor(tmp_path) -> None:
    data = str(tmp_path / "beauty")
    convert_seqrec(
        data,
        os.path.join(BEAUTY, "Beauty.txt.gz"),
        attributes_path=os.path.join(BEAUTY, "Beauty_item2attributes.json.gz"),
        max_samples_per_shard=5000,
    )
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            "data.num_workers=0",
            "model.nested_sizes=[8,16,32]",
            "model.num_blocks=1",
            "model.dropout=0.3",
            "model.attn_dropout=0.3",
            "model.use_text_features=false",
            "model.use_image_features=false",
            "model.use_id_embedding=true",
            "model.use_attributes=true",
            "train.epochs=2",
            "train.batch_size=256",
            "optim.lr=2e-3",
            "optim.warmup_steps=20",
            "train.num_threads=2",
            "parallel.backend=ddp",
            "parallel.table_lr=0.1",
            f"run.out_dir={tmp_path}",
            "run.name=guard",
            "run.progress_bar=false",
            "run.loggers=[]",
            "run.export=false",
        ],
    )
    result = train(cfg)
    ndcg = {size: metrics["NDCG@10"] for size, metrics in result.test_metrics.items()}
    popular = result.baseline_metrics["NDCG@10"]
    assert 0.004 < popular < 0.007  # the data set itself is what it should be
    assert ndcg[32] >= NDCG_FLOOR, (ndcg, popular)
    assert ndcg[32] >= POPULAR_FACTOR * popular, (ndcg, popular)
    assert ndcg[32] > ndcg[8]  # the nested series: more width, better ranking
    losses = result.train_losses
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
