"""Checkpoint readers (safetensors, shards, torch, restricted unpickler) and a streaming writer."""
