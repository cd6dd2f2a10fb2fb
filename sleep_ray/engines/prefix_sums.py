"""Sequence routing in a flat batch: each token's running prefix mean, carried across steps in a
table indexed by KV-cache slot.

Under `memory.routing: sequence` a token is routed on the mean of its request's routing inputs
up to and including it (`ExpertPool.route_input`). The HF engine keeps that running mean in the
pool between its one-token decoding calls. vLLM hands the model every scheduled token of every
request flattened into one (N, d) batch: prefills (whole or in chunks) beside single decode
tokens, requests joining and leaving between steps. What a token needs from earlier steps is its
request's sum up to the token before the step's first, and vLLM already keeps one place per
(request, position): the KV-cache slot. So the sum up to each token is written into a table at
that token's slot, and a step reads its requests' earlier sums at the slot of the position just
before their first scheduled token (`block_table[r, p // block_size] * block_size + p % block_size`).
A prefix-cache hit reads sums written when the cached blocks were computed; they depend on the
prefix alone, as the cached keys and values do.

Whole-prompt routing (`memory.prompt_routing`, `M.whole_prompt_routing` on the HF side) routes a
prompt's every token on the mean of the whole prompt: a request whose step starts at its first
token holds its whole prompt there, provided the engine neither chunks prefills nor reuses
cached prompt blocks (their keys and values would belong to another prompt's routes). The sums
written stay causal, so the tokens generated after the prompt continue its running mean.
"""

from __future__ import annotations

import torch


def flat_prefix_means(x: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_table: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                      sums: torch.Tensor, whole_prompts: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix means of a flat batch's first `query_start_loc[-1]` tokens, and the slot table.

    x: (N, d) routing inputs, the scheduled tokens of R requests back to back (rows past the
    last request's are padding: returned unchanged). query_start_loc: (R + 1,) where each
    request's tokens start. seq_lens: (R,) each request's length after this step (its earlier
    tokens included). block_table: (R, max_blocks) its KV blocks; slot_mapping: (n,) each
    token's KV slot. sums: (S, d) float32 running sums by slot, grown as needed (returned; the
    caller keeps it). whole_prompts: a request whose step starts at its position 0 routes all
    of this step's tokens on the mean at its last one (a whole prefill). Returns ((N, d) prefix
    means in x's dtype, sums).
    """
    starts, ends = query_start_loc[:-1].long(), query_start_loc[1:].long()
    q_lens = ends - starts
    n = int(ends[-1]) if len(ends) else 0
    if n == 0:
        return x, sums
    request = torch.repeat_interleave(torch.arange(len(q_lens), device=x.device), q_lens)  # (n,)
    first_pos = seq_lens.long() - q_lens  # (R,) the position of each request's first token here
    offset = torch.arange(n, device=x.device) - starts[request]
    position = first_pos[request] + offset  # (n,)
    slots = slot_mapping[:n].long()
    need = int(slots.max()) + 1
    if need > sums.shape[0]:  # the table grows with the slots in use (one row per KV slot)
        grown = torch.zeros(max(need, 2 * sums.shape[0]), x.shape[-1], dtype=torch.float32,
                            device=x.device)
        grown[:sums.shape[0]] = sums
        sums = grown
    # Each request's sum before this step: at the slot of the position before its first token.
    before = (first_pos - 1).clamp_min(0)
    rows = torch.arange(len(q_lens), device=x.device)
    prev_slot = block_table[rows, before // block_size].long() * block_size + before % block_size
    prev = torch.where((first_pos > 0)[:, None], sums[prev_slot.clamp(0, sums.shape[0] - 1)],
                       torch.zeros(1, x.shape[-1], dtype=torch.float32, device=x.device))  # (R, d)
    # Within the step: a cumulative sum over the flat batch, less its value where each request
    # starts (float64, so long batches lose nothing to the subtraction).
    csum = torch.cat([torch.zeros(1, x.shape[-1], dtype=torch.float64, device=x.device),
                      x[:n].double().cumsum(0)])
    total = (csum[1:] - csum[starts][request]).float() + prev[request]  # (n, d)
    sums[slots] = total
    if whole_prompts:  # a prefill from position 0 routes as its last token
        last = total[ends - 1][request]  # (n, d) each token's request's sum at its last token
        whole = (first_pos == 0)[request]
        total = torch.where(whole[:, None], last, total)
        position = torch.where(whole, (q_lens - 1)[request], position)
    means = x.clone()
    means[:n] = (total / (position + 1).to(total.dtype)[:, None]).to(x.dtype)
    return means, sums
