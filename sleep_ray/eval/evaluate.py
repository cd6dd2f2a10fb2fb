"""Scoring a model on tasks: completion likelihoods, classification among choices, greedy
generation, and one row of the accuracy matrix R.

Owns the per-task score that fills R (METHOD.md section 6): accuracy tasks are classified by
likelihood (the choice whose completion is most probable given the prompt), chrF tasks are
generated greedily and compared with the reference completion. Also owns the dream score tau,
the mean per-token NLL of completions (lower is better). Plain torch + transformers, run in the
caller's process on whatever device the model sits on; every function runs the model in eval
mode without gradients and gives it back in the mode it came in.

Teacher-forced passes are right-padded (labels are aligned with input_ids, as `collate.py`
builds them); generation is left-padded so every prompt ends at the same position.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from sleep_ray.data.collate import IGNORE, Batch, collate_pairs, encode_pair, left_pad
from sleep_ray.eval.metrics import accuracy, chrf
from sleep_ray.model import memory as M
from sleep_ray.types import Example, Split, Task

Metric = Literal["accuracy", "chrf"]


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _inference(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode without gradients, the memory routing as it answers (`M.inference_routing`);
    the caller's train/eval mode is restored afterwards, so an evaluation in the middle of wake
    does not leave the learner's model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), M.inference_routing(model):
            yield
    finally:
        model.train(was_training)


def _batch_logprobs(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (B,) in nats and completion token counts (B,) of one batch.

    Right padding needs no position ids: real tokens never attend to the pads after them.
    Only the last `keep` positions get logits, the earliest that predicts a completion token
    onwards, so long prompts and large vocabularies do not pay for prompt-only logits.
    """
    has = batch.labels != IGNORE  # (B, T)
    if not has.any():  # only empty completions: log p = 0 over 0 tokens
        return torch.zeros(len(has)), torch.zeros(len(has), dtype=torch.long)
    device = _device(model)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)  # (B, T)
    first = int(has.nonzero()[:, 1].min())  # earliest completion token; >= 1 (prompt non-empty)
    keep = ids.shape[1] - first + 1  # logits of positions first-1 .. T-1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (B, keep, V)
    logits = logits[:, :-1].float()  # (B, keep-1, V): position t predicts token t+1
    target = batch.labels[:, first:].to(device)  # (B, keep-1)
    scored = target != IGNORE
    picked = logits.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)  # (B, keep-1)
    logp = (picked - logits.logsumexp(-1)) * scored  # log_softmax without a second (B, T, V)
    return logp.sum(-1).cpu(), scored.sum(-1).cpu()


def _check_prompts(pairs: Sequence[tuple[list[int], list[int]]]) -> None:
    if any(not p for p, _ in pairs):
        raise ValueError("every prompt needs at least one token: the first completion token "
                         "must be predicted from something")


