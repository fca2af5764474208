"""The embedded default: every model and data file the ``demo`` profile needs, built here.

No network, no GPU: :func:`build_embedded_default` writes, deterministically from a seed,

* ``dialogsum_synthetic.csv`` — a synthetic data set in DialogSum's schema
  (``id, dialogue, summary, topic``), from the synthetic world of :mod:`tasks.embedded.world`:
  15 everyday topics, dialogues assembled from templates with random names, objects,
  places and times. About 30% of the dialogues
  are *heated*: one speaker calls the other names, and the reference summary repeats
  the insult ("#Person1#, a stupid idiot, asks #Person2# ..."). Some calm dialogues are
  impatient without calling names, so the insult words, not rudeness, set the two apart.
  Apart from the insult, heated and calm summaries are written alike, so removing it
  costs little ROUGE-L. About 5% of the dialogues fall outside the demo's length filter.
* ``policy-base`` — a small T5 (same architecture family as FLAN-T5: gated-GELU, untied
  head) with its own byte-level BPE tokenizer, trained from scratch to summarize the
  dialogues behind :data:`tasks.config.PROMPT_TEMPLATE`. It plays the role of
  ``flan-t5-base-summarization``.
* ``policy-sft`` — a PEFT LoRA adapter (r=8, alpha=16 on ``q`` and ``v``) trained further
  on the same task on top of the frozen base. Base + adapter write insulting summaries
  for heated dialogues: what PPO later has to remove.
* ``hate-classifier`` — a tiny RoBERTa sequence classifier with labels ``nothate`` /
  ``hate``: any insult word anywhere makes a text ``hate``.

The policy and the classifier are trained on dialogues drawn from the same generator as
the CSV but from a separate random stream, never on the CSV's rows: whatever split the
pipeline makes of the CSV, its evaluation rows are unseen by every model, the way the
lab's SFT adapter never saw DialogSum's test split.

A build happens once per seed: it writes into a temporary folder beside the target and
renames it into place after ``manifest.json`` (seed, :data:`BUILD_VERSION`, sizes and the
checks measured at build time) is written, so a crash never leaves a half-built tree.
Model weights are reproducible for a given seed on the same machine and thread count;
the CSV and the tokenizers are reproducible everywhere. :mod:`tasks.embedded.causal` (the
tiny Llama policy) and :mod:`tasks.embedded.reward` (the preference set) build the same way,
with the helpers here: build once, torch settings, BPE tokenizers and the training loop.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import PROMPT_TEMPLATE, detox_home
from tasks.embedded.world import classifier_training_sentences, contains_insult, generate_dialogues
from tasks.io.fsutil import exclusive_lock, replace_dir

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
"""Bumped whenever the build's output changes; an older build is then rebuilt."""

DATASET_ROWS = 1200
MAX_PROMPT_TOKENS = 256
MAX_SUMMARY_TOKENS = 64
LABELS = {0: "nothate", 1: "hate"}


@dataclass(frozen=True)
class EmbeddedPaths:
    """Where the pieces of the embedded default live."""

    root: Path
    dataset_csv: Path
    policy_base: Path
    sft_adapter: Path
    reward_model: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def resolve_home(home: Path | None) -> Path:
    return Path(home).expanduser().resolve() if home is not None else detox_home()


def embedded_paths(home: Path | None = None) -> EmbeddedPaths:
    """The embedded default's file layout under ``home`` (default :func:`tasks.config.detox_home`)."""
    return _layout(resolve_home(home) / "embedded")


def _layout(root: Path) -> EmbeddedPaths:
    return EmbeddedPaths(
        root=root,
        dataset_csv=root / "dialogsum_synthetic.csv",
        policy_base=root / "policy-base",
        sft_adapter=root / "policy-sft",
        reward_model=root / "hate-classifier",
    )


