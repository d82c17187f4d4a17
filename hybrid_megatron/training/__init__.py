"""Training engine: parallel setup, loop, optimizer, checkpoints, schedules."""
