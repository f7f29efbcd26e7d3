"""Checks across keys and sections of a run config, run once the sections themselves are valid."""

from __future__ import annotations

import dataclasses

from pstar_cli.config.sections import Config, DistributedConfig, split_problem


def cross_key_problems(cfg: Config, problems: list[str]) -> list[str]:
    """Problems between keys. Only sections without problems of their own are checked: a bad value
    has been replaced by its default, and a problem about that default would name a number the
    user never wrote."""
    found = []
    if _clean(problems, "model"):
        found += model_problems(cfg)
    if _clean(problems, "data"):
        from pstar_cli.training.data import data_problems

        found += data_problems(dataclasses.asdict(cfg.data), cfg.train.seq_len)
    if _clean(problems, "train", "distributed"):
        found += train_problems(cfg)
    if _clean(problems, "distributed"):
        found += distributed_problems(cfg.distributed)
    return found


def _clean(problems: list[str], *sections: str) -> bool:
    prefixes = tuple(f"{name}{sep}" for name in sections for sep in ".:")
    return not any(problem.startswith(prefixes) for problem in problems)


def model_problems(cfg: Config) -> list[str]:
    """Size name, shape and vocabulary checks of the model section (the models package decides)."""
    import models
    from pstar_cli.training.data import BYTE_VOCAB_SIZE

    problems = models.model_config_problems(cfg.model_dict())
    if problems:
        return problems
    vocab_size = cfg.model_spec["vocab_size"]
    if cfg.data.kind == "text" and cfg.data.tokenizer is None and vocab_size < BYTE_VOCAB_SIZE:
        return [f"model.vocab_size: data.kind text needs at least {BYTE_VOCAB_SIZE} token ids "
                f"(one per byte value), got {vocab_size}"]
    return []


def train_problems(cfg: Config) -> list[str]:
    train, problems = cfg.train, []
    if train.min_lr > train.lr:
        problems.append(f"train.min_lr: must be <= train.lr ({train.lr}), got {train.min_lr}")
    if (why := split_problem(train.batch_size, cfg.world_size, train.grad_accum)) is not None:
        problems.append(why)
    return problems


def distributed_problems(dist: DistributedConfig) -> list[str]:
    problems = []
    if dist.node_rank >= dist.nnodes:
        problems.append(f"distributed.node_rank: must be < distributed.nnodes ({dist.nnodes}), "
                        f"got {dist.node_rank}")
    if dist.nnodes > 1 and not dist.rdzv_endpoint:
        problems.append("distributed.rdzv_endpoint: required when distributed.nnodes > 1 "
                        "(host:port of node 0, e.g. 10.0.0.1:29500)")
    return problems


