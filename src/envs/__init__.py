"""Tools and environments for multi-turn RL, on TRL's `environment_factory` contract (`tools`)."""
