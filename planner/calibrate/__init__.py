"""`megacpp calibrate`: fit the step-time model's overheads to measured runs and write a profile."""
