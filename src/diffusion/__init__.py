"""The diffusion math, importable without Lightning: forward processes (`processes.py`) and the samplers that
reverse them (`samplers.py`, one class each, in the shape of diffusers' schedulers). `DDPMModule` orchestrates."""
