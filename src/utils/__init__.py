from src.utils.run import (
    LogHyperparameters,
    check_required,
    extras,
    finish_loggers,
    fixed_mmap_threshold,
    get_metric_value,
    hyperparameters,
    instantiate_callbacks,
    instantiate_loggers,
    quiet_known_noise,
    register_resolvers,
    resolve_ckpt_path,
)

__all__ = [
    "check_required",
    "extras",
    "finish_loggers",
    "fixed_mmap_threshold",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "LogHyperparameters",
    "quiet_known_noise",
    "hyperparameters",
    "register_resolvers",
    "resolve_ckpt_path",
]
