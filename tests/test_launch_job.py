"""Real training jobs from the spec: data, tokenizer, the schedule both engines share, checkpoints
resumed on requeue, extra Megatron-LM flags, environment and Slurm settings, and user text that
reaches the scripts quoted and never executed.

Regenerate the golden files after an intended change with MEGACPP_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from megacpp.planner.errors import LaunchError, SpecError
from megacpp.planner.megatron.args import TrainOptions, known_flags
from megacpp.planner.megatron.render import TE_IMPORT_CHECK, RenderOptions, render_launch
from megacpp.planner.plan import build_plan
from megacpp.planner.spec.loading import load_spec, spec_from_dict
from megacpp.planner.spec.schedule import run_schedule
from tests.conftest import ROOT, TINY_DENSE, TINY_MOE, make_spec

GOLDEN = ROOT / "tests" / "golden" / "launch"
REAL_JOB = GOLDEN / "real-job.yaml"
UPDATE = os.environ.get("MEGACPP_UPDATE_GOLDEN") == "1"
SCRIPT = {"torchrun": "launch.sh", "slurm": "job.sbatch"}
CLI = [sys.executable, "-m", "megacpp.runtime.cli"]


def _render(plan, target: str = "torchrun", engine: str = "megatron-lm", steps: int | None = None) -> str:
    opts = RenderOptions(target=target, engine=engine, train=TrainOptions(train_iters=steps))
    return render_launch(plan, opts)[SCRIPT[target]]


def _megatron_words(text: str) -> list[str]:
    """The words of the Megatron-LM command, from the entry point on (the Apex probe's variable left out)."""
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    return [w for w in words[next(i for i, w in enumerate(words) if "/pretrain_" in w):] if w != "$NO_APEX_FUSION"]


def _flags(words: list[str]) -> dict[str, list[str]]:
    """Each --flag of a command with the words after it."""
    out: dict[str, list[str]] = {}
    for word in words:
        if word.startswith("--"):
            flag = word
            out.setdefault(flag, [])
        elif out:
            out[flag].append(word)
    return out


def _spec(**keys: Any):
    return make_spec(TINY_DENSE, **keys)


def _plan(**keys: Any):
    return build_plan(_spec(**keys), top=1)


@pytest.mark.parametrize("target", ["torchrun", "slurm"])
def test_real_job_golden(target):
    text = _render(build_plan(load_spec(REAL_JOB), top=1), target)
    path = GOLDEN / f"real-job.megatron-lm.{target}.txt"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with MEGACPP_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("dialect", ["core_v0.16", "main"])
@pytest.mark.parametrize("target", ["torchrun", "slurm"])
def test_real_job_renders_every_setting_with_flags_the_parser_knows(target, dialect):
    spec = load_spec(REAL_JOB, overrides=[f"backend.megatron={dialect}"])
    text = _render(build_plan(spec, top=1), target)
    words = _megatron_words(text)
    flags = _flags(words)
    assert set(flags) <= known_flags(dialect), set(flags) - known_flags(dialect)
    assert "--mock-data" not in flags
    assert flags["--data-path"] == ["0.7", "/data/web_text_document", "0.3", "/data/code_text_document"]
    assert flags["--split"] == ["98,1,1"]
    assert flags["--tokenizer-type"] == ["HuggingFaceTokenizer"] and flags["--tokenizer-model"] == ["/models/tokenizer"]
    # 10B tokens at 64 x 4096 tokens a step
    assert flags["--train-iters"] == ["38147"] and "--lr-decay-iters" not in flags
    assert flags["--lr"] == ["0.0003"] and flags["--min-lr"] == ["3e-05"] and flags["--lr-warmup-iters"] == ["2000"]
    assert flags["--lr-decay-style"] == ["cosine"] and flags["--eval-interval"] == ["1000"] and flags["--eval-iters"] == ["10"]
    assert flags["--log-interval"] == ["10"]
    assert flags["--save"] == ["/ckpt/run1"] and flags["--save-interval"] == ["1000"]
    assert flags["--load"] == ["$MEGACPP_LOAD"]  # chosen by the script: the save folder once it holds a checkpoint
    assert flags["--adam-beta2"] == ["0.95"] and flags["--tensorboard-dir"] == ["/logs/run1"]
    assert "--exit-signal-handler" in flags
    assert "export NCCL_IB_HCA=mlx5" in text and "export NCCL_DEBUG=WARN" in text
    if target == "slurm":
        for line in ("--partition=batch", "--account=proj", "--time=04:00:00", "--qos=normal", "--constraint=h100", "--requeue"):
            assert f"#SBATCH {line}\n" in text
        srun = shlex.split(next(line for line in text.splitlines() if line.startswith("srun ")).rstrip("\\"))
        assert "--container-image=nvcr.io#nvidia/pytorch:25.09-py3" in srun
        assert "--container-mounts=/data:/data:ro,/ckpt:/ckpt,/models:/models:ro,/logs:/logs" in srun


def test_without_data_the_launch_stays_the_mock_benchmark():
    flags = _flags(_megatron_words(_render(_plan())))
    assert "--mock-data" in flags and flags["--tokenizer-type"] == ["NullTokenizer"]
    assert not {"--data-path", "--split", "--save", "--load", "--lr-warmup-iters", "--lr-decay-iters"} & set(flags)
    assert flags["--train-iters"] == ["100"] and flags["--eval-interval"] == ["100"]


def test_mock_data_with_a_real_tokenizer():
    data = {"mock": True, "tokenizer": {"type": "GPT2BPETokenizer", "vocab_file": "/t/vocab.json", "merge_file": "/t/merges.txt"}}
    flags = _flags(_megatron_words(_render(_plan(data=data))))
    assert "--mock-data" in flags and "--data-path" not in flags
    assert flags["--vocab-file"] == ["/t/vocab.json"] and flags["--merge-file"] == ["/t/merges.txt"]


def test_data_paths_without_weights():
    flags = _flags(_megatron_words(_render(_plan(data={"paths": ["/d/a_text_document", "/d/b_text_document"]}))))
    assert flags["--data-path"] == ["/d/a_text_document", "/d/b_text_document"] and flags["--split"] == ["99,1,0"]


@pytest.mark.parametrize("target", ["torchrun", "slurm"])
def test_checkpoints_resume_from_the_save_folder(target):
    """Without a load folder the job loads from its save folder; on Slurm the job is requeued."""
    text = _render(_plan(checkpoint={"save": "/ckpt/a", "interval": 50}), target)
    flags = _flags(_megatron_words(text))
    assert flags["--save"] == flags["--load"] == ["/ckpt/a"] and flags["--save-interval"] == ["50"]
    assert "MEGACPP_LOAD" not in text
    assert ("#SBATCH --requeue\n" in text) is (target == "slurm")
    only_load = _render(_plan(checkpoint={"load": "/ckpt/base", "load_optimizer": False, "load_rng": False}), target)
    flags = _flags(_megatron_words(only_load))
    assert flags["--load"] == ["/ckpt/base"] and "--save" not in flags and "--requeue" not in only_load
    assert "--no-load-optim" in flags and "--no-load-rng" in flags


@pytest.mark.parametrize("saved", [False, True])
def test_a_restarted_job_loads_its_own_checkpoint_once_it_has_one(saved, tmp_path):
    save, base = tmp_path / "run", tmp_path / "base"
    save.mkdir()
    if saved:
        (save / "latest_checkpointed_iteration.txt").write_text("100\n")
    argv = _run(_plan(checkpoint={"save": str(save), "load": str(base)}), "torchrun", tmp_path)
    assert argv[argv.index("--load") + 1] == str(save if saved else base)


def test_launch_steps_is_a_short_run_of_the_specs_schedule():
    plan = _plan(training={**TINY_DENSE["training"], "train_iters": 1000, "warmup_iters": 10})
    full = _flags(_megatron_words(_render(plan)))
    assert full["--train-iters"] == ["1000"] and "--lr-decay-iters" not in full
    short = _flags(_megatron_words(_render(plan, steps=20)))
    assert short["--train-iters"] == ["20"] and short["--lr-decay-iters"] == ["1000"] and short["--lr-warmup-iters"] == ["10"]
    worker = shlex.split(_render(plan, engine="megacpp", steps=20).rsplit("megacpp.runtime.worker", 1)[1])
    assert worker[worker.index("--steps") + 1] == "20"
    assert run_schedule(plan.spec_model.training).iters == 1000


def test_a_warmup_longer_than_the_run_is_refused():
    plan = _plan(training={**TINY_DENSE["training"], "warmup_iters": 200})
    with pytest.raises(LaunchError, match="warmup_iters=200.*100 iterations"):
        _render(plan)
    assert "--lr-warmup-iters 200" in _render(plan, steps=500)
    with pytest.raises(SpecError, match="warmup_iters=50 must be below the 50 iterations"):
        _spec(training={**TINY_DENSE["training"], "train_iters": 50, "warmup_iters": 50})


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "inverse-square-root", "WSD"])
def test_both_engines_train_with_one_schedule(style):
    """The worker's scheduler follows the curve Megatron-LM builds from the rendered flags
    (training.py get_optimizer_param_scheduler counts samples, the worker optimizer steps)."""
    pytest.importorskip("megatron.core", reason="megatron-core is installed by `make test`")
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megacpp.runtime.worker.train import scheduler_options

    training = {**TINY_DENSE["training"], "train_iters": 60, "warmup_iters": 7, "lr": 1e-3, "min_lr": 1e-5,
                "lr_decay_style": style, "weight_decay": 0.05}
    if style == "WSD":
        training |= {"lr_wsd_decay_iters": 20, "lr_wsd_decay_style": "cosine"}
    plan = _plan(training=training)
    flags = _flags(_megatron_words(_render(plan)))
    gbs, iters = training["global_batch_size"], int(flags["--train-iters"][0])
    wd = float(flags["--weight-decay"][0])

    class Optimizer:
        def __init__(self) -> None:
            self.param_groups: list[dict] = [{}]

    megatron_lm, worker = Optimizer(), Optimizer()
    lm = OptimizerParamScheduler(
        megatron_lm, init_lr=0.0, max_lr=float(flags["--lr"][0]), min_lr=float(flags["--min-lr"][0]),
        lr_warmup_steps=int(flags.get("--lr-warmup-iters", ["0"])[0]) * gbs,
        lr_decay_steps=int(flags.get("--lr-decay-iters", [str(iters)])[0]) * gbs,
        lr_decay_style=flags["--lr-decay-style"][0], start_wd=wd, end_wd=wd, wd_incr_steps=iters * gbs,
        wd_incr_style="constant", lr_wsd_decay_style=flags.get("--lr-wsd-decay-style", [None])[0],
        wsd_decay_steps=int(flags["--lr-wsd-decay-iters"][0]) * gbs if "--lr-wsd-decay-iters" in flags else None)
    ours = OptimizerParamScheduler(worker, **scheduler_options(run_schedule(plan.spec_model.training, iters)))
    for _ in range(iters):
        assert worker.param_groups[0]["lr"] == pytest.approx(megatron_lm.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        assert worker.param_groups[0]["weight_decay"] == megatron_lm.param_groups[0]["weight_decay"] == 0.05
        lm.step(increment=gbs)
        ours.step(increment=1)


def test_wsd_needs_its_decay_iters_and_fits_the_schedule():
    with pytest.raises(SpecError, match="lr_decay_style WSD needs lr_wsd_decay_iters"):
        _spec(training={**TINY_DENSE["training"], "lr_decay_style": "WSD"})
    with pytest.raises(SpecError, match="lr_wsd_decay_iters is used only with lr_decay_style WSD"):
        _spec(training={**TINY_DENSE["training"], "lr_wsd_decay_iters": 5})
    with pytest.raises(SpecError, match="warmup_iters=10 plus lr_wsd_decay_iters=50 exceed the 50 iterations"):
        _spec(training={**TINY_DENSE["training"], "train_iters": 50, "warmup_iters": 10, "lr_decay_style": "WSD",
                        "lr_wsd_decay_iters": 50})
    plan = _plan(training={**TINY_DENSE["training"], "lr_decay_style": "WSD", "lr_wsd_decay_iters": 150})
    with pytest.raises(LaunchError, match="lr_wsd_decay_iters=150.*100 iterations launched"):
        _render(plan)
    words = " ".join(_megatron_words(_render(plan, steps=500)))
    assert "--lr-wsd-decay-style exponential --lr-wsd-decay-iters 150" in words


def test_adam_betas_and_eps_are_stated_once_for_both_engines():
    """Megatron-LM's own --adam-beta2 default is 0.999; the spec's betas go to both engines."""
    def words(plan) -> str:
        return " ".join(_megatron_words(_render(plan)))

    assert "--adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-08" in words(_plan())
    training = {**TINY_DENSE["training"], "adam_beta2": 0.999, "adam_eps": 1e-6}
    sched = run_schedule(_spec(training=training).training)
    assert (sched.adam_beta1, sched.adam_beta2, sched.adam_eps) == (0.9, 0.999, 1e-6)
    assert "--adam-beta2 0.999 --adam-eps 1e-06" in words(_plan(training=training))
    with pytest.raises(SpecError, match="training.adam_beta2"):
        _spec(training={**TINY_DENSE["training"], "adam_beta2": 1.0})


@pytest.mark.parametrize("extra,message", [
    (["--not-a-megatron-flag", "1"], "--not-a-megatron-flag is not a flag of Megatron-LM core_v0.16"),
    (["--tensorboard-dirr", "/x"], "did you mean '--tensorboard-dir'"),
    (["--tensor-model-parallel-size", "4"], "--tensor-model-parallel-size would change what megacpp renders from the plan"),
    (["--sequence-parallel"], "--sequence-parallel would change"),
    (["--num-layers=8"], "--num-layers would change"),
    (["--no-create-attention-mask-in-dataloader"], "would change"),
    (["--lr", "1e-3"], "--lr is set from training.lr"),
    (["--adam-beta2", "0.999"], "--adam-beta2 is set from training.adam_beta2"),
    (["--lr-wsd-decay-iters", "10"], "training.lr_wsd_decay_iters"),
    (["--data-path", "/d/x"], "--data-path is set from data.blend or data.paths"),
    (["--save-interval", "5"], "checkpoint.interval"),
    (["--no-rope-fusion"], "backend.fusions"),
    (["--exit-signal-handler", "--exit-signal-handler"], "--exit-signal-handler is given twice"),
])
def test_an_extra_flag_is_checked_against_the_parser_and_the_plan(extra, message):
    plan = _plan(launch={"extra_args": extra})
    with pytest.raises(LaunchError, match=message.replace("(", r"\(")):
        _render(plan)


def test_an_extra_flag_may_restate_megatron_lms_logging():
    """The DESIGN.md example: --log-interval through extra_args replaces megacpp's own value."""
    words = _megatron_words(_render(_plan(launch={"extra_args": ["--log-interval", "10", "--eval-iters=5"]})))
    assert words.count("--log-interval") == 1 and words[words.index("--log-interval") + 1] == "10"
    assert "--eval-iters=5" in words and "--eval-iters" not in words
    with pytest.raises(LaunchError, match="restates training.log_interval=5"):
        _render(_plan(training={**TINY_DENSE["training"], "log_interval": 5}, launch={"extra_args": ["--log-interval", "10"]}))


def test_the_runtime_engine_says_what_it_leaves_to_megatron_lm():
    text = _render(build_plan(load_spec(REAL_JOB), top=1), "slurm", engine="megacpp")
    assert "# data, checkpoint, launch.extra_args: read by Megatron-LM only" in text
    assert "export NCCL_IB_HCA=mlx5" in text and "#SBATCH --partition=batch" in text and "--container-image=" in text
    assert "megacpp.runtime.worker" in text and "--steps 38147" in text
    assert "--requeue" not in text  # the runtime saves nothing to resume from


def test_launch_env_may_not_take_the_scripts_own_variables():
    with pytest.raises(LaunchError, match="launch.env: MASTER_PORT is set by the launch script itself"):
        _render(_plan(launch={"env": {"MASTER_PORT": "1234"}}))


@pytest.mark.parametrize("key,value,message", [
    ("launch.slurm.partition", "batch\n#SBATCH --wrap=touch PWNED", "is not a Slurm partition"),
    ("launch.slurm.account", "proj; touch PWNED", "is not a Slurm account"),
    ("launch.slurm.time", "$(touch PWNED)", "is not a Slurm time"),
    ("launch.slurm.constraint", 'h100" --wrap="x', "is not a Slurm constraint"),
    ("launch.slurm.time", 14400, "quote the time"),
    ("launch.env", {"BAD NAME": "x"}, "not an environment variable name"),
    ("launch.env", {"$(touch PWNED)": "x"}, "not an environment variable name"),
    ("launch.extra_args", ["$(touch PWNED)"], "must start with a --flag"),
    ("launch.extra_args", ["--log-interval", "--", "x"], "bare '--'"),
    ("launch.slurm.container_mounts", ["/a:/a,/etc:/etc"], "holds a comma"),
    ("data", {"paths": ["--mock-data"]}, "starts with '-'"),
    ("checkpoint", {"save": "-x"}, "starts with '-'"),
    ("data", {"paths": ["/d/x"], "tokenizer": {"type": "SentencePieceTokenizer"}}, "needs model"),
    ("data", {"paths": ["/d/x"], "split": "98,1,1; touch PWNED"}, "is not train,validation,test proportions"),
    ("data", {"blend": [[0.5, "/d/a"]], "paths": ["/d/b"]}, "blend and paths both given"),
    ("checkpoint", {"interval": 10, "load": "/c"}, "saves to checkpoint.save"),
    ("training", {**TINY_DENSE["training"], "train_iters": 10, "train_tokens": 10}, "train_iters or train_tokens, not both"),
])
def test_spec_errors_name_the_key(key, value, message):
    with pytest.raises(SpecError, match=f"{key.split('.')[0]}.*{message}".replace("(", r"\(").replace("$", r"\$")):
        _spec(**{key: value})


def test_a_learning_rate_written_as_yaml_reads_it():
    """YAML 1.1 reads 3e-4 (no dot) as text; the spec takes it as the number."""
    spec = spec_from_dict({**yaml.safe_load(REAL_JOB.read_text()), "training": {
        **yaml.safe_load(REAL_JOB.read_text())["training"], "lr": "1e-4", "min_lr": "1e-5"}})
    assert (spec.training.lr, spec.training.min_lr) == (1e-4, 1e-5)


# --- hostile text: quoted, never executed ---

HOSTILE = ["$(touch PWNED)", "`touch PWNED`", 'x"; touch PWNED; echo "', "a'b; touch PWNED", "l1\ntouch PWNED",
           "${IFS}touch${IFS}PWNED", ";touch PWNED&"]


def _fake_bin(tmp: Path) -> Path:
    """torchrun/srun/scontrol stand-ins that record their argv and environment instead of launching."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = 'printf "%s\\0" "$@" > "$ARGV_OUT"; printf "%s" "$HOSTILE_ENV" > "$ENV_OUT"'
    for name, body in {"torchrun": record, "srun": record, "scontrol": "echo node1"}.items():
        p = bin_dir / name
        p.write_text(f"#!/usr/bin/env bash\n{body}\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(plan, target: str, tmp: Path, engine: str = "megatron-lm") -> list[str]:
    """Run the rendered script with the stand-ins; the argv torchrun (or srun) got."""
    files = render_launch(plan, RenderOptions(target=target, engine=engine))
    script = tmp / "run" / SCRIPT[target]
    script.parent.mkdir(exist_ok=True)
    script.write_text(files[script.name])
    env = {**os.environ, "PATH": f"{_fake_bin(tmp)}:{os.environ['PATH']}", "ARGV_OUT": str(tmp / "argv"),
           "ENV_OUT": str(tmp / "env"), "MEGATRON_LM": str(tmp / "mlm"), "SLURM_JOB_NODELIST": "node1",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "7"}
    proc = subprocess.run(["bash", str(script)], cwd=script.parent, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return (tmp / "argv").read_text().split("\0")[:-1]


def test_only_local_module_jobs_that_call_te_anyway_check_for_it():
    """megatron-core 0.16's MoE router and the layernorm recompute call Transformer Engine even with
    local modules (seen on an H100 without TE: NameError in the first step); other jobs do not ask."""
    def checks(base: dict[str, Any], **keys: Any) -> bool:
        return TE_IMPORT_CHECK in _render(build_plan(make_spec(base, **keys), top=1))

    assert checks(TINY_MOE)
    assert checks(TINY_DENSE, **{"training.recompute": "selective", "training.recompute_modules": ["layernorm", "mlp"]})
    assert not checks(TINY_DENSE)
    assert not checks(TINY_DENSE, **{"training.recompute": "selective", "training.recompute_modules": ["mlp"]})
    assert not checks(TINY_MOE, **{"backend.megatron": "main"})  # main defines the router's GEMM without TE
    assert not checks(TINY_MOE, **{"backend.transformer_engine": True})  # TE's modules import it anyway


@pytest.mark.parametrize("te_imports", [False, True])
def test_a_job_that_needs_te_stops_before_torchrun_where_it_does_not_import(te_imports, tmp_path):
    """Where Transformer Engine does not import, the launch stops at once with one line saying why
    and what to change, instead of a NameError after the model is built; where it does, it starts."""
    bin_dir = _fake_bin(tmp_path)
    python = bin_dir / "python3"  # stands in for the host's Python: `import transformer_engine` passes or fails
    python.write_text(f"#!/usr/bin/env bash\nexit {0 if te_imports else 1}\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    script = tmp_path / "run" / "launch.sh"
    script.parent.mkdir()
    script.write_text(_render(build_plan(make_spec(TINY_MOE), top=1)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv"),
           "ENV_OUT": str(tmp_path / "env"), "MEGATRON_LM": str(tmp_path / "mlm")}
    proc = subprocess.run(["bash", str(script)], cwd=script.parent, env=env, capture_output=True, text=True, timeout=30)
    if te_imports:
        assert proc.returncode == 0 and (tmp_path / "argv").exists(), proc.stderr
    else:
        assert proc.returncode == 1 and not (tmp_path / "argv").exists()
        assert proc.stderr.count("\n") == 1 and "te_general_gemm" in proc.stderr and "backend.megatron: main" in proc.stderr


@pytest.mark.parametrize("engine", ["megatron-lm", "megacpp"])
@pytest.mark.parametrize("target", ["torchrun", "slurm"])
@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_in_every_user_value_executes_nothing(text, target, engine, tmp_path):
    keys = {
        "name": text.replace("\n", " "),
        "data": {"blend": [[1, f"/d/{text}"]], "tokenizer": {"type": "HuggingFaceTokenizer", "model": f"/m/{text}"}},
        "checkpoint": {"save": f"/c/{text}", "load": f"/b/{text}"},
        "launch": {"extra_args": ["--tensorboard-dir", text, "--wandb-project", text],
                   "env": {"HOSTILE_ENV": text},
                   "slurm": {"container_image": text, "container_mounts": [f"/x/{text}:/x"], "container_workdir": text}},
    }
    if engine == "megacpp":
        keys["backend"] = {"transformer_engine": False}
    argv = _run(_plan(**keys), target, tmp_path, engine)
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()
    assert (tmp_path / "env").read_text() == text
    if target == "slurm":
        assert f"--container-image={text}" in argv and f"--container-mounts=/x/{text}:/x" in argv
        assert f"--container-workdir={text}" in argv
    if engine == "megatron-lm":
        flags = _flags(argv[argv.index(next(a for a in argv if "/pretrain_" in a)):])
        assert flags["--tensorboard-dir"] == [text] and flags["--wandb-project"] == [text]
        assert flags["--data-path"] == ["1.0", f"/d/{text}"] and flags["--tokenizer-model"] == [f"/m/{text}"]
        assert flags["--save"] == [f"/c/{text}"] and flags["--load"] == [f"/b/{text}"]


def test_launch_refuses_an_unknown_extra_flag_in_one_line(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(REAL_JOB.read_text().replace('"--exit-signal-handler"', '"--exit-signal-handlr"'))
    proc = subprocess.run([*CLI, "launch", str(spec), "--dry-run", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--exit-signal-handlr is not a flag of Megatron-LM core_v0.16 (did you mean '--exit-signal-handler'?)" in proc.stderr
    assert not (tmp_path / "run").exists()
