"""scripts/table3.sh, the paper's Table 3 on the release, dry-run on this CPU: a random model in the release's
format (its layout and config, tiny widths, GPT-2's tokenizer), one category, one fraction kept, two questions
scored and two examples to calibrate and fine-tune on, through every step (eval.py, prune.py, finetune.py under
--protocol emo) to the table and the figure.

    python -m pytest tests/test_table3.py -q
"""

import os
import subprocess
import sys

import torch

from data.tokenizer import load_tokenizer
from hf import export_hf
from model import EMO, ModelConfig
from tests.test_cli import ROOT


def test_table3_dry_run_writes_its_table(tmp_path):
    torch.manual_seed(0)
    model = EMO(ModelConfig(vocab_size=50304, eos_id=50256, seq_len=512, n_layer=2, n_head=2, d_model=32, n_experts=8,
                            top_k=2, expert_hidden=16, rope_theta=500000.0, eval_doc_attention=False))
    export_hf(model, str(tmp_path / "Emo_tiny"), tokenizer=load_tokenizer("gpt2"))
    env = {**os.environ, "PYTHON": sys.executable, "MODELS": str(tmp_path / "Emo_tiny"), "KEEPS": "4",
           "CATEGORIES": "engineering", "LIMIT": "2", "CALIB": "2", "DEVICE": "cpu", "OUT": str(tmp_path / "t3")}
    done = subprocess.run(["bash", "scripts/table3.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    table = open(tmp_path / "t3" / "table3.md").read()
    assert "| experts kept | Emo_tiny inf | Emo_tiny ft |" in table and "\n| 4 | " in table and "\n| all | " in table
    assert "| Emo_tiny | 4 |" in table and open(tmp_path / "t3" / "figure3.png", "rb").read(4) == b"\x89PNG"
