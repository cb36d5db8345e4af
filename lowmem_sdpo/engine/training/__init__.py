"""Training one step's LoRA: the trainer (windows, accumulation, clipping, saves), the preference objective,
optimiser and schedule, and the checkpoint that resume restores."""
