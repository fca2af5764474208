"""The registered summarizer as an MLflow pyfunc model ("models from code").

MLflow logs this file itself as the model's code, so loading the model needs only
mlflow, torch and transformers — not this project. transformers 5 has no
summarization pipeline, hence a PythonModel around the merged ``save_pretrained``
folder, which travels as the artifact ``model``. Input: dialogues (a DataFrame with a
``dialogue`` column, or a list of strings); output: one summary per dialogue.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

SERVING_CONFIG = "detox_serving.json"


class DetoxSummarizer(PythonModel):
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        model_dir = Path(context.artifacts["model"])
        self.settings = json.loads((model_dir / SERVING_CONFIG).read_text())
        self.causal = self.settings.get("family") == "causal"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model_class = AutoModelForCausalLM if self.causal else AutoModelForSeq2SeqLM
        if self.causal:  # prompts end where the summaries begin
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model_class.from_pretrained(model_dir, use_safetensors=True).to(self.device).eval()

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        dialogues = _dialogues(model_input)
        template = self.settings["prompt_template"]
        batch_size = int(self.settings.get("batch_size", 16))
        summaries: list[str] = []
        for start in range(0, len(dialogues), batch_size):
            prompts = [template.format(dialogue=d) for d in dialogues[start : start + batch_size]]
            batch = self.tokenizer(
                prompts, padding=True, truncation=True,
                max_length=self.settings["max_prompt_tokens"], return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                output = self.model.generate(
                    **batch, max_new_tokens=self.settings["max_new_tokens"], do_sample=False, num_beams=1,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                )
            if self.causal:
                output = output[:, batch["input_ids"].shape[1] :]
            summaries.extend(t.strip() for t in self.tokenizer.batch_decode(output, skip_special_tokens=True))
        return summaries


def _dialogues(model_input) -> list[str]:
    if hasattr(model_input, "columns"):
        column = "dialogue" if "dialogue" in model_input.columns else model_input.columns[0]
        return [str(d) for d in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(d) for d in model_input]


mlflow.models.set_model(DetoxSummarizer())
