"""The in-job runtime worker: builds this rank's megatron-core model chunks from a megacpp plan and
trains them (GPU) or only constructs them (CPU), then writes a run report.

Entry point: `python -m megacpp.runtime.worker` (see __main__.py). Importing this package does
not import torch or megatron; the submodules do.
"""
