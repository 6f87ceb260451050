"""Pure training pieces (noise, losses, DeepSpeed config, checkpoint files). Never imports ray or deepspeed."""