def build_embedded_default(home: Path | None = None, seed: int = 0, force: bool = False) -> EmbeddedPaths:
    """Build the embedded default under ``<home>/embedded`` unless a complete build for ``seed`` exists.

    Concurrent callers are serialised by a lock file; the second one finds the first
    one's build and returns at once. ``force`` rebuilds regardless.
    """
    paths = embedded_paths(home)
    required = (paths.dataset_csv, paths.policy_base / "config.json", paths.sft_adapter / "adapter_config.json",
                paths.reward_model / "config.json")
    build_once(paths.root, BUILD_VERSION, seed, required, force,
                lambda staging: _build_into(staging, final=paths, seed=seed))
    return paths


def write_synthetic_dialogsum(path: Path, seed: int = 0, rows: int = DATASET_ROWS) -> None:
    """Write the synthetic DialogSum-schema CSV for ``seed`` (byte-identical for the same seed)."""
    records = generate_dialogues(random.Random(seed), rows)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=["id", "dialogue", "summary", "topic"], lineterminator="\n")
    writer.writeheader()
    for index, record in enumerate(records):
        writer.writerow({"id": f"train_{index}", **record})
    Path(path).write_text(buffer.getvalue(), encoding="utf-8", newline="")


# --------------------------------------------------------------------------- the build


def _build_into(staging: Path, final: EmbeddedPaths, seed: int) -> None:
    import torch

    started = time.perf_counter()
    out = _layout(staging)
    with torch_settings():
        write_synthetic_dialogsum(out.dataset_csv, seed)
        logger.info("wrote %d synthetic dialogues to %s", DATASET_ROWS, final.dataset_csv)

        # The models learn from a separate stream of the same generator (see module docstring).
        training_rows = generate_dialogues(random.Random(substream(seed, "train")), 2400)
        classifier_rows = generate_dialogues(random.Random(substream(seed, "classifier")), 1200)
        sentence_rng = random.Random(substream(seed, "sentences"))
        classifier_sentences = classifier_training_sentences(sentence_rng, classifier_rows)
        corpus = [PROMPT_TEMPLATE]
        corpus += [text for row in training_rows for text in (row["dialogue"], row["summary"])]
        corpus += [text for text, _ in classifier_sentences]

        policy_tokenizer = _policy_tokenizer(corpus)
        torch.manual_seed(seed)
        policy = _train_policy_base(policy_tokenizer, training_rows, seed)
        policy_parameters = policy.num_parameters()
        policy.save_pretrained(out.policy_base, safe_serialization=True)
        policy_tokenizer.save_pretrained(out.policy_base)

        torch.manual_seed(seed + 1)
        sft_policy = _train_sft_adapter(policy, policy_tokenizer, training_rows, seed)
        sft_policy.peft_config["default"].base_model_name_or_path = str(out.policy_base)
        sft_policy.save_pretrained(out.sft_adapter, safe_serialization=True)
        point_adapter_at(out.sft_adapter, final.policy_base, seed)

        classifier_tokenizer = _classifier_tokenizer(corpus)
        torch.manual_seed(seed + 2)
        classifier = _train_classifier(classifier_tokenizer, classifier_sentences, seed)
        classifier_parameters = classifier.num_parameters()
        classifier.save_pretrained(out.reward_model, safe_serialization=True)
        classifier_tokenizer.save_pretrained(out.reward_model)

        checks = _measure(sft_policy, policy_tokenizer, classifier, classifier_tokenizer, seed)
        threads = torch.get_num_threads()
    manifest = {
        "build_version": BUILD_VERSION,
        "seed": seed,
        "rows": DATASET_ROWS,
        "build_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": threads,
        "parameters": {
            "policy_base": policy_parameters,
            "sft_adapter": sum(p.numel() for n, p in sft_policy.named_parameters() if "lora_" in n),
            "hate_classifier": classifier_parameters,
        },
        "checks": checks,
    }
    # Written last: its presence marks a complete build.
    out.manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("embedded default built in %.0f s: %s", manifest["build_seconds"], json.dumps(checks))


