"""`megacpp calibrate`: fit the step-time model's overheads to measured runs and write a profile.

reports (run reports decoded into the model's terms) -> lstsq (least squares) -> fit (the
overheads, the small kernels' traffic, the synchronised share) -> profile (the file plans read).
"""
