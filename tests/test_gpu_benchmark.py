"""The prepared GPU run (benchmarks/gpu.py) at smoke sizes on the CPU: the same code a lent GPU runs, so that the
first GPU session does not spend its minutes on a broken script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[-+]?\d+(?:\.\d+)?"


@pytest.mark.slow
def test_gpu_benchmark_smoke_prints_every_figure() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, (out + done.stderr)[-3000:]
    # the quality run: every stage ran, with its seconds
    stages = re.search(r"^stages: (.*)$", out, re.M)
    assert stages, out
    ran = dict(re.findall(rf"(\w+) ({NUMBER}) s \(ran\)", stages[1]))
    assert set(ran) == {"crawl", "convert", "caption", "vae", "encode", "train", "eval", "sample"}, stages[1]
    # the train stage's UNet step, as the trainer ran it (on the CPU: no bf16 peak to compare with)
    step = re.search(rf"train stage UNet \(([\d,]+) parameters, 16 x 16 latents.*median step ({NUMBER}) ms = "
                     rf"({NUMBER}) samples/s, ({NUMBER}) GFLOP per sample", out)
    assert step and float(step[3]) > 0 and float(step[4]) > 0, out
    # the eval: its cost, and κ and the raw shares with their 90 % intervals
    cost = re.search(r"eval: (\d+) held-out prompts x (\d+) seeds, (\d+) images drawn", out)
    assert cost and int(cost[3]) == 2 * int(cost[1]) * int(cost[2]), out
    kappa = re.search(rf"prompt_kappa ({NUMBER}) \[({NUMBER}), ({NUMBER})\] at w = 7.5", out)
    assert kappa and float(kappa[2]) <= float(kappa[1]) <= float(kappa[3]), out
    assert re.search(rf"real ({NUMBER}) \[", out) and "eval table: mean κ (headline)" in out
    # the seed-size training (tiny here) and the Qwen2.5-VL captions/s, one at a time and batched
    assert re.search(rf"trainer ({NUMBER}) samples/s .* bare loop ({NUMBER}) samples/s, ratio {NUMBER}", out), out
    assert re.search(rf"one at a time ({NUMBER}) captions/s, batch 2 ({NUMBER}) captions/s", out), out


def test_the_gpu_runs_captioner_has_qwen_3b_shapes() -> None:
    """The full-size path --smoke skips: the captioner gpu.py times is built from the tests' tiny config (its
    tokens and processor) grown to Qwen2.5-VL-3B-Instruct's shapes; built on meta tensors, it has the 3B model's
    3.75B parameters (a config that kept the tiny model's per-layer settings did not build; untied output
    embeddings would add 0.31B)."""
    import torch
    from tiny_qwen import build_config, build_tokenizer
    from transformers import Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import qwen_3b_config

    config = qwen_3b_config(build_config(build_tokenizer()))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert abs(sum(p.numel() for p in model.parameters()) - 3.75e9) < 0.01e9