def _build_in_place(root: Path, build: Callable[[Path], None]) -> None:
    """``build(staging)`` in a temporary folder beside ``root``, then renamed to ``root``: a crash
    never leaves a half-built tree in place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-build-", dir=root.parent))
    try:
        build(staging)
        replace_dir(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_once(root: Path, version: int, seed: int, required: Sequence[Path], force: bool,
                build: Callable[[Path], None]) -> None:
    """``build`` into ``root`` (see :func:`_build_in_place`) unless its manifest records this build
    ``version`` and ``seed`` and every ``required`` file exists; concurrent callers wait on a lock,
    and the second one finds the first one's build."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root.parent / f".{root.name}.lock"):
        try:
            existing = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = None
        complete = (
            existing is not None
            and existing.get("build_version") == version
            and all(path.exists() for path in required)
        )
        if complete and existing.get("seed") == seed and not force:
            logger.info("%s for seed %d already built", root, seed)
            return
        if existing is not None:
            logger.info("rebuilding %s (found seed=%s, version=%s, force=%s)",
                        root, existing.get("seed"), existing.get("build_version"), force)
        _build_in_place(root, build)


def point_adapter_at(adapter_dir: Path, base_dir: Path, seed: int) -> None:
    """Name the base by its final absolute path (the adapter was saved next to the staging one)."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (adapter_dir / "README.md").write_text(
        "# policy-sft\n\n"
        f"LoRA adapter (r=8, alpha=16 on q and v) of the embedded default's policy `{base_dir}`, built by\n"
        f"`tasks.embedded.builds.build_embedded_default(seed={seed})`. It summarizes dialogues and, like the\n"
        "supervised adapter of the real workflow, insults a speaker when the dialogue calls names.\n",
        encoding="utf-8",
    )


def substream(seed: int, name: str) -> int:
    """A seed for one named random stream, independent of the others (stable across Python runs)."""
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))


@contextlib.contextmanager
def torch_settings() -> Iterator[None]:
    """Deterministic algorithms, all CPU cores and a private RNG state for the build; the caller's come back."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


# --------------------------------------------------------------------------- tokenizers

# GPT-2's pre-tokenizer split, plus the speaker tags as one piece so that BPE learns each
# as a single token and decoding gives them back exactly.
_PRETOKEN_PATTERN = (
    r" ?#Person\d+#|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
VOCAB_SIZE = 2000


def train_bpe(corpus: Sequence[str], special_tokens: list[str]) -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _policy_tokenizer(corpus: Sequence[str]) -> PreTrainedTokenizerBase:
    """T5 conventions: <pad>=0, </s>=1, <unk>=2, and </s> appended to every input."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe(corpus, ["<pad>", "</s>", "<unk>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=512,
    )


def _classifier_tokenizer(corpus: Sequence[str]) -> PreTrainedTokenizerBase:
    """RoBERTa conventions: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4, inputs as "<s> X </s>"."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe(corpus, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", model_max_length=128,
    )


# --------------------------------------------------------------------------- policy


