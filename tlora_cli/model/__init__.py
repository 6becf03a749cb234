"""The base model: where it is (a folder, a hub id, the built-in one), its checkpoint read lazily, its targets."""
