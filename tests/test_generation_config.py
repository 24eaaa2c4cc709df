"""An edited generation_config.json with a value of the wrong type or range is refused in one line naming the file and
field, by generate (and so by chat and serve, which read it the same way), instead of failing while sampling."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from flashmoe.cli import app
from flashmoe.runtime.load import default_model_dir


@pytest.mark.parametrize("field,value,why", [
    ("temperature", "hot", "must be a number, got 'hot'"),
    ("top_p", "x", "must be a number, got 'x'"),
    ("top_k", 1.5, "must be a whole number, got 1.5"),
    ("repetition_penalty", True, "must be a number, got True"),
    ("temperature", -1.0, "must be >= 0, got -1.0"),
    ("top_p", float("nan"), "must be in (0, 1], got nan"),
    ("eos_token_id", "abc", "must be a token id or a list of them, got 'abc'"),
    ("eos_token_id", [2, 4096], "holds 4096, not a token of the model (vocab_size 4096 in config.json)"),
])
def test_a_bad_generation_config_value_names_the_file_and_field(tmp_path, field, value, why):
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    path = model / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(dict(config, **{field: value})))
    result = CliRunner().invoke(app, ["generate", str(model), "--prompt", "The old house", "-n", "2",
                                      "--backend", "numpy"])
    assert result.exit_code == 2, result.output
    assert f"{path}: field '{field}' {why}" in result.output
    assert "Traceback" not in result.output