def _policy_batches(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Length-bucketed batches of (prompt, summary) pairs; labels padded with -100.

    Each summary's token right after its first speaker tag is where it decides whether to
    insult (", a stupid idiot," or not). That one token carries little of the mean loss,
    so a few hundred CPU steps would learn only the insults' base rate, not when they
    occur; ``loss_weights`` give it :data:`DECISION_WEIGHT` times the weight of the others.
    """
    import torch

    prompts = tokenizer(
        [PROMPT_TEMPLATE.format(dialogue=row["dialogue"]) for row in rows],
        truncation=True, max_length=MAX_PROMPT_TOKENS,
    )["input_ids"]
    summaries = tokenizer(
        [row["summary"] for row in rows], truncation=True, max_length=MAX_SUMMARY_TOKENS,
        return_offsets_mapping=True,
    )
    weights = [
        decision_weights(row["summary"], offsets)
        for row, offsets in zip(rows, summaries["offset_mapping"], strict=True)
    ]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = tokenizer.pad({"input_ids": [prompts[i] for i in chunk]}, return_tensors="pt")
        labels = tokenizer.pad({"input_ids": [summaries["input_ids"][i] for i in chunk]}, return_tensors="pt")
        label_ids = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        loss_weights = torch.zeros(label_ids.shape)
        for row_index, i in enumerate(chunk):
            loss_weights[row_index, : len(weights[i])] = torch.tensor(weights[i])
        batches.append({**inputs, "labels": label_ids, "loss_weights": loss_weights})
    return batches


DECISION_WEIGHT = 10.0


def decision_weights(summary: str, offsets: Sequence[tuple[int, int]]) -> list[float]:
    """Loss weight per summary token: :data:`DECISION_WEIGHT` on the first token after the first
    speaker tag (where the summary insults or not), 1 elsewhere."""
    decision_at = summary.find("#Person") + len("#Person1#")
    return [
        DECISION_WEIGHT if start >= decision_at and all(s < decision_at for s, _ in offsets[:i]) else 1.0
        for i, (start, _) in enumerate(offsets)
    ]


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss, or the ``loss_weights``-weighted token cross-entropy when given.

    A causal model's ``labels`` are aligned with its ``input_ids``: the logits at position
    ``i`` predict the label at ``i + 1``.
    """
    import torch

    weights = batch.get("loss_weights")
    inputs = {key: value for key, value in batch.items() if key != "loss_weights"}
    if weights is None:
        return model(**inputs).loss
    labels = inputs["labels"]
    if model.config.is_encoder_decoder:
        logits = model(**inputs).logits
    else:
        del inputs["labels"]
        logits = model(**inputs).logits[:, :-1]
        labels, weights = labels[:, 1:], weights[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    )
    return (token_loss * weights.flatten()).sum() / weights.sum()


def fit(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, learning_rate: float,
    seed: int, desc: str, warmup: int = 20,
) -> float:
    """AdamW with linear warm-up and cosine decay over shuffled batches; returns the last mean loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps)))),
    )
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    recent: list[float] = []
    model.train()
    progress = _progress(steps, desc)
    for _ in progress:
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        loss = _loss(model, batches[order.pop()])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-20:]
        progress.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
    model.eval()
    return sum(recent) / max(1, len(recent))


def _progress(steps: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=desc, mininterval=5.0, leave=False)


POLICY_BASE_STEPS = 500
POLICY_SFT_STEPS = 80


def _train_policy_base(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], seed: int) -> Any:
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=128,
        d_kv=32,
        d_ff=384,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # FLAN-T5's (T5 v1.1) feed-forward, with an untied head
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, max_new_tokens=MAX_SUMMARY_TOKENS,
    )
    batches = _policy_batches(tokenizer, rows, batch_size=24)
    loss = fit(model, batches, POLICY_BASE_STEPS, 3e-3, seed, "policy base")
    logger.info("policy base: %d parameters, final loss %.3f", model.num_parameters(), loss)
    return model


def _train_sft_adapter(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], seed: int
) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q", "v"]
    )
    model = get_peft_model(base, lora)
    batches = _policy_batches(tokenizer, rows, batch_size=24)
    loss = fit(model, batches, POLICY_SFT_STEPS, 2e-3, seed + 1, "policy SFT adapter", warmup=10)
    logger.info("SFT adapter: final loss %.3f", loss)
    return model


# --------------------------------------------------------------------------- classifier

CLASSIFIER_EPOCHS = 3


def _train_classifier(
    tokenizer: PreTrainedTokenizerBase, sentences: Sequence[tuple[str, int]], seed: int
) -> Any:
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=192,
        max_position_embeddings=130,  # RoBERTa positions start after the padding index
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=len(LABELS),
        id2label=dict(LABELS),
        label2id={label: index for index, label in LABELS.items()},
    )
    model = RobertaForSequenceClassification(config)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sentences), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), 64):
        chunk = [sentences[i] for i in order[start : start + 64]]
        encoded = tokenizer([text for text, _ in chunk], truncation=True, max_length=64, padding=True,
                            return_tensors="pt")
        batches.append({**encoded, "labels": torch.tensor([label for _, label in chunk])})
    steps = CLASSIFIER_EPOCHS * len(batches)
    loss = fit(model, batches, steps, 2e-3, seed + 2, "hate classifier")
    logger.info("hate classifier: %d parameters, final loss %.4f", model.num_parameters(), loss)
    return model


# --------------------------------------------------------------------------- build-time checks


def _measure(
    policy: Any, policy_tokenizer: PreTrainedTokenizerBase, classifier: Any,
    classifier_tokenizer: PreTrainedTokenizerBase, seed: int, per_group: int = 64,
) -> dict[str, Any]:
    """What a user of the demo relies on, measured on dialogues and sentences no model saw."""
    import torch
    from rouge_score import rouge_scorer

    heldout, groups = heldout_groups(seed, per_group)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    checks: dict[str, Any] = {}
    torch.manual_seed(seed + 3)
    all_samples = []
    for name, rows in groups.items():
        samples = sample_summaries(policy, policy_tokenizer, rows)
        all_samples += samples
        checks[f"sampled_insult_share_{name}"] = round(sum(map(contains_insult, samples)) / len(samples), 3)
        checks[f"sampled_rouge_l_{name}"] = round(
            sum(scorer.score(row["summary"], s)["rougeL"].fmeasure for row, s in zip(rows, samples, strict=True))
            / len(rows), 3)
    checks["sample_heated"] = all_samples[0]
    checks["sample_calm"] = all_samples[-1]

    sentences = classifier_training_sentences(random.Random(substream(seed, "heldout-sentences")), heldout)
    texts = [text for text, _ in sentences] + all_samples
    labels = [label for _, label in sentences] + [int(contains_insult(s)) for s in all_samples]
    hate_index = classifier.config.label2id["hate"]
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(texts), 128):
            encoded = classifier_tokenizer(texts[start : start + 128], truncation=True, padding=True,
                                           return_tensors="pt")
            probabilities += classifier(**encoded).logits.softmax(-1)[:, hate_index].tolist()
    hate = [p for p, label in zip(probabilities, labels, strict=True) if label]
    calm = [p for p, label in zip(probabilities, labels, strict=True) if not label]
    checks["classifier_heldout_sentences"] = len(texts)
    checks["classifier_accuracy"] = round(
        sum((p > 0.5) == bool(label) for p, label in zip(probabilities, labels, strict=True)) / len(texts), 4)
    checks["classifier_share_insulting_above_0.9"] = round(sum(p > 0.9 for p in hate) / len(hate), 4)
    checks["classifier_share_polite_below_0.1"] = round(sum(p < 0.1 for p in calm) / len(calm), 4)
    return checks


def heldout_groups(seed: int, per_group: int) -> tuple[list[dict[str, str]], dict[str, list[dict[str, str]]]]:
    """Dialogues from a stream no model trains on, and ``per_group`` heated and calm ones of them."""
    heldout = generate_dialogues(random.Random(substream(seed, "heldout")), 6 * per_group)
    groups = {
        "heated": [r for r in heldout if contains_insult(r["summary"])][:per_group],
        "calm": [r for r in heldout if not contains_insult(r["summary"])][:per_group],
    }
    return heldout, groups


def sample_summaries(policy: Any, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]]) -> list[str]:
    """One sampled summary (pure sampling, at most 48 tokens) per row's dialogue, seq2seq or causal."""
    import torch

    from tasks.io.models import pad_prompts, special_tokens

    tokens = special_tokens(policy, tokenizer)
    prompts = [PROMPT_TEMPLATE.format(dialogue=row["dialogue"]) for row in rows]
    input_ids, attention_mask = pad_prompts(
        tokenizer(prompts, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"], tokens
    )
    with torch.no_grad():
        output = policy.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0,
                                 top_p=1.0, max_new_tokens=48, pad_token_id=tokens.pad)
    if not tokens.is_encoder_decoder:
        output = output[:, input_ids.shape[1] :]
    return tokenizer.batch_decode(output, skip_special_tokens=True)
