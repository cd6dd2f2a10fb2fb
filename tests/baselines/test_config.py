"""BaselineConfig validation and the LoRA rank matched to the memory budget."""

import pytest

from sleep_ray.baselines.config import BaselineConfig
from sleep_ray.baselines.run import matched_lora_rank
from sleep_ray.config import ConfigError


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="baseline.ewc_gamma"):
        BaselineConfig(ewc_gamma=1.5)
    with pytest.raises(ConfigError, match="baseline.replay_capacity"):
        BaselineConfig(replay_capacity=0)
    with pytest.raises(ConfigError, match="baseline.lora_rank"):
        BaselineConfig(lora_rank=0)


def test_matched_rank_is_the_closest():
    # Tiny sizes with head_dim 16: fast expert = 2 layers * (64*8 + 8*64) = 2048; LoRA on q_proj
    # (64 -> 64) and v_proj (64 -> 32) costs 2 * (128 + 96) = 448 per rank.
    # r = 4: 1792 (256 short), r = 5: 2240 (192 over) -> 5.
    assert matched_lora_rank(2048, 448) == 5
    assert matched_lora_rank(100, 448) == 1  # never below rank 1
    assert matched_lora_rank(300, 200) == 1  # tie (100 vs 100): the smaller rank


def test_command_line_overrides():
    from sleep_ray.baselines.__main__ import parse_baseline

    bcfg = parse_baseline(["ewc_lambda=10.0", "lora_targets=[q_proj, k_proj]", "lora_rank=3"])
    assert (bcfg.ewc_lambda, bcfg.lora_targets, bcfg.lora_rank) == (10.0, ("q_proj", "k_proj"), 3)
    with pytest.raises(ConfigError, match="ewc_lamda"):
        parse_baseline(["ewc_lamda=10"])
