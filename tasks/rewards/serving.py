"""A registered reward model as an MLflow pyfunc ("models from code").

MLflow logs this file itself as the model's code; loading needs mlflow, torch and
transformers, not this project. The artifact ``model`` is the ``save_pretrained`` folder
of a one-output sequence classifier trained on preference pairs. Input: a DataFrame with
``prompt`` and ``response`` columns; output: one reward per row, computed on
prompt + response exactly as in training (cut on the left when too long).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

REWARD_MARKER = "detox_reward.json"


class PreferenceReward(PythonModel):
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = Path(context.artifacts["model"])
        self.max_length = int(json.loads((model_dir / REWARD_MARKER).read_text())["max_length"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, use_safetensors=True
        ).to(self.device).eval()

    def predict(self, context, model_input, params=None) -> list[float]:
        import torch

        texts = [str(p) + str(r) for p, r in zip(model_input["prompt"], model_input["response"], strict=True)]
        rewards: list[float] = []
        for start in range(0, len(texts), 32):
            batch = self.tokenizer(texts[start : start + 32], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                rewards.extend(self.model(**batch).logits[:, 0].float().cpu().tolist())
        return rewards


mlflow.models.set_model(PreferenceReward())
