from src.utils.run import (
    check_required,
    extras,
    finish_loggers,
    get_metric_value,
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
    register_resolvers,
    resolve_ckpt_path,
)

__all__ = [
    "check_required",
    "extras",
    "finish_loggers",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_hyperparameters",
    "register_resolvers",
    "resolve_ckpt_path",
]
