"""The activation formulas against what autograd actually keeps in megatron-core's local modules.

benchmarks/activation_audit.py builds one stage with the runtime worker on CPU (bf16, one gloo
rank), runs a forward under saved-tensor hooks and charges every saved storage to its block. The
specs cover rotary and learned positions, GQA and plain multi-head attention, gated and plain
MLPs, top-2 with a shared expert and top-1 routing, the R block, and Megatron's fused bias-SwiGLU and
bias-dropout-add against the unfused ops. LayerNorm keeps the same
tensors on CPU and GPU; torch's CPU RMSNorm is a composite that keeps fp32 copies the fused CUDA
kernel does not, so the audit specs use LayerNorm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("megatron.core", reason="megatron-core is installed by `make test`")

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "training": {"seq_length": 512, "global_batch_size": 2, "micro_batch_size": 2},
    "cluster": {"preset": "h200-sxm-8", "nodes": 1, "gpus_per_node": 1},
    "backend": {"transformer_engine": False},
    "parallel": {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1},
}
SPECS = {
    "rope-gqa-gated": {
        "pattern": "AEDA", "hidden_size": 256, "vocab_size": 512, "normalization": "layernorm", "position_embedding": "rope",
        "attention": {"num_heads": 8, "num_query_groups": 2, "head_dim": 32},
        "mlp": {"ffn_hidden_size": 768, "gated": True},
        "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 384, "gated": True, "dispatcher": "allgather",
                "shared_expert_ffn_hidden_size": 256},
    },
    "learned-mha-plain": {
        "pattern": "ADERA", "hidden_size": 256, "vocab_size": 512, "normalization": "layernorm", "position_embedding": "learned",
        "attention": {"num_heads": 4, "num_query_groups": 4, "head_dim": 64},
        "mlp": {"ffn_hidden_size": 1024, "gated": False},
        "moe": {"num_experts": 8, "top_k": 1, "ffn_hidden_size": 512, "gated": False, "dispatcher": "allgather"},
        "recurrent": {"num_heads": 8, "head_dim": 32},
    },
}
# the same blocks without Megatron's fusions (backend.fusions false): the unfused SwiGLU keeps 5f
SPECS["rope-gqa-gated-unfused"] = SPECS["rope-gqa-gated"]
UNFUSED = {"rope-gqa-gated-unfused"}


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("audit")
    procs = {}
    for port, (name, model) in enumerate(SPECS.items(), start=29541):
        spec = tmp / f"{name}.yaml"
        backend = {**BASE["backend"], "fusions": name not in UNFUSED}
        spec.write_text(yaml.safe_dump({"name": name, "model": model, **BASE, "backend": backend}))
        env = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(ROOT / "benchmarks" / "activation_audit.py"), str(spec), "--json", str(tmp / f"{name}.json")]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    failed = {name: logs[name][-3000:] for name, proc in procs.items() if proc.returncode != 0}
    assert not failed, failed
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in SPECS}


@pytest.mark.parametrize("name", SPECS)
def test_every_block_keeps_what_the_formula_says(audits, name):
    rows = audits[name]["per_letter"]
    assert set(rows) == set(SPECS[name]["pattern"])
    for letter, row in rows.items():
        # LayerNorm keeps its mean and rstd in bf16 on CPU (fp32 on GPU): 4 B per token per norm
        assert abs(row["formula"] - row["measured"]) <= 8 + 0.002 * row["measured"], (letter, row)


def test_attention_scores_dominate_unfused_attention(audits):
    """The s x s softmax output (fp32) and its bf16 copy are most of what unfused attention keeps."""
    row = audits["rope-gqa-gated"]["per_letter"]["A"]
    heads, seq = 8, 512
    assert row["measured"] > 6 * heads * seq