def _pair_logprobs(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   pairs: Sequence[tuple[list[int], list[int]]],
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) summed log-probs and (N,) token counts of encoded (prompt, completion) pairs.

    Pairs are batched in order of length (less padding), and results put back in input order.
    Where a prompt routes as a whole (`M.routes_whole_prompts`) each prompt is prefilled alone
    and its completion continues it (`_shared_prompt_logprobs`): the completion must not take
    part in how its prompt routes.
    """
    _check_prompts(pairs)
    if M.routes_whole_prompts(model):
        return _shared_prompt_logprobs(model, tok, [(p, [c]) for p, c in pairs], batch_size)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    total = torch.zeros(len(pairs))
    count = torch.zeros(len(pairs), dtype=torch.long)
    with _inference(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate_pairs([pairs[i] for i in idx], tok.pad_token_id)
            total[idx], count[idx] = _batch_logprobs(model, batch)
    return total, count


def completion_logprobs(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                        pairs: Sequence[tuple[str, str]], max_length: int,
                        batch_size: int = 32) -> torch.Tensor:
    """(N,) sum of log p(completion tokens | prompt) in nats; no EOS is appended.

    Prompts longer than `max_length` together with their completion are cut from the left.
    """
    encoded = [encode_pair(tok, p, c, max_length, add_eos=False) for p, c in pairs]
    return _pair_logprobs(model, tok, encoded, batch_size)[0]


# Prompts prefilled together by `_shared_prompt_logprobs`; their choices then run on the cache
# `batch_size` rows at a time.
PROMPTS_PER_PREFILL = 16


def _shared_prompt_logprobs(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                            groups: Sequence[tuple[list[int], list[list[int]]]],
                            batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) summed log-probs and (N,) token counts of every completion of `groups` (a prompt's
    ids and its completions' ids), in order: each prompt runs once, its completions on a copy
    of its KV cache.

    Prompts are prefilled left-padded, `PROMPTS_PER_PREFILL` at a time (position ids from the
    attention mask, as in generation); a completion's first token is scored from the prefill's
    last logits, the rest by one pass of its tokens but the last on the cache, right-padded,
    `batch_size` rows at a time. The memory's sequence routing continues each prompt's running
    prefix mean there (`memory.continued_prefix`), so every token routes as in one pass over
    the whole sequence (`_pair_logprobs`), which this equals up to float rounding.
    """
    sizes = [len(completions) for _, completions in groups]
    total, count = torch.zeros(sum(sizes)), torch.zeros(sum(sizes), dtype=torch.long)
    offsets = [0, *itertools.accumulate(sizes)]  # groups[g]'s first completion, flat
    device, pad = _device(model), tok.pad_token_id
    with _inference(model):
        for start in range(0, len(groups), PROMPTS_PER_PREFILL):
            chunk = range(start, min(start + PROMPTS_PER_PREFILL, len(groups)))
            ids, mask = (t.to(device) for t in left_pad([groups[g][0] for g in chunk], pad))
            out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                        use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1].float().log_softmax(-1).cpu()  # (prompts, V)
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            rows = []  # (prompt row in the chunk, flat index, completion) with a token to go
            for row, g in enumerate(chunk):
                for j, c in enumerate(groups[g][1]):
                    flat = offsets[g] + j
                    count[flat] = len(c)
                    if c:
                        total[flat] = first[row, c[0]]
                    if len(c) > 1:
                        rows.append((row, flat, c))
            rows.sort(key=lambda r: len(r[2]))
            for r0 in range(0, len(rows), batch_size):
                part = rows[r0:r0 + batch_size]
                index = torch.tensor([row for row, _, _ in part], device=device)
                batch = collate_pairs([([c[0]], c[1:]) for _, _, c in part], pad)
                cont_mask = batch.attention_mask[:, :-1].to(device)  # inputs: c[:-1]
                full_mask = torch.cat([mask[index], cont_mask], dim=1)
                cache = DynamicCache(ddp_cache_data=[(k[index], v[index]) for k, v in kv])
                with M.continued_prefix(model, index, len(chunk)):
                    logits = model(input_ids=batch.input_ids[:, :-1].to(device),
                                   attention_mask=full_mask, past_key_values=cache,
                                   position_ids=_positions(full_mask)[:, mask.shape[1]:]).logits
                logits = logits.float()  # (rows, T-1, V): position t predicts token t+1
                target = batch.labels[:, 1:].to(device)
                scored = target != IGNORE
                picked = logits.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
                logp = ((picked - logits.logsumexp(-1)) * scored).sum(-1).cpu()
                total[[flat for _, flat, _ in part]] += logp
    return total, count


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left- or right-padded attention mask: 0, 1, ... over its real tokens."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def classify_by_likelihood(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                           examples: Sequence[Example], max_length: int, batch_size: int = 64,
                           normalize: bool = False, share_prompts: bool = True) -> list[str]:
    """For each example, the choice with the highest total log-prob (mean per token if
    `normalize`). Ties go to the earlier choice.

    With `share_prompts` (the default), an example's prompt runs once and its choices on its KV
    cache (`_shared_prompt_logprobs`; an example whose choices cut its prompt differently to fit
    `max_length` runs as below). Otherwise all (prompt, choice) pairs of all examples are
    scored as whole sequences, `batch_size` per forward, sorted by length.
    """
    encoded, spans = [], []
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"example {i} of task {ex.task!r} has no choices to classify among")
        spans.append((len(encoded), len(ex.choices)))
        encoded += [encode_pair(tok, ex.prompt, c, max_length, add_eos=False) for c in ex.choices]
    if share_prompts:
        total, count = _choice_logprobs(model, tok, encoded, spans, batch_size)
    else:
        total, count = _pair_logprobs(model, tok, encoded, batch_size)
    scores = (total / count.clamp(min=1)) if normalize else total  # (N,)
    preds = []
    for ex, (start, n) in zip(examples, spans):
        best = int(scores[start:start + n].argmax())  # argmax returns the first maximum
        preds.append(ex.choices[best])
    return preds


