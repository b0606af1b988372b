"""varkd: knowledge distillation for visual autoregressive image models."""
