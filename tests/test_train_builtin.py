"""scripts/train_builtin.py end to end at toy size: every built-in model by its recipe, the
overrides, the weights and the table it writes."""
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_builtin  # noqa: E402

from relprop.benchmark import models  # noqa: E402


def test_every_recipe_trains_and_the_table_is_written(tmp_path, capsys):
    assert set(train_builtin.RECIPES) == set(models.MODELS)
    args = ["--n-train", "40", "--n-hard", "8", "--n-test", "8", "--steps", "2", "--batch", "4", "--threads", "1",
            "--out", str(tmp_path)]
    assert train_builtin.main(args) == 0
    table = (tmp_path / "README.md").read_text()
    for name in models.MODELS:
        state = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        model = models.build(name)
        model.load_state_dict(state)                       # the architecture's own keys and shapes
        assert all(v.dtype != torch.float64 for v in state.values())
        recipe = train_builtin.RECIPES[name]
        row = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) \|.*\| 8 \| 2 \| {recipe.optimizer} lr {recipe.lr} \|",
                        table, re.M)
        assert row, (name, table)
        assert 0 <= float(row.group(1)) <= 1
    assert "training Recipe(steps=2" in capsys.readouterr().out
