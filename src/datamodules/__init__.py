"""DataModules: the language-model rows of every algorithm (`lm.py`), the tasks that make them (arithmetic, reasoning-gym, files), and the diffusion data (digits, 2-D points, image folders)."""
