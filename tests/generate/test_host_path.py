"""The host side of a job: incremental stop strings, admission in bursts, multi-step decode while requests wait."""

import random

import batchpilot
import pytest
import torch

from batchpilot.data.tokenizer import Tokenizer
from batchpilot.generate.detok import IncrementalText
from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.kv_cache import BlockPool
from batchpilot.generate.request import Request, SamplingParams, Status
from batchpilot.generate.scheduler import Scheduler


def _first_stop_brute_force(tok: Tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The old rule: after each token, decode the whole output and look for a stop string."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            return k, text[:cut]
    return None


def test_incremental_stops_equal_decoding_the_whole_output(model_dir):
    """Random token streams (byte-level BPE: multi-byte characters split over tokens, ids that decode to nothing):
    the token a stop string ends on and the text before it are those of decoding everything after every token."""
    tok = Tokenizer.from_path(model_dir)
    rng = random.Random(0)
    vocab = tok.inner.get_vocab_size()
    hits = 0
    for trial in range(60):
        ids = [rng.randrange(vocab + 40) for _ in range(rng.randint(1, 60))]  # ids past the vocabulary decode to ""
        stops = tuple(rng.sample([" the", "ea", "\n", "light", "d,", "é"], 2))
        want = _first_stop_brute_force(tok, ids, stops)
        text = IncrementalText(stops)
        got = None
        for k in range(1, len(ids) + 1):
            if (cut := text.add(tok, ids[:k])) >= 0:
                got = k, text.text[:cut]
                break
        assert got == want, (trial, ids, stops)
        hits += want is not None
        if want is None:  # no stop: the text read so far is the whole text, but for a held partial character
            assert tok.decode(ids).startswith(text.text)
    assert hits > 10


def test_incremental_text_reads_several_tokens_at_once(model_dir):
    tok = Tokenizer.from_path(model_dir)
    ids = tok.encode("And God said, Let there be light: and there was light.")
    one, many = IncrementalText(("zzz",)), IncrementalText(("zzz",))
    for k in range(1, len(ids) + 1):
        one.add(tok, ids[:k])
    for k in range(4, len(ids) + 4, 4):
        many.add(tok, ids[:k])
    assert one.text == many.text == tok.decode(ids)


def _running(s: Scheduler, r: Request) -> Request:
    assert s.pool.grow(r.blocks, len(r.prompt_ids) + 1)
    r.num_computed, r.status, r.output_ids = len(r.prompt_ids), Status.RUNNING, [5]
    s.running.append(r)
    return r


def test_admission_in_bursts_waits_for_free_rows_then_fills_them():
    s = Scheduler(BlockPool(1000, 16), max_batch_tokens=512, max_num_seqs=8, admit_min_free=4)
    running = [_running(s, Request(i, [1] * 10, SamplingParams(max_tokens=10 + i))) for i in range(8)]
    s.add([Request(100 + i, [2] * 10, SamplingParams(max_tokens=50)) for i in range(10)])
    assert not s.admission_open() and s.steps_until_admission(32) == 9 + 4 - 1  # the 4th shortest ends then
    for r in running[:3]:
        s.finish(r, "length")
    plan = s.schedule()
    assert all(c.decode for c in plan.chunks) and len(s.waiting) == 10  # 3 free rows: no admission yet
    s.finish(running[3], "length")
    plan = s.schedule()
    assert sum(not c.decode for c in plan.chunks) == 4 and len(s.waiting) == 6  # 4 free: all 4 rows refilled
    assert not s.admission_open()
    with pytest.raises(ValueError, match="admit_min_free"):
        Scheduler(BlockPool(10, 16), max_batch_tokens=8, max_num_seqs=4, admit_min_free=5)


def test_one_free_row_admits_as_before():
    """admit_min_free 1 (the server's scheduler): a waiting request is admitted as soon as one row is free."""
    s = Scheduler(BlockPool(1000, 16), max_batch_tokens=512, max_num_seqs=2)
    a = _running(s, Request(0, [1] * 4, SamplingParams(max_tokens=9)))
    _running(s, Request(1, [1] * 4, SamplingParams(max_tokens=9)))
    s.add([Request(2, [2] * 4)])
    assert not s.admission_open()
    s.finish(a, "length")
    assert s.admission_open() and sum(not c.decode for c in s.schedule().chunks) == 1


def _job(vocab: int, n: int = 24) -> tuple[list[list[int]], list[SamplingParams]]:
    """Long-tailed output lengths, a shared prefix on half the prompts, greedy and sampled lines, stop strings."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, vocab, (24,), generator=g).tolist()
    rng = random.Random(3)
    prompts, params = [], []
    for i in range(n):
        own = torch.randint(0, vocab, (rng.randint(2, 12),), generator=g).tolist()
        prompts.append(shared + own if i % 2 else own)
        params.append(SamplingParams(max_tokens=max(1, min(24, int(rng.lognormvariate(1.8, 0.9)))),
                                     temperature=0.8 if i % 3 == 0 else 0.0, top_p=0.95 if i % 3 == 0 else 1.0,
                                     seed=i, stop=("the", " and") if i % 4 == 0 else ()))
    return prompts, params


def test_outputs_do_not_depend_on_admission_bursts_or_steps_per_round_trip(model_dir):
    """fp32 on CPU, the graph path's static buffers run eagerly: one request's tokens (greedy, sampled, stop
    strings) are the same whether new requests are admitted one per finished one or in bursts, and whatever the
    decode steps per round trip; bursts with multi-step decode take fewer round trips."""
    model, tok = batchpilot.load_model(model_dir), Tokenizer.from_path(model_dir)
    prompts, params = _job(model.config.vocab_size)
    outputs, trips = {}, {}
    for admit, steps in ((0.0, 1), (0.5, 1), (0.5, 8)):
        engine = Engine(model, tok, EngineConfig(max_num_seqs=8, decode_steps=steps, admit_fraction=admit,
                                                 min_prefix_len=8))
        engine.runner.attach_graphs(max_rows=8, max_groups=2, capture=False)
        res = engine.generate(prompts, params)
        outputs[admit, steps] = [(r.output_ids, r.text, r.finish_reason) for r in res]
        trips[admit, steps] = engine.stats.round_trips
        assert engine.pool.num_free == engine.pool.num_blocks - 1
    assert len({tuple(map(str, o)) for o in outputs.values()}) == 1
    assert any(reason == "stop" for *_, reason in outputs[0.0, 1])
    assert trips[0.5, 8] < trips[0.0, 1]


def test_admit_fraction_flag(model_dir, tmp_path, capsys):
    from batchpilot.cli import main

    job, out = tmp_path / "job.txt", tmp_path / "out.jsonl"
    job.write_text("And God said\nLet there be light\nthe earth\n")
    args = ["generate", "--model", str(model_dir), "--input", str(job), "--output", str(out), "--max-tokens", "3"]
    assert main([*args, "--admit-fraction", "1.5"]) != 0
    assert "--admit-fraction must be in [0, 1]" in capsys.readouterr().err
    assert main([*args, "--admit-fraction", "0.5", "--max-num-seqs", "2"]) == 0
    assert len(out.read_text().splitlines()) == 3


def test_deadline_stops_the_run_and_frees_its_blocks(model_dir, monkeypatch):
    import itertools

    import batchpilot.generate.engine as engine_module

    model = batchpilot.load_model(model_dir)
    engine = Engine(model, None, EngineConfig())
    prompts = [[1, 2, 3, i] for i in range(4)]
    reqs = [Request(i, p, SamplingParams(max_tokens=20, ignore_eos=True)) for i, p in enumerate(prompts)]
    clock = itertools.count()  # a fake clock: one tick per reading, so a few steps run before the deadline
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: float(next(clock)))
    assert list(engine.run(reqs, deadline=8.0)) == [] and 0 < engine.stats.steps < 20
    monkeypatch.undo()
    assert engine.pool.num_free == engine.pool.num_blocks - 1  # the unfinished requests' blocks are free
    done = engine.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))  # the engine is still whole
    assert [len(c.output_ids) for c in done] == [20] * 4
