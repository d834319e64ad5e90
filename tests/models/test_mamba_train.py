"""`twobp train --model mamba`: the byte corpus through a 2-rank gloo pipeline, split and not."""

import pytest

from twobp.train import JobConfig, Variant, batch_source, losses_agree, run_job


def test_mamba_trains_on_the_byte_corpus():
    from twobp import models
    from twobp.data import ByteCorpus

    model = models.build("mamba", "tiny", device="meta")
    assert isinstance(batch_source("mamba", model), ByteCorpus)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mamba_pipeline_with_and_without_2bp_agrees():
    cfg = JobConfig(model="mamba", preset="tiny", stages=2, microbatches=4, batch_size=4, steps=3, warmup=1,
                    variants=(Variant("1f1b", False), Variant("1f1b", True), Variant("auto", True)),
                    timeout=120.0, quiet=True, out=None)
    results = run_job(cfg)
    assert len(results) == 3
    agreement = losses_agree(results)
    assert agreement.ok and agreement.gap <= 1e-4, agreement.text
    assert results[0].losses[-1] < results[0].losses[0], "the loss did not go down"
    assert all(r.store_empty for r in results)
    assert max(results[1].peak_bytes) > 0 and max(results[0].peak_bytes) == 0
