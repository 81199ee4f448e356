"""CUDA-graph scoring pads batches into a few shapes; on the CPU the same padding runs eagerly, and
must change no real row's scores (the GPU replays exactly these padded batches)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trainables.approaches import batched_log_scores
from trainables.config import RunConfig
from trainables.data import load_dataset
from trainables.graphs import GraphedScorer, bucket_length, bucket_rows
from trainables.loop import Trainer
from trainables.predict import unmasked_pass, warm

CPU = torch.device("cpu")


def test_buckets_are_few_and_waste_at_most_half():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert [bucket_length(n) for n in (1, 16, 17, 33, 49, 65, 97, 129, 200)] == [16, 16, 32, 48, 64, 96, 128, 192, 256]
    assert len({bucket_length(n) for n in range(1, 513)}) == 10
    assert all(bucket_length(n) >= n and (n <= 16 or bucket_length(n) <= 1.5 * n + 16) for n in range(1, 2049))


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_bucketed_padding_changes_no_score(tiny_csv, approach):
    # a trailing space in the template: the labels' first tokens differ, so generation scores one position
    cfg = RunConfig.model_validate(tiny_config(tiny_csv, approach=approach, quantization="none",
                                               **{"generation.prompt_template": "{text} => "}))
    tr = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    model, ap = tr.model.eval(), tr.approach
    assert ap.static_scoring
    texts = [("great awful " * k)[: 9 * k + 2] for k in range(1, 12)]  # 11 texts, 11 lengths
    ex = ap.encode(texts)
    eager = batched_log_scores(model, ap, ex, 8, CPU, False)
    assert eager.std(0).max() > 1e-3, "scores must differ between texts for the comparison to mean anything"
    scorer = GraphedScorer(unmasked_pass(model, ap), ap.tok.pad_token_id, max_rows=4, dev=CPU, capture=False)
    padded = batched_log_scores(model, ap, ex, 8, CPU, False, scorer)
    assert (padded - eager).abs().max() < 1e-5
    # batches of 8 split into 4 + 4, the last 3 rows padded to 4; lengths padded up to their buckets
    assert {rows for rows, _ in scorer.graphs} == {4}
    assert all(length in (16, 32, 48, 64, 96, 128) for _, length in scorer.graphs)
    # a server's warm-up builds every shape up to the rows and the longest input, eagerly usable
    scorer.graphs.clear()
    longest = max(len(e.input_ids) for e in ap.encode(["great " * 200]))
    n = warm(scorer, ap)
    lengths = {bucket_length(k) for k in range(1, longest + 1)}
    assert set(scorer.graphs) == {(r, n) for r in (1, 2, 4) for n in lengths} and n == 3 * len(lengths)
    assert (batched_log_scores(model, ap, ex, 8, CPU, False, scorer) - eager).abs().max() < 1e-5
