"""A short, frugal LoRA trainer: LoRA weights hooked onto a loaded model, batches with gradient accumulation,
AdamW with a warm-up, data-parallel over torchrun's ranks. The task-specific-direction methods' pre-launch runs
on it."""
