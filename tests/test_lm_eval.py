"""lm-evaluation-harness adapter: exact scores against the model's own logits, rolling
log-likelihood against the ``nll`` task, generation against ``generate``, and local harness
tasks (YAML + jsonl written here, no hub) through the Python API and the CLI subcommand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from tests.evaluation_helpers import train_tiny  # noqa: E402
from tests.training_helpers import REPO  # noqa: E402

TEXT = json.loads((REPO / "data" / "austen.jsonl").open().readline())["text"]


@pytest.fixture(scope="module")
def ckpt(single_rank, tmp_path_factory):
    """A tiny inter-layer hybrid trained 2 steps (seq_length 128): its checkpoint root."""
    run_dir = tmp_path_factory.mktemp("lm_eval_inter")
    return str(train_tiny("inter", run_dir, 2)["last_checkpoint"])


@pytest.fixture(scope="module")
def lm(ckpt):
    from hybrid_megatron.evaluation.lm_eval_adapter import HybridMegatronLM

    return HybridMegatronLM(checkpoint=ckpt)


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _reference_loglikelihood(
    model, tok, context: str, continuation: str, max_length: int
) -> tuple[float, bool]:
    """Sum of the continuation's log-probs straight from the model's logits, position by position.

    Context and continuation are encoded whole and split at the context's token count (the
    continuation encoded alone where that split leaves nothing); an empty context is the EOD
    token; over-long inputs keep their last ``max_length + 1`` tokens.
    """
    ctx = tok.encode(context) if context else [tok.eod]
    cont = (tok.encode(context + continuation)[len(ctx) :] if context else []) or tok.encode(continuation)
    whole = ctx + cont
    seq = whole[-(max_length + 1) :]
    inp = torch.tensor([seq[:-1]])
    logits = model(inp, torch.arange(inp.shape[1]).unsqueeze(0), None, runtime_gather_output=True)
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    first = len(seq) - 1 - len(cont)  # the position whose output predicts cont[0]
    total = sum(float(logp[first + j, t]) for j, t in enumerate(cont))
    greedy = all(int(logp[first + j].argmax()) == t for j, t in enumerate(cont))
    return total, greedy


def test_model_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    from hybrid_megatron.evaluation.lm_eval_adapter import HybridMegatronLM

    assert get_model("hybrid_megatron") is HybridMegatronLM


def test_loglikelihood_equals_sum_of_logit_log_probs(lm):
    """Exact per request (batch 1), to float rounding batched; trailing context spaces, split
    words, empty and over-long (left-truncated) contexts."""
    from hybrid_megatron.evaluation.lm_eval_adapter import HybridMegatronLM

    words = TEXT.split()
    long_context = " ".join(words[:300])  # > 128 tokens: left-truncated
    assert len(lm.tok_encode(long_context)) > lm.max_length + 50
    pairs = [
        ("It is a truth universally acknowledged,", " that a single man"),
        ("Mrs. Bennet said to her husband ", "that Netherfield"),  # the space moves to the continuation
        ("She was happ", "y to"),  # split after whole encoding: " happy" is one token, scores [" to"]
        ("Mr. Darc", "y was"),  # the whole is shorter than the context: continuation encoded alone
        ("", "It is a truth"),  # empty context: conditioned on EOD
        (long_context, " and the rest"),
        ("She", " was"),
    ]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    for (context, continuation), (score, greedy) in zip(pairs, got):
        moved = len(context) - len(context.rstrip())
        ref_ctx, ref_cont = context[: len(context) - moved], context[len(context) - moved :] + continuation
        want, want_greedy = _reference_loglikelihood(lm.model, lm.tokenizer, ref_ctx, ref_cont, lm.max_length)
        assert score < 0 and abs(score - want) < 1e-5, (context, score, want)
        assert greedy == want_greedy
    assert lm._encode_pair("She was happ", "y to")[1] == lm.tok_encode(" to")
    assert lm._encode_pair("Mr. Darc", "y was")[1] == lm.tok_encode("y was")
    # the trailing space really moved: scoring "...husband" + " that..." gives the same number
    assert (
        got[1][0]
        == lm.loglikelihood(_instances("loglikelihood", [(pairs[1][0].rstrip(), " " + pairs[1][1])]))[0][0]
    )

    batched = HybridMegatronLM(model=lm.model, tokenizer=lm.tokenizer, max_length=lm.max_length, batch_size=4)
    for (a, _), (b, _) in zip(got, batched.loglikelihood(_instances("loglikelihood", pairs))):
        assert abs(a - b) < 1e-4, (a, b)


def test_loglikelihood_is_greedy_flag(lm):
    """The flag is True exactly for the model's own greedy continuation."""
    from hybrid_megatron.evaluation.generation import generate

    ctx = lm.tok_encode("It is a truth universally acknowledged")
    greedy = generate(lm.model, torch.tensor([ctx]), 6, use_cache=False).tokens[0, len(ctx) :].tolist()
    other = greedy[:-1] + [(greedy[-1] + 1) % 4096]
    (s1, g1), (s2, g2) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert g1 is True and g2 is False and s1 > s2


