"""The GPU run kit (benchmarks/device/) in its CPU mode: every model's script with --tiny writes its JSON with
sane fields; without CUDA and without --tiny a script prints the one no-CUDA line and exits 2. Also the one
device/dtype choice the training loops and DeepSpeed's config take (train.deepspeed_utils.select_precision)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "device"
SCRIPTS = {"sasrec": "run_sasrec.py", "bert4rec": "run_bert4rec.py", "flare_tid": "run_flare.py",
           "recformer": "run_recformer.py", "calrec": "run_calrec.py"}


def _script(file: str):
    """A kit script as a module (its __main__ block does not run): its TINY / GPU settings and runner."""
    sys.path.insert(0, str(KIT))
    spec = importlib.util.spec_from_file_location(f"kit_{Path(file).stem}", KIT / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_tiny(model: str, out: Path) -> dict:
    """What `python benchmarks/device/<script> --tiny --out <out>` does, in this process (one torch /
    transformers import for the five scripts instead of five)."""
    mod = _script(SCRIPTS[model])  # puts benchmarks/device on the path
    import runners

    argv = ["--tiny", "--out", str(out)]
    if model in ("sasrec", "bert4rec", "flare_tid"):
        preset = {"sasrec": "sasrec_scientific", "bert4rec": "bert4rec_scientific",
                  "flare_tid": "flare_tid_scientific"}[model]
        runners.run_id_model(model, preset, mod.TINY, getattr(mod, "GPU", None), argv=argv)
    elif model == "recformer":
        runners.run_staged_model("recformer", "recformer_scientific", mod.TINY, mod.GPU, argv=argv)
    else:
        runners.run_staged_model("calrec", "calrec_scientific_smollm2", mod.TINY, mod.GPU, argv=argv, zero_stage=3,
                                 eval_users_default=512, eval_note=mod.NOTE)
    return json.loads((out / f"{model}.json").read_text())


@pytest.mark.parametrize("model", list(SCRIPTS))
def test_tiny_run_writes_a_sane_record(model, tmp_path):
    rec = _run_tiny(model, tmp_path)
    assert rec["model"] == model and rec["device"] == "cpu" and rec["path"] == "local" and rec["tiny"]
    assert rec["steps"] == (4 if model in ("sasrec", "bert4rec", "flare_tid") else 3)
    assert rec["throughput"] > 0 and rec["tokens"] > 0 and rec["tokens_per_s"] > 0
    assert rec["throughput_unit"] == ("seq/s" if model in ("recformer", "calrec") else "tokens/s")
    assert rec["params"] > 0 and rec["achieved_tflops"] > 0 and "6*P_nonemb" in rec["flops_formula"]
    assert rec["mfu"] is None and rec["peak_gpu_mib"] is None  # no GPU: no peak FLOPs, no CUDA memory
    assert rec["precision"] == {"dtype": "torch.float32", "autocast": False}
    assert all(math.isfinite(loss) for _, loss in rec["loss_curve"])
    for key in ("ndcg@10/pes", "ndcg@10/opt", "recall@10/pes", "recall@1/pes", "mrr/pes"):
        assert 0.0 <= rec["metrics"][key] <= 1.0, (key, rec["metrics"])
    assert rec["metrics"]["recall@1/pes"] <= rec["metrics"]["recall@10/pes"]
    assert rec["eval_split"] == "test" and rec["test_users"] == 300
    if model == "calrec":  # a seeded subset, and the record says so
        assert rec["eval_users"] == 4 and "subset" in rec["eval_note"]
    else:
        assert rec["eval_users"] == 300


def test_without_cuda_a_script_prints_one_line_and_exits_2(monkeypatch, capsys):
    """In-process (a fresh interpreter only to import torch costs ~25 s on the loaded CI machine): the script's
    entry, with CUDA absent, prints exactly the one line and exits 2 before loading any data."""
    mod = _script("run_sasrec.py")
    import runners

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        runners.run_id_model("sasrec", "sasrec_scientific", mod.TINY, argv=["--out", "/nonexistent"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().out.strip().splitlines() == ["CUDA not available: run with --tiny for the CPU check"]
    assert not Path("/nonexistent").exists()


def test_run_all_lists_every_script():
    text = (KIT / "run_all.sh").read_text()
    assert all(f in text for f in SCRIPTS.values())


def test_peak_flops_of_the_lent_gpus():
    sys.path.insert(0, str(KIT))
    import common

    assert common.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 == common.peak_flops("NVIDIA H200")
    assert common.peak_flops("cpu") is None


# ------------------------------------------------------------------------------------- device / dtype
def test_precision_on_cpu_is_fp32_without_autocast():
    from seqrec.train.deepspeed_utils import select_precision

    for strategy in ("ddp", "deepspeed"):
        p = select_precision(False, strategy)
        assert (p.device_type, p.dtype, p.deepspeed_bf16, p.autocast()) == ("cpu", torch.float32, False, None)


def test_precision_on_gpu_is_bf16_from_exactly_one_place():
    """DDP: fp32 weights under bf16 autocast; DeepSpeed: the engine's bf16 section, no autocast on top (an
    autocast around a bf16 engine would be a second, redundant cast)."""
    from seqrec.train.deepspeed_utils import select_precision

    ddp = select_precision(True, "ddp")
    assert (ddp.device_type, ddp.dtype, ddp.deepspeed_bf16, ddp.use_autocast) == ("cuda", torch.bfloat16, False, True)
    with warnings.catch_warnings():  # on a CPU-only machine torch warns that it disables a CUDA autocast
        warnings.simplefilter("ignore")
        ctx = ddp.autocast()
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    ds = select_precision(True, "deepspeed")
    assert (ds.dtype, ds.deepspeed_bf16, ds.autocast()) == (torch.bfloat16, True, None)
    with pytest.raises(ValueError):
        select_precision(True, "fsdp")


def test_deepspeed_config_bf16_follows_the_device():
    from seqrec.train.deepspeed_utils import build_config

    gpu = build_config("zero3", batch_size=8, grad_clip=1.0, use_gpu=True, zero_stage=None)
    assert gpu["bf16"] == {"enabled": True} and gpu["zero_optimization"]["stage"] == 3
    assert gpu["train_micro_batch_size_per_gpu"] == 8 and gpu["gradient_clipping"] == 1.0
    cpu = build_config("zero2", batch_size=4, grad_clip=0.0, use_gpu=False, zero_stage=None)
    assert cpu["bf16"] == {"enabled": False} and cpu["zero_optimization"]["stage"] == 2


def test_auto_path_without_ray_says_so_in_one_line(monkeypatch, capsys):
    """The lent GPU machine has no Ray / DeepSpeed: `--path auto` takes the single-process path and says so."""
    sys.path.insert(0, str(KIT))
    import argparse

    import common

    args = argparse.Namespace(tiny=False, path="auto")
    monkeypatch.setattr(common, "ray_stack_available", lambda: False)
    assert common.choose_path(args, torch.device("cuda")) == "local"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Ray/DeepSpeed not installed here: single-process path")
    monkeypatch.setattr(common, "ray_stack_available", lambda: True)
    assert common.choose_path(args, torch.device("cuda")) == "ray"
    assert common.choose_path(argparse.Namespace(tiny=True, path="auto"), torch.device("cpu")) == "local"
