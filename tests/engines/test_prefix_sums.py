"""Sequence routing in a flat batch (`engines/prefix_sums.py`) against each request's own
cumulative mean, over steps shaped like vLLM's: a chunked prefill beside a prefill, decodes, a
request that joins on a prefix-cache hit, padding rows. No vLLM here."""

import torch

from sleep_ray.engines.prefix_sums import flat_prefix_means

BLOCK = 4
D = 3


def _reference(tokens: torch.Tensor) -> torch.Tensor:
    """(T, d) -> (T, d): the mean of rows 0..t at row t."""
    return tokens.cumsum(0) / torch.arange(1, len(tokens) + 1)[:, None]


class _Requests:
    """Requests' routing inputs and KV blocks; `step` schedules some tokens of some of them."""

    def __init__(self, lengths: dict[str, int], blocks: dict[str, list[int]], whole_prompts=False):
        self.whole_prompts = whole_prompts
        g = torch.Generator().manual_seed(0)
        self.x = {r: torch.randn(n, D, generator=g) for r, n in lengths.items()}
        self.blocks, self.done = blocks, {r: 0 for r in lengths}
        self.sums = torch.zeros(0, D)
        self.means = {r: torch.full((n, D), float("nan")) for r, n in lengths.items()}

    def share_prefix(self, request: str, source: str, tokens: int) -> None:
        """`request` starts as a prefix-cache hit on `source`'s first `tokens` (whole blocks)."""
        self.x[request][:tokens] = self.x[source][:tokens]
        self.done[request] = tokens

    def step(self, scheduled: dict[str, int], padding: int = 0) -> None:
        names = list(scheduled)
        rows, starts, seq_lens, slots = [], [0], [], []
        for r in names:
            a, b = self.done[r], self.done[r] + scheduled[r]
            rows.append(self.x[r][a:b])
            starts.append(starts[-1] + (b - a))
            seq_lens.append(b)
            slots += [self.blocks[r][p // BLOCK] * BLOCK + p % BLOCK for p in range(a, b)]
        x = torch.cat(rows + [torch.full((padding, D), 7.0)])
        width = max(len(self.blocks[r]) for r in names)
        table = torch.tensor([self.blocks[r] + [0] * (width - len(self.blocks[r])) for r in names])
        means, self.sums = flat_prefix_means(x, torch.tensor(starts), torch.tensor(seq_lens), table,
                                             torch.tensor(slots), BLOCK, self.sums, self.whole_prompts)
        assert torch.equal(means[starts[-1]:], x[starts[-1]:])  # padding untouched
        for i, r in enumerate(names):
            self.means[r][self.done[r]:self.done[r] + scheduled[r]] = means[starts[i]:starts[i + 1]]
            self.done[r] += scheduled[r]


def test_flat_prefix_means_equal_each_requests_own_running_mean():
    reqs = _Requests({"a": 11, "b": 5, "c": 9}, blocks={"a": [3, 0, 5], "b": [1, 6], "c": [3, 2, 4]})
    reqs.step({"a": 6, "b": 3}, padding=2)  # a's prefill in two chunks (6 of 9), b's whole prefill
    reqs.step({"b": 1, "a": 3})  # b decodes; a's second chunk (positions 6-8, a block boundary)
    reqs.share_prefix("c", "a", 4)  # c reuses a's first block (slots 12-15) from the prefix cache
    reqs.step({"a": 1, "c": 4, "b": 1})  # a and b decode beside c's prefill after the cached block
    reqs.step({"c": 1, "a": 1})  # b has left
    for r in ("a", "b", "c"):
        assert reqs.done[r] == len(reqs.x[r])
        torch.testing.assert_close(reqs.means[r][4 if r == "c" else 0:],
                                   _reference(reqs.x[r])[4 if r == "c" else 0:], rtol=1e-6, atol=1e-6)


def test_the_slot_table_grows_and_keeps_what_it_held():
    reqs = _Requests({"a": 3, "b": 2}, blocks={"a": [0], "b": [40]})
    reqs.step({"a": 2})
    assert reqs.sums.shape[0] == 2  # slots 0 and 1 in use
    reqs.step({"b": 2, "a": 1})  # slot 161: the table grows; a's earlier sums survive it
    assert reqs.sums.shape[0] >= 162
    torch.testing.assert_close(reqs.means["a"], _reference(reqs.x["a"]))
    torch.testing.assert_close(reqs.means["b"], _reference(reqs.x["b"]))


def test_whole_prompts_route_a_prefill_on_its_mean_and_decodes_continue_the_running_mean():
    reqs = _Requests({"a": 9, "b": 7}, blocks={"a": [3, 0, 5], "b": [1, 6]}, whole_prompts=True)
    reqs.step({"a": 6, "b": 5}, padding=2)  # two whole prompts: a's 6 tokens, b's 5
    reqs.step({"b": 1, "a": 1})  # decodes
    reqs.step({"a": 2, "b": 1})  # a: two tokens after its prompt (a continuation, not a prompt)
    for r, prompt in (("a", 6), ("b", 5)):
        expected = _reference(reqs.x[r])
        expected[:prompt] = expected[prompt - 1]  # every prompt token routes as the last one
        torch.testing.assert_close(reqs.means[r], expected, rtol=1e-6, atol=1e-6)
