"""lm-evaluation-harness model ``hybrid_megatron``: a training checkpoint evaluated on harness tasks.

Importing this module registers the model with lm_eval's registry (lm_eval 0.4.x has no plugin
discovery, so ``lm_eval --model hybrid_megatron`` alone cannot find it; run
``python -m hybrid_megatron.evaluation lm-eval --model_args checkpoint=DIR --tasks ...``, which
imports this module and hands the rest of its arguments to lm_eval's own CLI). From Python::

    import lm_eval
    from hybrid_megatron.evaluation.lm_eval_adapter import HybridMegatronLM
    lm_eval.simple_evaluate(model=HybridMegatronLM(checkpoint="runs/x/checkpoints"), tasks=[...])

The three request types reuse the evaluation code of this package:

- ``loglikelihood``: context and continuation are encoded whole and split at the context's
  length (lm_eval's HF adapter does the same: trailing context spaces move to the continuation),
  ``(context + continuation)[-(max_length + 1):][:-1]`` is run through the model
  (:func:`~hybrid_megatron.evaluation.common.logits_of`; over-long contexts lose tokens on the
  left) and the continuation's log-probs under ``log_softmax`` of the logits are summed;
- ``loglikelihood_rolling``: lm_eval's disjoint rolling windows of ``max_length`` tokens (the
  first conditioned on the EOD token), scored as above; the sum equals ``-nll * tokens`` of the
  ``nll`` task on the same windows;
- ``generate_until``: :func:`~hybrid_megatron.evaluation.generation.generate` (KV + SSM cache by
  default), stopped at the first ``until`` string or EOD, the text cut before the stop string.

Batching pads on the right, which a causal model never attends to (attention is causal, Mamba's
scan and convolution run left to right), so batched scores equal single-request ones up to
floating-point summation order. Tensor parallelism works as lm_eval expects of TP launchers
(every rank runs every request and reports rank 0; lm_eval writes results from LOCAL_RANK 0);
pipeline parallelism and data parallelism are not supported here.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from hybrid_megatron.evaluation.common import logits_of, model_device
from hybrid_megatron.evaluation.generation import generate

log = logging.getLogger(__name__)

MODEL_NAME = "hybrid_megatron"


def _as_int(value, name: str, default: int | None = None) -> int | None:
    """``value`` from ``--model_args`` (str or int) as int; ``None``/"" give ``default``."""
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"lm-eval model arg {name}={value!r}: expected an integer") from None


def _as_bool(value, default: bool) -> bool:
    """``value`` from ``--model_args`` (bool or "true"/"false"/"1"/"0") as bool."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _batch_size(value, max_batch_size) -> int:
    """lm_eval's ``batch_size`` (int, "N", "auto" or "auto:N") -> requests per forward.

    There is no memory probe here: "auto" means ``max_batch_size`` (default 8).
    """
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        return _as_int(max_batch_size, "max_batch_size", 8)
    size = _as_int(value, "batch_size")
    if size < 1:
        raise ValueError(f"lm-eval batch_size={value!r}: must be at least 1")
    return size


