"""What autograd keeps per token for each block, measured on CPU against planner/cost/blocks.py.

    python benchmarks/activation_audit.py SPEC.yaml [--json OUT]

Builds the spec's first pipeline stage with the runtime worker (megatron-core local modules, one
gloo rank, bf16 weights on CPU; with --cuda one rank on the GPU, which M blocks need: their scan
and conv kernels exist only for CUDA), runs one micro-batch forward under
`torch.autograd.graph.saved_tensors_hooks`, and charges every storage autograd saves to the block
whose forward saved it first. Parameters, the causal mask and the rotary table (allocated once,
not per micro-batch), the embedding and the output head are left out. Prints, per block letter, the measured bytes per token next to
`blocks.block_activation_bytes`. The spec must fit on one rank with TP = CP = EP = 1 (pin the
axes in its `parallel` section); the layout's sizes are what the formula is evaluated at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def audit(spec: dict[str, Any], cuda: bool = False) -> dict[str, Any]:
    """Saved bytes per token of every block in the first stage, with the formula's figure."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    from megacpp.planner.cost.activations import block_activation_bytes
    from megacpp.planner.plan import build_plan
    from megacpp.planner.spec.loading import spec_from_dict
    from megacpp.runtime.worker.data import SyntheticChain, microbatches
    from megacpp.runtime.worker.distributed import shutdown
    from megacpp.runtime.worker.job import Job
    from megacpp.runtime.worker.model import causal_mask
    from megacpp.runtime.worker.run import build_rank

    plan = build_plan(spec_from_dict(spec))
    if not plan.candidates:
        raise SystemExit(f"activation_audit: the planner accepts no layout for {spec.get('name')}: {plan.rejected.model_dump()}")
    job = Job(plan=plan, candidate_index=0)
    lay = job.layout
    if (lay.tp, lay.cp, lay.ep, job.world_size) != (1, 1, 1, 1):
        raise SystemExit("activation_audit: pin parallel.tp, cp and ep to 1 on one GPU (the audit runs one CPU rank)")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    # bf16 as the GPU runs train: the same dtypes make the same saved tensors
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(0)
    built = build_rank(job, seed=0, cuda=cuda, bf16=True)
    config, (chunk,) = built.config, built.chunks  # one rank, one pipeline stage
    if cuda:
        chunk.cuda()  # as get_model does: torch norms are built on the CPU
    model = Float16Module(config, chunk).train()  # as the worker wraps it (train.py)
    seq = job.spec.training.seq_length
    source = SyntheticChain(job.spec.model.vocab_size, 0, device)
    batch = next(microbatches(source, seed=0, dp_rank=ps.get_data_parallel_rank(), step=0, count=1,
                              micro_batch_size=lay.micro_batch_size, seq_length=seq))
    once = {t.untyped_storage().data_ptr() for t in model.parameters()}
    once.add(causal_mask(seq, device).untyped_storage().data_ptr())
    if chunk.rotary_pos_emb is not None:
        once.add(chunk.rotary_pos_emb(seq).untyped_storage().data_ptr())

    current = {"block": -1}  # -1: outside every block (the embedding, the output head and loss)
    for i, layer in enumerate(chunk.layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: current.update(block=i))
        layer.register_forward_hook(lambda _m, _a, _o: current.update(block=-1))
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, block that saved it first)
    # the storages charged, held until the audit ends: a saved storage whose graph the forward
    # drops is freed, and the allocator may hand its address to a later one, which keying by
    # address would then skip (the E block of tests/test_activation_audit.py's rope-gqa-gated came
    # out 8-16 B per token short or not with the heap's layout, e.g. under MALLOC_MMAP_THRESHOLD_)
    held: list[torch.UntypedStorage] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in once and ptr not in saved and storage.nbytes():
            saved[ptr] = (storage.nbytes(), current["block"])
            held.append(storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["tokens"], batch["position_ids"], batch["labels"])
    per_block: dict[int, int] = defaultdict(int)
    for nbytes, block in saved.values():
        per_block[block] += nbytes
    shutdown()

    ctx = job.ctx
    tokens = lay.micro_batch_size * seq
    letters = job.candidate.stages[0].blocks
    rows: dict[str, dict[str, float]] = {}
    for i, letter in enumerate(letters):
        row = rows.setdefault(letter, {"blocks": 0, "measured": 0.0})
        row["blocks"] += 1
        row["measured"] += per_block[i] / tokens
    for letter, row in rows.items():
        row["measured"] /= row["blocks"]
        row["formula"] = block_activation_bytes(ctx, letter, lay)
        row["error"] = row["formula"] / row["measured"] - 1 if row["measured"] else 0.0
    return {"name": job.spec.name, "tokens": tokens, "recompute": job.spec.training.recompute, "per_letter": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--cuda", action="store_true", help="build and run the rank on the GPU (needed for M blocks)")
    args = ap.parse_args(argv)
    import yaml

    result = audit(yaml.safe_load(args.spec.read_text()), cuda=args.cuda)
    print(f"{result['name']} ({result['tokens']} tokens, recompute {result['recompute']}): saved bytes per token per block")
    print(f"{'block':>5} {'measured':>10} {'formula':>10} {'error':>7}")
    for letter, row in result["per_letter"].items():
        print(f"{letter:>5} {row['measured']:10.0f} {row['formula']:10.0f} {row['error']:+7.1%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
