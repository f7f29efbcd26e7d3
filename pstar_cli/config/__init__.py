"""A run's config: the typed tree (sections), how it is loaded and validated (loader), the checks
across keys (checks). Everything reads the `Config` that `load_config` built once."""

from pstar_cli.config.loader import ConfigError, config_from_dict, load_config, parse_yaml, read_yaml_file
from pstar_cli.config.sections import (BatchSplit, Config, ResumeEffect, config_hash, full_config_tree,
                                       resume_effect)

__all__ = ["BatchSplit", "Config", "ConfigError", "ResumeEffect", "config_from_dict", "config_hash",
           "full_config_tree", "load_config", "parse_yaml", "read_yaml_file", "resume_effect"]
