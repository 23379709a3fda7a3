"""Writes tests/hf_configs/<model>.transformers<major>.json: the config.json that the installed
transformers' `save_pretrained` writes for each tiny model of tests/test_convert_hf.py.

Run once under transformers 4.57.1 (the main test environment) and once under 5.x (the
newest-versions environment, scripts/test_newest_versions.sh) to refresh the two formats that
tests/test_hf_config.py reads side by side:

    python tests/hf_configs/generate.py
"""

import json
import os
import sys
import tempfile

import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_convert_hf import TINY_MODELS, _hf_model  # noqa: E402


def main() -> None:
    major = transformers.__version__.split(".")[0]
    out_dir = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(TINY_MODELS):
        with tempfile.TemporaryDirectory() as model_dir:
            _hf_model(name).save_pretrained(model_dir, safe_serialization=True)
            with open(os.path.join(model_dir, "config.json")) as f:
                config = json.load(f)
        path = os.path.join(out_dir, f"{name}.transformers{major}.json")
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        print(path)


if __name__ == "__main__":
    main()
