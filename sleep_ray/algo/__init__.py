"""The math of Sleep as pure functions (torch only; no ray, vllm or deepspeed).

divergence  generalized JSD between teacher and student, the seeding lambda mix (METHOD §4)
imitation   Learning to Imitate: prefix cuts, rewards, group baseline, policy gradient (§4)
importance  per-sample SFT gradient norms of dreams, batched with torch.func (§5 step 2)
selection   top-k + random dream selection, ReST-EM filter, tau-improvement reward (§5)
cms         the CMS update rule (§2)
"""
