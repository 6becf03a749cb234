"""The PEFT adapter directory: its files, the one reader of any PEFT LoRA adapter, tlora's writer and metadata."""
