"""Shared test fixtures: the golden reference folder and its model builders."""
import importlib.util
import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(os.environ.get("RELPROP_GOLDEN", ROOT.parent / "shared" / "golden"))


def load_golden_models():
    spec = importlib.util.spec_from_file_location("golden_models", GOLDEN / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def golden_models():
    if not (GOLDEN / "models.py").exists():
        pytest.fail(f"golden reference folder not found at {GOLDEN} (set RELPROP_GOLDEN)")
    return load_golden_models()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
