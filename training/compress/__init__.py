"""Model-level rungs: networks made cheaper than the served one (distillation, pruning, quantization-aware training)."""