def _indexed_dataset(prefix, tokens: list[int]) -> str:
    """One document holding ``tokens`` as an indexed dataset (what the nll task reads)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    builder.add_document(np.asarray(tokens, dtype=np.int32), [len(tokens)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _text_of_tokens(tok, n: int) -> str:
    """A prefix of the corpus text that encodes to exactly ``n`` tokens."""
    for end in range(1, len(TEXT)):
        if len(tok.encode(TEXT[:end])) == n:
            return TEXT[:end]
    raise AssertionError(f"no prefix of {n} tokens")


def test_loglikelihood_rolling_equals_nll_task(lm, ckpt, tmp_path):
    """Two full windows (256 tokens, max_length 128): -rolling == nll * tokens of ``run_nll`` on
    the stream [EOD] + tokens; one short text against ``evaluate_nll`` on its single window."""
    from hybrid_megatron.evaluation.nll import evaluate_nll, run_nll

    tok = lm.tokenizer
    seq = lm.max_length
    text = _text_of_tokens(tok, 2 * seq)
    ids = tok.encode(text)
    prefix = _indexed_dataset(tmp_path / "doc", [tok.eod] + ids)
    res = run_nll(ckpt, data_prefix=prefix, num_samples=2)
    assert res["tokens"] == 2 * seq
    short = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,), (short,), ("",)]))
    assert rolling[2] == 0.0
    assert abs(-rolling[0] - res["nll"] * res["tokens"]) < 1e-5 * res["tokens"], (rolling[0], res)
    s = tok.encode(short)
    window = torch.tensor([[tok.eod] + s])
    micro = {
        "tokens": window[:, :-1],
        "labels": window[:, 1:],
        "loss_mask": torch.ones(1, len(s)),
        "position_ids": torch.arange(len(s)).unsqueeze(0),
    }
    short_nll = evaluate_nll(lm.model, [[micro]], len(s))
    assert short_nll["tokens"] == len(s)
    assert abs(-rolling[1] - short_nll["nll"] * len(s)) < 1e-5 * len(s), (rolling[1], short_nll)


def _first_new_piece(tok, new: list[int], start: int = 3) -> tuple[int, str]:
    """The first generated token at or after ``start`` whose text did not occur before it."""
    for k in range(start, len(new)):
        piece = tok.decode([new[k]]).strip()
        if piece and piece not in tok.decode(new[:k]):
            return k, piece
    raise AssertionError(f"greedy output has no new piece: {tok.decode(new)!r}")


def test_generate_until_stops_at_until_and_matches_greedy(lm):
    from hybrid_megatron.evaluation.generation import generate
    from hybrid_megatron.evaluation.lm_eval_adapter import HybridMegatronLM

    tok = lm.tokenizer
    prompt = "It is a truth universally acknowledged, that a single man in possession"
    ids = tok.encode(prompt)
    new = generate(lm.model, torch.tensor([ids]), 24, use_cache=False).tokens[0, len(ids) :].tolist()
    full = tok.decode(new)
    k, piece = _first_new_piece(tok, new)
    want = full.split(piece)[0]
    assert want  # something before the stop string

    calls = []
    hook = lm.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        reqs = _instances(
            "generate_until",
            [
                (prompt, {"until": [piece], "max_gen_toks": 24, "do_sample": False}),
                (prompt, {"until": ["\u00a7"], "max_gen_toks": 24}),
            ],
        )
        stopped, unstopped = lm.generate_until(reqs)
    finally:
        hook.remove()
    assert stopped == want, (stopped, want, full)
    assert unstopped == full.split(tok.decode([tok.eod]))[0]  # no stop string: all 24 tokens (or to EOD)
    n = new.index(tok.eod) + 1 if tok.eod in new else 24
    # cached: 1 prefill + k decode steps for the stopped request (token k holds the stop string)
    assert len(calls) == (1 + k) + n, (len(calls), k, n)
    uncached = HybridMegatronLM(model=lm.model, tokenizer=tok, max_length=lm.max_length, use_cache=False)
    assert uncached.generate_until(reqs) == [stopped, unstopped]


PAIRS = [
    ("It is a truth universally acknowledged,", " that a single man"),
    ("", "She was"),
    ("Mrs. Bennet said to her husband ", "that Netherfield"),
]
GEN = ("It is a truth universally acknowledged,", {"until": ["\u00a7"], "max_gen_toks": 12})


def _adapter_at_tp2(rank: int, world: int, ckpt: str) -> dict:
    """The adapter loaded at TP=2 on 2 ranks: loglikelihoods, a rolling one, a generation."""
    from hybrid_megatron.evaluation.lm_eval_adapter import HybridMegatronLM

    lm = HybridMegatronLM(checkpoint=ckpt, tp=2)
    return {
        "rank": lm.rank,
        "world": lm.world_size,
        "ll": lm.loglikelihood(_instances("loglikelihood", PAIRS)),
        "rolling": lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(TEXT[:1500],)])),
        "gen": lm.generate_until(_instances("generate_until", [GEN])),
    }


@pytest.mark.slow
def test_adapter_at_tp2_equals_tp1(lm, ckpt, tmp_path):
    """Every TP rank runs every request (lm_eval's TP convention: all report rank 0) and gets
    the TP=1 numbers."""
    from tests.distributed import run_distributed

    want_ll = lm.loglikelihood(_instances("loglikelihood", PAIRS))
    want_rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(TEXT[:1500],)]))
    want_gen = lm.generate_until(_instances("generate_until", [GEN]))
    assert len(lm.tok_encode(TEXT[:1500])) > lm.max_length  # several rolling windows
    for r in run_distributed(_adapter_at_tp2, 2, tmp_path, ckpt):
        assert (r["rank"], r["world"]) == (0, 1)
        for (a, ga), (b, gb) in zip(r["ll"], want_ll):
            assert abs(a - b) < 1e-4 and ga == gb, (a, b)
        assert abs(r["rolling"][0] - want_rolling[0]) < 1e-3, (r["rolling"], want_rolling)
        assert r["gen"] == want_gen


def _write_tasks(root, tok) -> str:
    """Three harness tasks reading jsonl files under ``root``: multiple choice (loglikelihood),
    rolling perplexity and generation. Returns the include path."""
    tasks = root / "tasks"
    tasks.mkdir()
    choice = [
        {
            "question": "It is a truth universally",
            "choices": [" acknowledged", " banana", " the"],
            "label": 0,
        },
        {"question": "Mr. Bennet was", "choices": [" so odd", " seven", " a"], "label": 2},
        {"question": "She was", "choices": [" not", " purple", " happy"], "label": 0},
        {"question": "She was", "choices": [" purple", " not"], "label": 0},  # most likely scored wrong
    ]
    rolling = [{"text": TEXT[:400]}, {"text": TEXT[1000:1300]}]
    gen = [
        {"prompt": "It is a truth universally acknowledged,", "answer": " that"},
        {"prompt": "Mrs. Bennet said", "answer": " nothing"},
    ]
    for name, rows in (("choice", choice), ("rolling", rolling), ("gen", gen)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = root / "hf_cache"

    def data(name):
        return (
            "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {tasks / name}.jsonl\n  cache_dir: {cache}\n"
            "test_split: test\n"
        )

    (tasks / "hm_choice.yaml").write_text(
        "task: hm_choice\n" + data("choice") + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )
    (tasks / "hm_rolling.yaml").write_text(
        "task: hm_rolling\n" + data("rolling") + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n  - metric: word_perplexity\n'
    )
    (tasks / "hm_gen.yaml").write_text(
        "task: hm_gen\n" + data("gen") + 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return str(tasks)


def _expected_metrics(lm, root) -> dict:
    """The three tasks' metrics computed from the adapter's own answers."""
    tasks = root / "tasks"
    choice = [json.loads(x) for x in (tasks / "choice.jsonl").read_text().splitlines()]
    correct = []
    for d in choice:
        scores = [
            s
            for s, _ in lm.loglikelihood(
                _instances("loglikelihood", [(d["question"], c) for c in d["choices"]])
            )
        ]
        correct.append(float(int(np.argmax(scores)) == d["label"]))
    texts = [json.loads(x)["text"] for x in (tasks / "rolling.jsonl").read_text().splitlines()]
    ll = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    n_bytes = sum(len(t.encode()) for t in texts)
    gen = [json.loads(x) for x in (tasks / "gen.jsonl").read_text().splitlines()]
    outs = lm.generate_until(
        _instances(
            "generate_until",
            [(d["prompt"], {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False}) for d in gen],
        )
    )
    return {
        "acc": sum(correct) / len(correct),
        "bits_per_byte": -sum(ll) / n_bytes / math.log(2),
        "exact_match": sum(float(o == d["answer"]) for o, d in zip(outs, gen)) / len(gen),
        "outs": outs,
    }


def test_simple_evaluate_on_local_tasks(lm, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    include = _write_tasks(tmp_path, lm.tokenizer)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["hm_choice", "hm_rolling", "hm_gen"],
        task_manager=TaskManager(include_path=include, include_defaults=False),
        log_samples=True,
    )
    res = out["results"]
    want = _expected_metrics(lm, tmp_path)
    assert res["hm_choice"]["acc,none"] == pytest.approx(want["acc"])
    assert res["hm_rolling"]["bits_per_byte,none"] == pytest.approx(want["bits_per_byte"], rel=1e-9)
    assert res["hm_gen"]["exact_match,none"] == pytest.approx(want["exact_match"])
    assert [s["resps"][0][0] for s in out["samples"]["hm_gen"]] == want["outs"]
    assert 0 < res["hm_rolling"]["bits_per_byte,none"] < 8


@pytest.mark.slow
def test_cli_subcommand_runs_lm_eval_with_the_registered_model(lm, ckpt, tmp_path):
    """``python -m hybrid_megatron.evaluation lm-eval ...`` in a fresh process (the plain
    ``lm_eval`` CLI has no plugin discovery, so it cannot find the model on its own)."""
    include = _write_tasks(tmp_path, lm.tokenizer)
    out_dir = tmp_path / "results"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "2",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_megatron.evaluation",
            "lm-eval",
            "--model_args",
            f"checkpoint={ckpt}",
            "--tasks",
            "hm_choice,hm_rolling",
            "--include_path",
            include,
            "--output_path",
            str(out_dir),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out_dir.rglob("results_*.json"))
    assert len(files) == 1, list(out_dir.rglob("*"))
    res = json.loads(files[0].read_text())
    assert res["config"]["model"] == "hybrid_megatron"
    want = _expected_metrics(lm, tmp_path)
    assert res["results"]["hm_choice"]["acc,none"] == pytest.approx(want["acc"])
    assert res["results"]["hm_rolling"]["bits_per_byte,none"] == pytest.approx(
        want["bits_per_byte"], rel=1e-6
    )
