"""The math of RL post-training, one floor below the LightningModules and importable without Lightning: advantages
and rewards (`advantages`), policy losses, aggregation and KL estimators (`loss`), the micro-batch planner
(`planner`), and the checks of a recipe's options (`recipe`). `genlight.lightning_modules.rlvr.RLVRModule` orchestrates a
step with them."""