@register_model(MODEL_NAME, "hybrid-megatron")
class HybridMegatronLM(TemplateLM):
    """lm_eval model over a hybrid_megatron training checkpoint (or an already built model).

    ``--model_args`` keys: ``checkpoint`` (root or step directory, required unless ``model`` is
    given), ``tp`` (tensor-parallel size at load, default 1; launch that many ranks),
    ``max_length`` (tokens per forward, default the recipe's ``data.seq_length``),
    ``max_gen_toks`` (default 256), ``use_cache`` (KV + SSM cache for generation, default
    true), ``seed`` (sampling seed, default 0). ``batch_size`` comes from lm_eval's own option.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        tp=1,
        pp=1,
        batch_size=1,
        max_batch_size=None,
        max_length=None,
        max_gen_toks=256,
        use_cache=True,
        seed=0,
        device=None,
        model=None,
        tokenizer=None,
        **unused,
    ):
        """Load ``checkpoint`` at TP=``tp`` (or wrap ``model`` + ``tokenizer``, a
        :class:`hybrid_megatron.data.tokenizer.Tokenizer`, both given); see the class docstring
        for the arguments. ``device`` is ignored (the model sits where the loader puts it).
        Raises ValueError for PP > 1, a data-parallel world, or a missing checkpoint/model."""
        super().__init__()
        if unused:
            log.warning("hybrid_megatron: ignoring model args %s", sorted(unused))
        tp, pp = _as_int(tp, "tp", 1), _as_int(pp, "pp", 1)
        if pp != 1:
            raise ValueError("lm-eval with hybrid_megatron: pp must be 1 (load at tp=N instead)")
        self.recipe = None
        if model is None:
            if not checkpoint:
                raise ValueError("lm-eval with hybrid_megatron needs --model_args checkpoint=DIR")
            from hybrid_megatron.data.tokenizer import load_tokenizer
            from hybrid_megatron.evaluation.common import load_for_eval

            self.recipe, model = load_for_eval(checkpoint, tp, 1)
            tokenizer = load_tokenizer(self.recipe.data.tokenizer)
        elif tokenizer is None:
            raise ValueError("HybridMegatronLM(model=...) needs tokenizer= as well")
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() != tp:
            raise ValueError(
                f"lm-eval with hybrid_megatron runs model-parallel only: world size "
                f"{dist.get_world_size()} != tp={tp} (launch exactly tp ranks)"
            )
        self.model = model
        self.model.eval()
        self.tokenizer = tokenizer
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        default_len = self.recipe.data.seq_length if self.recipe is not None else None
        self._max_length = _as_int(max_length, "max_length", default_len)
        if not self._max_length:
            raise ValueError("HybridMegatronLM(model=...) needs max_length=")
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks", 256)
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.use_cache = _as_bool(use_cache, True)
        self.seed = _as_int(seed, "seed", 0)
        self._device = model_device(model)
        eot = tokenizer.eod if tokenizer.eod is not None else tokenizer.bos_id
        if eot is None:
            raise ValueError(f"{tokenizer.path}: the tokenizer has neither an EOS nor a BOS token")
        self._eot = int(eot)

    # --- sizes and tokens ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """The end-of-document id (EOS), also the prefix of empty contexts and rolling windows."""
        return self._eot

    @property
    def max_length(self) -> int:
        """Tokens per forward pass (contexts longer than this lose tokens on the left)."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer file's content hash (lm_eval fingerprints request caches with it)."""
        return self.tokenizer.content_hash

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string`` (no BOS/EOS added: the training data have none at the start)."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = False) -> str:
        """Text of ``tokens`` (an id or a list of ids)."""
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring ---------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context_ids, continuation_ids)`` of a request, as lm_eval's HF adapter splits them.

        Trailing spaces of the context move to the continuation; ``context + continuation`` is
        encoded whole and split at the length of the context's own encoding. Where that leaves
        no continuation (a token spanning the boundary made the context's encoding as long as the
        whole's: "Mr. Darc" + "y"), the continuation is encoded on its own instead of failing;
        an all-space context becomes the EOD token.
        """
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.tok_encode(context) or [self.prefix_token_id]
        cont = self.tok_encode(context + continuation)[len(ctx) :] if context else []
        return ctx, cont or self.tok_encode(continuation)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Score ``[(cache_key or None, context_ids, continuation_ids), ...]``.

        Returns ``(sum of the continuation's log-probs, whether greedy decoding reproduces
        it)`` per request, in request order. The model sees ``(context + continuation)
        [-(max_length + 1):][:-1]``; requests are batched ``batch_size`` at a time, longest
        first, right-padded.
        """
        items = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError("loglikelihood: empty context or continuation after tokenization")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"loglikelihood: continuation of {len(cont)} tokens > max_length {self.max_length}"
                )
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            items.append((i, whole[:-1], list(cont)))
        items.sort(key=lambda t: (-len(t[1]), t[1]))
        results: list = [None] * len(items)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            width = len(chunk[0][1])
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (_, inp, _) in enumerate(chunk):
                batch[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            logprobs = F.log_softmax(logits_of(self.model, batch.to(self._device)), dim=-1).cpu()
            for row, (i, inp, cont) in enumerate(chunk):
                n = len(inp)
                lp = logprobs[row, n - len(cont) : n]  # the positions predicting the continuation
                target = torch.tensor(cont, dtype=torch.long)
                score = float(lp.gather(-1, target.unsqueeze(-1)).double().sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (score, greedy)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string (``Instance.args == (string,)``).

        lm_eval's rolling windows: disjoint ``max_length``-token windows, the first conditioned on
        the EOD token, every later one on the ``max_length`` tokens before its first prediction,
        so each token is predicted exactly once. Returns one float per request (0.0 for "").
        """
        windows, owner = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, ctx, cont))
                owner.append(idx)
        totals = [0.0] * len(requests)
        for idx, (score, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[idx] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------
    def _stop_check(self, until: list[str]):
        """A ``generate(stop=...)`` callback: True once the decoded new text holds an ``until`` string."""
        terms = [u for u in until if u]

        def stop(new_ids: torch.Tensor) -> bool:
            """True when the text of ``new_ids`` [1, n] contains a stop string."""
            text = self.tok_decode(new_ids[0].tolist())
            return any(term in text for term in terms)

        return stop

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each ``(context, gen_kwargs)`` request; returns the generated strings.

        ``gen_kwargs``: ``until`` (str or list; EOD always stops), ``max_gen_toks`` (or its
        aliases), ``do_sample`` / ``temperature`` / ``top_k``. Greedy unless sampling is asked
        for. Contexts are left-truncated to ``max_length - max_gen_toks`` tokens. One request at
        a time through :func:`hybrid_megatron.evaluation.generation.generate` (cached unless
        ``use_cache=false``); the text is cut before the first stop string.
        """
        eos = self.tok_decode([self.eot_token_id])
        out = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"generate_until: max_gen_toks {max_gen} >= max_length {self.max_length}")
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_gen) :] or [self.eot_token_id]
            prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
            res = generate(
                self.model,
                prompt,
                max_gen,
                use_cache=self.use_cache,
                temperature=temperature,
                top_k=int(kwargs.get("top_k") or 0),
                seed=self.seed,
                stop_token=self.eot_token_id,
                stop=self._stop_check(until),
            )
            new = res.tokens[0, len(ids) :].tolist()
            text = postprocess_generated_text(self.tok_decode(new), until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


def lm_eval_cli(argv: list[str]) -> int:
    """Run lm_eval's own CLI (``lm-eval [run] ...``) with ``hybrid_megatron`` registered.

    Takes lm_eval's arguments; ``--model`` defaults to ``hybrid_megatron`` when absent.
    Returns the exit code (0 on success, lm_eval's ``SystemExit`` code otherwise).
    """
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    has_model = any(a == "--model" or a.startswith("--model=") for a in argv)
    if argv and not has_model and argv[0] not in ("ls", "validate", "-h", "--help"):
        at = 1 if argv[0] == "run" else 0
        argv[at:at] = ["--model", MODEL_NAME]
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
