"""CUDA-graph scoring pads batches into a few shapes; on the CPU the same padding runs eagerly, and
must change no real row's scores (the GPU replays exactly these padded batches)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trainables.approaches import batched_log_scores
from trainables.approaches.base import IGNORE
from trainables.config import RunConfig
from trainables.data import load_dataset
from trainables.graphs import GraphedScorer, bucket_length, bucket_rows
from trainables.loop import Trainer
from trainables.predict import unmasked_pass, warm
from tests.faults import capture_eagerly

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


def _varied_csv(path) -> str:
    """Texts of many lengths (several length buckets), labelled by their last word."""
    rows = ["text,label"] + [f'"{"so very " * (i % 9)}item {i} was {w}",{y}'
                             for i in range(40) for w, y in [(("great", "pos"), ("awful", "neg"))[i % 2]]]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("approach,own", [("head", True), ("generation", True), ("head", False)])
def test_graphed_training_steps_train_as_the_plain_loop(tmp_path, approach, own, monkeypatch):
    """training.cuda_graphs pads every batch to batch_size rows and a length bucket and steps through
    StepGraphs: the run's first steps and each bucket's first are eager warm-up steps that train, the
    bucket's next batch is captured and replayed; the last, shorter batch gets filler rows without
    loss; a batch whose bucket is not worth a graph (``own`` False: none is) is padded up to the
    longest. With captures that record and replays that run the step, the losses and the trained
    adapter must be those of the plain loop: no step lost to a warm-up or a capture, none taken twice."""
    import trainables.step_graphs as SG

    monkeypatch.setattr(SG, "capture_graph", capture_eagerly)
    asked = []
    monkeypatch.setattr(SG, "worth_own_graph", lambda *a: asked.append(a) or own)
    data = _varied_csv(tmp_path / "varied.csv")
    runs = {}
    for graphs in (False, True):
        cfg = RunConfig.model_validate(tiny_config(data, approach=approach, quantization="none", **{
            "training.cuda_graphs": graphs, "training.batch_size": 6, "training.epochs": 2,
            "training.max_grad_norm": 0.5, "data.split": {"eval": 0.2, "test": 0.0, "seed": 0}}))
        tr = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
        assert tr.graphs is graphs and len(tr.train_examples) % 6  # a shorter last batch
        if graphs:
            tr._graphed_steps().capture = True  # as on a GPU
        metrics = [tr.train_epoch() for _ in range(2)]
        runs[graphs] = ([m["train_loss"] for m in metrics], tr.trainable_state(), tr)
    (plain, w0, _), (graphed, w1, tr) = runs[False], runs[True]
    steps = tr.step_graphs
    buckets = steps.graphs.values()
    longest = bucket_length(max(len(e.input_ids) for e in tr.train_examples))
    # the first batch builds the longest bucket; the others, their own only where worth it
    assert len(buckets) >= 2 if own else set(steps.graphs) == {longest}, steps.graphs.keys()
    assert longest in steps.graphs and steps.failed is None and asked
    # the decisions weigh measured times: a replay of the longer graph, a bucket's build
    assert all(n >= 1 and length < up and up_s > 0 and build_s > 0 for n, length, up, up_s, build_s, *_ in asked)
    # the longest bucket warmed up twice (the run's first two steps), every other once, and, once seen again, replays
    assert [b.warm for k, b in steps.graphs.items() if k != longest] == [1] * (len(buckets) - 1)
    assert steps.eager_steps == SG.WARMUP_RUN + len(buckets) - 1 and steps.captured >= 1
    assert metrics[0]["cuda_graphs"] <= metrics[1]["cuda_graphs"] == steps.captured
    # warm-ups and captures are timed, within the epoch's: all of it in the epoch that built the buckets
    assert 0 < metrics[0]["graphs_seconds"] < metrics[0]["train_seconds"], metrics[0]
    assert sum(m["graphs_seconds"] for m in metrics) == pytest.approx(steps.build_seconds)
    assert steps.build_parts["warm_up"] > 0 and steps.build_parts["capture"] > 0
    assert all(bucket_length(k) == k for k in steps.graphs)
    assert plain[1] < plain[0] and graphed == pytest.approx(plain, rel=1e-4), (plain, graphed)
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) < 1e-4


def test_a_bucket_gets_its_own_graph_where_the_steps_it_saves_outweigh_building_it():
    from trainables.step_graphs import worth_own_graph

    # a launch-bound step (SmolLM2-135M on an H200): 96 tokens take barely longer than 16
    assert not worth_own_graph(200, 48, 96, 0.030, 0.8, 16, 0.028)
    # through zero, the saving is overstated: half of 30 ms, 200 times, is worth 0.8 s
    assert worth_own_graph(200, 48, 96, 0.030, 0.8)
    # an arithmetic-bound step (an 8B model): a few dozen steps at half the length repay it
    assert worth_own_graph(30, 48, 96, 0.300, 2.0) and not worth_own_graph(10, 48, 96, 0.300, 2.0)
    # nothing ahead: never
    assert not worth_own_graph(0, 16, 96, 1.0, 0.0)


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_padding_rows_and_columns_keeps_the_training_loss(tmp_path, approach):
    rows = ["text,label"] + [f'"item {i} was {w}",{y}' for i in range(24)
                             for w, y in [(("fine", "ok"), ("a letdown", "not good at all"))[i % 2]]]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")  # labels of 2 and 6 tokens or so
    cfg = RunConfig.model_validate(tiny_config(tmp_path / "d.csv", approach=approach, quantization="none"))
    tr = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    batch = tr.approach.collate(tr.train_examples[:5], train=True)
    padded = tr.approach.pad_to(batch, 8, batch["input_ids"].shape[1] + 23)
    assert padded["input_ids"].shape == (8, batch["input_ids"].shape[1] + 23)
    assert padded["labels"][5:].tolist() == [IGNORE] * 3
    if approach == "generation":  # label positions padded to rows x the longest label
        lengths = sorted(map(len, tr.approach.label_ids))
        assert lengths[0] < lengths[-1] and len(batch["target_pos"]) < len(padded["target_pos"]) == 8 * lengths[-1]
    weights = torch.tensor([1.0, 3.0])  # class weights: filler rows must not count in the weighted mean either
    for w in (None, weights if approach == "head" else None):
        with torch.no_grad():
            a, b = (tr.approach.loss(tr.model, x, w).item() for x in (batch, padded))
        assert a == pytest.approx(b, rel=1e-5) and a > 0
    # as a graph runs it: no padding mask (causal attention alone keeps real tokens from the padding)
    with torch.no_grad():
        c = tr.approach.loss(tr.model, {**padded, "attention_mask": None}, None).item()
    assert c == pytest.approx(tr.approach.loss(tr.model, batch, None).item(), rel=1e-4)


def test_graphed_training_resumes_with_the_state_its_graphs_read(tmp_path):
    """A graph holds the addresses of the optimizer's state and learning-rate tensor, which the
    scheduler fills in place. Loading a checkpoint replaces them: the graphs are made anew, and the
    steps after it read the loaded learning rate. A scheduler that assigns a new learning rate
    instead of filling it is put back into the tensor the graphs read."""
    data = _varied_csv(tmp_path / "varied.csv")
    cfg = RunConfig.model_validate(tiny_config(data, quantization="none", **{
        "training.cuda_graphs": True, "training.batch_size": 6, "training.epochs": 3, "training.warmup_ratio": 0.3}))
    a = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    a.train_epoch()
    a.epoch = 1
    saved = float(a.scheduler.get_last_lr()[0])  # where a's schedule stands at the save
    a.save_checkpoint(tmp_path / "ck")
    b = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    b.train_epoch()  # b's graphs are made, with b's own state
    old = b.step_graphs
    b.load_checkpoint(tmp_path / "ck")
    assert b.step_graphs is None
    steps = b._graphed_steps()
    lr = b.optimizer.param_groups[0]["lr"]
    assert steps is not old and torch.is_tensor(lr) and steps._lrs == [lr]
    inner, taken = steps._step, []
    steps._step = lambda batch: (taken.append(float(lr)), inner(batch))[1]
    b.train_epoch()
    assert taken[0] == pytest.approx(saved) and taken[-1] != pytest.approx(taken[0]), (saved, taken)
    b.optimizer.param_groups[0]["lr"] = torch.tensor(0.125)  # a scheduler that assigns a new object
    taken.clear()
    b.train_epoch()
    assert taken[0] == 0.125 and b.optimizer.param_groups[0]["lr"] is lr


def test_a_step_that_cannot_be_captured_trains_on_without_graphs(tmp_path, monkeypatch):
    """Where capture fails (an operation that waits on the host, say), the run goes on eagerly with the
    same padded steps, says why once, and learns what the plain loop learns."""
    import trainables.step_graphs as SG

    def fail(fn, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(SG, "capture_graph", fail)
    data = _varied_csv(tmp_path / "varied.csv")
    over = {"training.batch_size": 6, "training.epochs": 2, "data.split": {"eval": 0.2, "test": 0.0, "seed": 0}}
    runs, lines = {}, []
    for graphs in (False, True):
        cfg = RunConfig.model_validate(tiny_config(data, quantization="none", **{**over, "training.cuda_graphs": graphs}))
        tr = Trainer(cfg, load_dataset(cfg.data), log=lines.append)
        if graphs:
            steps = tr._graphed_steps()
            steps.capture = True  # as on a GPU, with a capture that fails
        runs[graphs] = [tr.train_epoch() for _ in range(2)]
    assert [m["train_loss"] for m in runs[True]] == pytest.approx([m["train_loss"] for m in runs[False]], rel=1e-4)
    assert steps.failed.endswith(": RuntimeError: CUDA error: operation not permitted when stream is capturing")
    assert steps.failed.startswith("bucket ")
    assert [m["cuda_graphs"] for m in runs[True]] == [0, 0] and "cuda_graphs" not in runs[False][0]
    told = [s for s in lines if "could not be captured" in s]
    assert len(told) == 1 and steps.failed in told[0], lines
