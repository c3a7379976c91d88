"""The embedded demo model: made once, also when several processes start at the same time (the ranks of a
multi-node server on a fresh machine each ask for it)."""

from __future__ import annotations

import subprocess
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

MAKE = "import sys; from pathlib import Path; from predictor.tools.demo import ensure_demo_model; " \
       "print(ensure_demo_model(Path(sys.argv[1])))"


def test_processes_starting_together_get_one_complete_demo_model(tmp_path):
    makers = [subprocess.Popen([sys.executable, "-c", MAKE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
              for _ in range(3)]
    paths = {maker.communicate(timeout=300)[0].strip() for maker in makers}
    assert [maker.returncode for maker in makers] == [0, 0, 0]
    assert paths == {str(tmp_path / "demo-model")}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")], "no staging directory is left"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "demo-model")
    assert model.config.num_hidden_layers == 8
    assert AutoTokenizer.from_pretrained(tmp_path / "demo-model")("Hello").input_ids[0] == 1