def _choice_logprobs(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                     encoded: Sequence[tuple[list[int], list[int]]], spans: Sequence[tuple[int, int]],
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_pair_logprobs` of every example's (prompt, choice) pairs (`spans`: each example's first
    pair and count), an example's prompt run once where all its pairs share it."""
    _check_prompts(encoded)
    shared = [(start, n) for start, n in spans
              if all(encoded[i][0] == encoded[start][0] for i in range(start, start + n))]
    alone = sorted(set(range(len(encoded))) - {i for start, n in shared for i in range(start, start + n)})
    total, count = torch.zeros(len(encoded)), torch.zeros(len(encoded), dtype=torch.long)
    groups = [(encoded[start][0], [encoded[i][1] for i in range(start, start + n)]) for start, n in shared]
    if groups:
        flat = [i for start, n in shared for i in range(start, start + n)]
        total[flat], count[flat] = _shared_prompt_logprobs(model, tok, groups, batch_size)
    if alone:
        total[alone], count[alone] = _pair_logprobs(model, tok, [encoded[i] for i in alone], batch_size)
    return total, count


def generate_greedy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int, batch_size: int = 32,
                    max_prompt_length: int | None = None) -> list[str]:
    """Greedy completions of `prompts`: decoded up to EOS, special tokens skipped, stripped.

    Prompts are left-padded (HF derives position ids from the attention mask) and, when
    `max_prompt_length` is given, cut from the left to that many tokens.
    """
    seqs = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    if max_prompt_length is not None:
        seqs = [s[-max_prompt_length:] for s in seqs]
    device, outputs = _device(model), []
    with _inference(model):
        for start in range(0, len(seqs), batch_size):
            ids, mask = left_pad(seqs[start:start + batch_size], tok.pad_token_id)  # (B, T)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            new = out[:, ids.shape[1]:].tolist()  # (B, <= max_new_tokens) completion ids only
            outputs += [_decode_until_eos(tok, row) for row in new]
    return outputs


def _decode_until_eos(tok: PreTrainedTokenizerBase, new_ids: list[int]) -> str:
    if tok.eos_token_id in new_ids:
        new_ids = new_ids[:new_ids.index(tok.eos_token_id)]
    return tok.decode(new_ids, skip_special_tokens=True).strip()


def score_examples(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   examples: Sequence[Example], metric: Metric, max_length: int,
                   max_new_tokens: int = 48) -> float:
    """The 0-1 score of `examples`: accuracy by likelihood among choices, or corpus chrF of
    greedy generations against the completions (both stripped)."""
    if not examples:
        raise ValueError("no examples to score")
    if metric == "accuracy":
        preds = classify_by_likelihood(model, tok, examples, max_length)
        return accuracy(preds, [e.completion for e in examples])
    if metric == "chrf":
        preds = generate_greedy(model, tok, [e.prompt for e in examples], max_new_tokens,
                                max_prompt_length=max_length)
        return chrf(preds, [e.completion.strip() for e in examples])
    raise ValueError(f"metric={metric!r}: expected 'accuracy' or 'chrf'")


def completion_nll(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   examples: Sequence[Example], max_length: int, batch_size: int = 32) -> float:
    """Mean per-token NLL (nats) of the completions, EOS included: the dream score tau.

    Token-weighted over the whole set (sum of NLL / number of completion tokens), so exp of it
    is the completions' perplexity. Lower is better.
    """
    if not examples:
        raise ValueError("no examples to score")
    encoded = [encode_pair(tok, e.prompt, e.completion, max_length, add_eos=True) for e in examples]
    total, count = _pair_logprobs(model, tok, encoded, batch_size)
    return float(-total.sum() / count.sum())


def score_stream(model: PreTrainedModel, tok: PreTrainedTokenizerBase, tasks: Sequence[Task],
                 split: Split = "test", max_length: int = 64,
                 max_new_tokens: int = 48) -> list[float]:
    """The score of each task on its `split`, in task order: one row of the accuracy matrix R."""
    return [score_examples(model, tok, getattr(task, split), task.metric, max_length,
                           max_new_tokens) for task in tasks]


def token_accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   examples: Sequence[Example], max_length: int, batch_size: int = 32) -> float:
    """Mean over examples of the share of completion tokens (EOS included) that the model's
    greedy next-token choice gets right, teacher-forced. An empty prompt leaves the first
    completion token unscored (nothing predicts it)."""
    pairs = [encode_pair(tok, e.prompt, e.completion, max_length, add_eos=True) for e in examples]
    pairs = [(p, c) if p else (c[:1], c[1:]) for p, c in pairs]
    per_example: list[float] = []
    with _inference(model):
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start:start + batch_size], tok.pad_token_id)
            ids, mask = batch.input_ids.to(_device(model)), batch.attention_mask.to(_device(model))
            pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1).cpu()
            target = batch.labels[:, 1:]  # (B, T-1): position t predicts token t+1
            scored = target != IGNORE
            right = ((pred == target) & scored).sum(-1)
            per_example += (right / scored.sum(-1).clamp(min=1)).tolist()
    return sum(per_example) / len(per_example)


def heldout_score(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                  examples: Sequence[Example], max_length: int) -> float:
    """The 0-1 score of mixed held-out examples (NaN when there are none): accuracy among
    choices for those that have choices (the task's own metric), greedy token accuracy of the
    completion for the others, weighted by their counts."""
    if not examples:
        return float("nan")
    with_choices = [e for e in examples if e.choices]
    without = [e for e in examples if not e.choices]
    total = 0.0
    if with_choices:
        preds = classify_by_likelihood(model, tok, with_choices, max_length)
        total += accuracy(preds, [e.completion for e in with_choices]) * len(with_choices)
    if without:
        total += token_accuracy(model, tok, without, max_length) * len(without)
    return total / len(examples)


def probe_examples(task: Task, n: int) -> list[Example]:
    """`n` of the task's test questions, spread over the split (a facts task lists its questions
    entity by entity: the first `n` would ask about one entity only)."""
    if n <= 0 or not task.test:
        return []
    stride = max(1, len(task.test) // n)
    return list(task.test[::stride][:n])


def probe_answers(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: Sequence[Example],
                  max_length: int, max_new_tokens: int = 8) -> list[dict[str, str]]:
    """What the model says to each example's prompt, for a person to read (R holds the scores):
    its greedy completion up to the first line break, and for a question with choices the choice
    it finds most likely (the one that scores it). One dict per example: question (on one line),
    expected, answer, and chose when it has choices."""
    if not examples:
        return []
    said = generate_greedy(model, tok, [e.prompt for e in examples], max_new_tokens,
                           max_prompt_length=max_length)
    out = [{"question": " ".join(e.prompt.split()), "expected": e.completion.strip(),
            "answer": s.split("\n", 1)[0].strip()} for e, s in zip(examples, said)]
    with_choices = [i for i, e in enumerate(examples) if e.choices]
    if with_choices:
        chosen = classify_by_likelihood(model, tok, [examples[i] for i in with_choices], max_length)
        for i, c in zip(with_choices, chosen):
            out[i]["chose"] = c.strip()
    return out
