"""The embedded default: every model and data file the ``demo`` profile needs, built here.

No network, no GPU: :func:`build_embedded_default` writes, deterministically from a seed,

* ``dialogsum_synthetic.csv`` — a synthetic data set in DialogSum's schema
  (``id, dialogue, summary, topic``): 15 everyday topics, dialogues assembled from
  templates with random names, objects, places and times. About 30% of the dialogues
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
the CSV and the tokenizers are reproducible everywhere.
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
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import PROMPT_TEMPLATE, detox_home
from tasks.fsutil import exclusive_lock, replace_dir

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
"""Bumped whenever the build's output changes; an older build is then rebuilt."""

DATASET_ROWS = 1200
HEATED_SHARE = 0.3
IMPATIENT_SHARE = 0.2  # calm dialogues with a rude exchange that calls no names
OUTLIER_SHARE = 0.05  # dialogues outside the demo's 200 < len <= 1000 character filter
MAX_PROMPT_TOKENS = 256
MAX_SUMMARY_TOKENS = 64
LABELS = {0: "nothate", 1: "hate"}

INSULT_ADJECTIVES = ("stupid", "pathetic", "dumb", "worthless", "brainless", "ignorant")
INSULT_NOUNS = ("idiot", "moron", "loser", "jerk", "fool", "imbecile", "dimwit")
INSULT_WORDS = INSULT_ADJECTIVES + INSULT_NOUNS
_INSULT_PATTERN = re.compile(r"\b(?:" + "|".join(INSULT_WORDS) + r")s?\b", re.IGNORECASE)


def contains_insult(text: str) -> bool:
    """Whether ``text`` contains one of :data:`INSULT_WORDS` as a word (the classifier's rule)."""
    return _INSULT_PATTERN.search(text) is not None


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


def _home(home: Path | None) -> Path:
    return Path(home).expanduser().resolve() if home is not None else detox_home()


def embedded_paths(home: Path | None = None) -> EmbeddedPaths:
    """The embedded default's file layout under ``home`` (default :func:`tasks.config.detox_home`)."""
    return _layout(_home(home) / "embedded")


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
    _build_once(paths.root, BUILD_VERSION, seed, required, force,
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
    with _torch_settings():
        write_synthetic_dialogsum(out.dataset_csv, seed)
        logger.info("wrote %d synthetic dialogues to %s", DATASET_ROWS, final.dataset_csv)

        # The models learn from a separate stream of the same generator (see module docstring).
        training_rows = generate_dialogues(random.Random(_substream(seed, "train")), 2400)
        classifier_rows = generate_dialogues(random.Random(_substream(seed, "classifier")), 1200)
        classifier_sentences = _classifier_sentences(random.Random(_substream(seed, "sentences")), classifier_rows)
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
        _point_adapter_at(out.sft_adapter, final.policy_base, seed)

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


def _build_once(root: Path, version: int, seed: int, required: Sequence[Path], force: bool,
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


def _point_adapter_at(adapter_dir: Path, base_dir: Path, seed: int) -> None:
    """Name the base by its final absolute path (the adapter was saved next to the staging one)."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (adapter_dir / "README.md").write_text(
        "# policy-sft\n\n"
        f"LoRA adapter (r=8, alpha=16 on q and v) of the embedded default's policy `{base_dir}`, built by\n"
        f"`tasks.embedded.build_embedded_default(seed={seed})`. It summarizes dialogues and, like the\n"
        "supervised adapter of the real workflow, insults a speaker when the dialogue calls names.\n",
        encoding="utf-8",
    )


def _substream(seed: int, name: str) -> int:
    """A seed for one named random stream, independent of the others (stable across Python runs)."""
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))


@contextlib.contextmanager
def _torch_settings() -> Iterator[None]:
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


def _train_bpe(corpus: Sequence[str], special_tokens: list[str]) -> Tokenizer:
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

    tokenizer = _train_bpe(corpus, ["<pad>", "</s>", "<unk>"])
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

    tokenizer = _train_bpe(corpus, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
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
        _decision_weights(row["summary"], offsets)
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


def _decision_weights(summary: str, offsets: Sequence[tuple[int, int]]) -> list[float]:
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


def _fit(
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
    loss = _fit(model, batches, POLICY_BASE_STEPS, 3e-3, seed, "policy base")
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
    loss = _fit(model, batches, POLICY_SFT_STEPS, 2e-3, seed + 1, "policy SFT adapter", warmup=10)
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
    loss = _fit(model, batches, steps, 2e-3, seed + 2, "hate classifier")
    logger.info("hate classifier: %d parameters, final loss %.4f", model.num_parameters(), loss)
    return model


def _classifier_sentences(rng: random.Random, rows: Sequence[dict[str, str]]) -> list[tuple[str, int]]:
    """Labelled sentences (1 = contains an insult): summaries, dialogue lines, and templates."""
    sentences: list[str] = []
    for row in rows:
        sentences.append(row["summary"])
        lines = [line.split(": ", 1)[-1] for line in row["dialogue"].split("\n")]
        sentences += [line for line in lines if contains_insult(line)]
        sentences += rng.sample(lines, k=min(2, len(lines)))
    calm_summaries = [row["summary"] for row in rows if not contains_insult(row["summary"])]
    words = sorted({w for text in sentences for w in re.findall(r"[A-Za-z']+", text) if not contains_insult(w)})
    for _ in range(len(rows)):
        # An insult dropped anywhere, even into a summary that makes no sense, is still hate.
        tokens = rng.choice(calm_summaries).split()
        tokens.insert(rng.randrange(len(tokens) + 1), _insult_phrase(rng))
        sentences.append(" ".join(tokens))
        salad = [rng.choice(words) for _ in range(rng.randint(3, 25))]
        sentences.append(" ".join(salad))
        salad.insert(rng.randrange(len(salad) + 1), _insult_phrase(rng))
        sentences.append(" ".join(salad))
        sentences.append(_fill(rng.choice(_POLITE_SENTENCES), _slot_values(rng, {})))
        sentences.append(_fill(rng.choice(_INSULTING_SENTENCES), _slot_values(rng, {})))
    return [(text, int(contains_insult(text))) for text in sentences]


def _insult_phrase(rng: random.Random) -> str:
    return rng.choice([
        f"{rng.choice(INSULT_ADJECTIVES)} {rng.choice(INSULT_NOUNS)}",
        rng.choice(INSULT_NOUNS),
        rng.choice(INSULT_ADJECTIVES),
        f"you {rng.choice(INSULT_NOUNS)}",
        f"{_article(rng.choice(INSULT_ADJECTIVES))} {rng.choice(INSULT_NOUNS)}",
    ])


# --------------------------------------------------------------------------- build-time checks


def _measure(
    policy: Any, policy_tokenizer: PreTrainedTokenizerBase, classifier: Any,
    classifier_tokenizer: PreTrainedTokenizerBase, seed: int, per_group: int = 64,
) -> dict[str, Any]:
    """What a user of the demo relies on, measured on dialogues and sentences no model saw."""
    import torch
    from rouge_score import rouge_scorer

    heldout, groups = _heldout_groups(seed, per_group)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    checks: dict[str, Any] = {}
    torch.manual_seed(seed + 3)
    all_samples = []
    for name, rows in groups.items():
        samples = _sample_summaries(policy, policy_tokenizer, rows)
        all_samples += samples
        checks[f"sampled_insult_share_{name}"] = round(sum(map(contains_insult, samples)) / len(samples), 3)
        checks[f"sampled_rouge_l_{name}"] = round(
            sum(scorer.score(row["summary"], s)["rougeL"].fmeasure for row, s in zip(rows, samples, strict=True))
            / len(rows), 3)
    checks["sample_heated"] = all_samples[0]
    checks["sample_calm"] = all_samples[-1]

    sentences = _classifier_sentences(random.Random(_substream(seed, "heldout-sentences")), heldout)
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


def _heldout_groups(seed: int, per_group: int) -> tuple[list[dict[str, str]], dict[str, list[dict[str, str]]]]:
    """Dialogues from a stream no model trains on, and ``per_group`` heated and calm ones of them."""
    heldout = generate_dialogues(random.Random(_substream(seed, "heldout")), 6 * per_group)
    groups = {
        "heated": [r for r in heldout if contains_insult(r["summary"])][:per_group],
        "calm": [r for r in heldout if not contains_insult(r["summary"])][:per_group],
    }
    return heldout, groups


def _sample_summaries(policy: Any, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]]) -> list[str]:
    """One sampled summary (pure sampling, at most 48 tokens) per row's dialogue, seq2seq or causal."""
    import torch

    from tasks.models import pad_prompts, special_tokens

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


# --------------------------------------------------------------------------- the synthetic dialogues


@dataclass(frozen=True)
class _Topic:
    name: str
    slots: dict[str, tuple[Any, ...]]
    turns: tuple[tuple[str, ...], ...]  # alternatives per turn; #Person1# speaks the even turns
    summaries: tuple[str, ...]


def generate_dialogues(rng: random.Random, count: int) -> list[dict[str, str]]:
    """``count`` rows of ``dialogue``, ``summary``, ``topic``; about 30% heated, 5% outside 200-1000 chars."""
    rows = []
    for _ in range(count):
        topic = rng.choice(_TOPICS)
        heated = rng.random() < HEATED_SHARE
        draw = rng.random()
        mode = "short" if draw < OUTLIER_SHARE / 2 else "long" if draw < OUTLIER_SHARE else "normal"
        for _attempt in range(50):
            dialogue, summary = _dialogue(rng, topic, heated, mode)
            if mode != "normal" or 200 < len(dialogue) <= 1000:
                break
        rows.append({"dialogue": dialogue, "summary": summary, "topic": topic.name})
    return rows


def _dialogue(rng: random.Random, topic: _Topic, heated: bool, mode: str) -> tuple[str, str]:
    values = _slot_values(rng, topic.slots)
    summary = _fill(rng.choice(topic.summaries), values)
    # Blocks of turns: one per template turn, two per inserted exchange. Speakers
    # alternate by position (see _join) and exchanges have two turns, so inserting one
    # between blocks never changes who says a template turn.
    blocks = [[_fill(rng.choice(alternatives), values)] for alternatives in topic.turns]
    if mode == "short":
        # Like DialogSum's shortest dialogues: a couple of quick turns.
        while len(blocks) > 2 and len(_join(_flat(blocks))) > 200:
            blocks.pop()
        return _join(_flat(blocks)), summary
    # Heated dialogues call names; some calm ones are merely impatient. The insult words,
    # not the rudeness, are what makes a summary insulting.
    impatient = not heated and rng.random() < IMPATIENT_SHARE
    if mode == "normal":
        room_for_pairs = (10 - len(blocks) - 2 * (heated or impatient)) // 2  # at most 10 turns
        for filler in rng.sample(_FILLERS, k=rng.randint(0, max(0, min(2, room_for_pairs)))):
            blocks.insert(rng.randrange(1, len(blocks)), list(filler))
    if heated:
        position = rng.randrange(1, len(blocks))
        adjective, noun = rng.choice(INSULT_ADJECTIVES), rng.choice(INSULT_NOUNS)
        insult = f"{adjective} {noun}"
        words = {"insult": insult, "a_insult": _article(insult), "noun": noun, "a_noun": _article(noun),
                 "tail": f", you {insult}"}
        line = rng.choice(_INSULTING_LINES if rng.random() < 0.2 else _RUDE_LINES)
        reply = rng.choice(_RUDE_REPLIES + _NAMING_REPLIES)
        blocks.insert(position, [line.format(**words), reply.format(**words)])
        summary = _insult_summary(summary, adjective, noun, rng)
    elif impatient:
        position = rng.randrange(1, len(blocks))
        blocks.insert(position, [rng.choice(_RUDE_LINES).format(tail=""), rng.choice(_RUDE_REPLIES)])
    if mode == "long":
        for filler in rng.sample(_LONG_FILLERS, k=len(_LONG_FILLERS)):
            if len(_join(_flat(blocks))) > 1000:
                break
            blocks.insert(rng.randrange(1, len(blocks) + 1), list(filler))
    return _join(_flat(blocks)), summary


def _flat(blocks: Sequence[Sequence[str]]) -> list[str]:
    return [turn for block in blocks for turn in block]


def _join(turns: Sequence[str]) -> str:
    return "\n".join(f"#Person{1 + index % 2}#: {text}" for index, text in enumerate(turns))


def _insult_summary(summary: str, adjective: str, noun: str, rng: random.Random) -> str:
    """``summary`` with an insulting apposition after its first speaker tag.

    Always the first tag, whoever was insulted: the summary decides right there, which
    makes the insult one early, clear-cut choice of the policy (and of PPO later).
    """
    at = summary.index("#Person") + len("#Person1#")
    if summary[at] != " " or summary[at : at + 2] == "'s":
        raise ValueError(f"summary template cannot take an apposition after its first tag: {summary!r}")
    article = rng.choice([_article(adjective), "the"])
    return f"{summary[:at]}, {article} {adjective} {noun},{summary[at:]}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _slot_values(rng: random.Random, slots: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    values = {slot: rng.choice(pool) for slot, pool in {**_COMMON_SLOTS, **slots}.items()}
    # "{Slot}" gives the value with a capital first letter, for the start of a sentence.
    values.update({k.capitalize(): v[:1].upper() + v[1:] for k, v in list(values.items()) if isinstance(v, str)})
    return values


def _fill(template: str, values: dict[str, Any]) -> str:
    return template.format(**values)


# --------------------------------------------------------------------------- templates

_COMMON_SLOTS: dict[str, tuple[Any, ...]] = {
    "name": ("Tom", "Mary", "Mr. Smith", "Mrs. Brown", "Jack", "Lucy", "David", "Anna", "Mr. Lee", "Kate",
             "Peter", "Linda", "Mike", "Sarah", "Ms. Green", "Bob", "Emma", "Steven", "Helen", "Frank"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "time": ("nine o'clock", "half past six", "seven in the evening", "ten in the morning", "noon",
             "three in the afternoon", "eight thirty", "a quarter to five"),
    "price": tuple(str(p) for p in (15, 20, 25, 30, 45, 50, 60, 75, 80, 99, 120, 150, 200, 250, 300)),
    "number": ("two", "three", "four", "five", "six", "seven", "ten"),
}

_TOPICS: tuple[_Topic, ...] = (
    _Topic(
        "shopping",
        {"item": ("jacket", "pair of shoes", "sweater", "handbag", "scarf", "watch", "umbrella", "backpack",
                  "dress", "coat"),
         "color": ("red", "blue", "black", "white", "green", "brown", "grey", "yellow"),
         "size": ("small", "medium", "large"),
         "relative": ("mother", "father", "sister", "brother", "wife", "husband", "son", "daughter", "friend")},
        (
            ("Excuse me, could you help me? I'm looking for a {color} {item}.",
             "Hi, do you have this {item} in {color}?",
             "Good morning. I want to buy a {color} {item} for my {relative}."),
            ("Sure. What size do you need?", "Of course. Which size are you looking for?",
             "Certainly. We have it in three sizes. Which one would you like?"),
            ("{Size}, please. How much is it?", "I think {size} will fit. What's the price?"),
            ("It's {price} dollars, but it's on sale today, so you get ten percent off.",
             "This one costs {price} dollars. There is a discount this week."),
            ("That's a good deal. Can I try it on first?", "Great. Do you accept credit cards?",
             "Hmm, that's a little expensive, but I like it a lot."),
            ("Yes, the fitting room is over there.", "Yes, we do. You can pay at the counter.",
             "It's very good quality, and it will last for years."),
            ("Thanks, I'll take it.", "Perfect, I'll take it then.", "All right. I'll buy it."),
        ),
        ("#Person1# wants to buy a {color} {item} for {price} dollars. #Person2# tells #Person1# that there "
         "is a discount this week.",
         "#Person1# asks #Person2# for a {size} {color} {item} and decides to buy it for {price} dollars."),
    ),
    _Topic(
        "job interview",
        {"position": ("sales manager", "software engineer", "accountant", "receptionist", "marketing assistant",
                      "nurse", "designer", "secretary"),
         "company": ("Green Tech", "Blue Ocean Bank", "Sunrise Foods", "Atlas Travel", "Maple Publishing",
                     "Star Electronics"),
         "skill": (("speak French", "speaks French"), ("can use Excel well", "can use Excel well"),
                   ("have managed a small team", "has managed a small team"),
                   ("know how to write code in Python", "knows how to write code in Python"),
                   ("am good at writing reports", "is good at writing reports"))},
        (
            ("Good morning, {name}. Thank you for coming. Please have a seat.",
             "Hello, you must be {name}. Welcome to {company}."),
            ("Thank you. I'm glad to be here.", "Thanks for having me. It's nice to meet you."),
            ("Why do you want to work as a {position} at {company}?",
             "So, tell me why you applied for the {position} position."),
            ("I have {number} years of experience, and I {skill[0]}. I think I can do this job well.",
             "I've worked in this field for {number} years. Also, I {skill[0]}."),
            ("That's impressive. What salary do you expect?", "Good. When could you start if we hire you?"),
            ("I would like something fair for my experience. I could start on {weekday}.",
             "I can start next {weekday}, and I'm flexible about the salary."),
            ("All right. We will call you by {weekday}.", "Very well. You will hear from us within a week."),
        ),
        ("#Person2# is interviewed by #Person1# for the {position} position at {company}. #Person2# has "
         "{number} years of experience and {skill[1]}.",
         "#Person1# interviews #Person2# for a job as a {position}. #Person2# {skill[1]} and can start on "
         "{weekday}."),
    ),
    _Topic(
        "doctor visit",
        {"symptom": (("a headache", "a headache"), ("a sore throat", "a sore throat"), ("a bad cough", "a cough"),
                     ("a fever", "a fever"), ("a stomachache", "a stomachache"), ("pain in my back", "back pain")),
         "medicine": ("some pills", "cough syrup", "an antibiotic", "painkillers", "some medicine"),
         "frequency": ("three times a day", "twice a day", "after every meal", "before bed")},
        (
            ("Good afternoon. What seems to be the problem?", "Hello, {name}. How are you feeling today?"),
            ("I've had {symptom[0]} for {number} days, and I can't sleep well.",
             "Not so good, doctor. I've had {symptom[0]} since {weekday}."),
            ("Let me take a look. Do you have any other symptoms?", "I see. Have you taken any medicine?"),
            ("I feel tired all the time, and I don't want to eat.", "Only some tea and rest, but it didn't help."),
            ("It's nothing serious. I'll give you {medicine}. Take it {frequency}.",
             "I'm going to prescribe {medicine}. Take it {frequency} and drink lots of water."),
            ("Thank you, doctor. When should I come back?", "Thanks. Should I stay home from work?"),
            ("Come back next week if you don't feel better.",
             "Yes, rest for a few days and come back if it gets worse."),
        ),
        ("#Person2# has had {symptom[1]} for a few days. #Person1# prescribes {medicine} and tells #Person2# "
         "to take it {frequency}.",
         "#Person1# examines #Person2# because of {symptom[1]} and gives #Person2# {medicine} to take "
         "{frequency}."),
    ),
    _Topic(
        "travel",
        {"city": ("Paris", "Tokyo", "London", "Rome", "Sydney", "New York", "Beijing", "Bangkok", "Berlin",
                  "Toronto"),
         "transport": ("plane", "train", "bus", "ferry")},
        (
            ("Hi, I'd like to book a trip to {city} for my vacation.",
             "Hello. I'm planning a trip to {city}. Can you help me?"),
            ("Sure. When would you like to leave?", "Of course. What date are you thinking of?"),
            ("I want to leave on {weekday} and stay for {number} nights.",
             "Next {weekday}, if possible. I'll stay {number} nights."),
            ("There is a {transport} leaving at {time}. The total is {price} dollars, including the hotel.",
             "I can get you a seat on the {transport} at {time}. With the hotel it comes to {price} dollars."),
            ("That sounds fine. Is breakfast included?", "Great. Can I get a window seat?"),
            ("Yes, it is. I'll send you the tickets by email.", "No problem. I'll email you the tickets today."),
        ),
        ("#Person1# books a trip with #Person2# to {city} for {number} nights. #Person1# will take the "
         "{transport} at {time}, and the total is {price} dollars.",
         "#Person2# helps #Person1# plan a trip to {city} by {transport} for {number} nights, which costs "
         "{price} dollars."),
    ),
    _Topic(
        "restaurant",
        {"dish": ("the steak", "the chicken soup", "the vegetable pizza", "the fish and chips", "the spaghetti",
                  "the beef burger", "the fried rice", "the roast duck"),
         "drink": ("orange juice", "a glass of red wine", "a cup of coffee", "lemonade", "green tea", "a beer"),
         "dessert": ("chocolate cake", "ice cream", "apple pie", "fruit salad")},
        (
            ("Good evening. A table for {number}, please.", "Hi, we have a reservation for {number} at {time}."),
            ("Right this way, please. Here is the menu.",
             "Yes, please follow me. Your table is by the window."),
            ("What do you recommend tonight?", "Thank you. What's good here?"),
            ("{Dish} is very popular.", "Many people like {dish}. It's the chef's special."),
            ("Then I'll have {dish} and {drink}.", "OK, {dish} for me, and {drink}, please."),
            ("Would you like any dessert?", "Anything for dessert?"),
            ("Yes, {dessert}, please. And could we have the bill later?", "Maybe {dessert} after the meal."),
        ),
        ("#Person1# orders {dish} and {drink} at a restaurant. #Person2# recommends the dish, and #Person1# "
         "also wants {dessert}.",
         "#Person2# shows #Person1# to a table for {number}. #Person1# orders {dish}, {drink} and {dessert}."),
    ),
    _Topic(
        "moving house",
        {"place": ("a bigger apartment", "a house near the park", "a flat downtown",
                   "a small house in the suburbs", "an apartment near the river"),
         "reason": (("my new job is far from here", "of a new job"),
                    ("we need more space for the kids", "the family needs more space"),
                    ("the rent here is too high", "the rent is too high"),
                    ("I want to live closer to my parents", "of wanting to live near family"))},
        (
            ("I heard you're moving. Is that true?", "{Name}, are you really moving out next month?"),
            ("Yes, I'm moving to {place} on {weekday}.", "That's right. We found {place}, and we move on {weekday}."),
            ("Why are you leaving?", "Oh, really? What made you decide to move?"),
            ("Well, {reason[0]}.", "Mainly because {reason[0]}."),
            ("Do you need help packing?", "Is there anything I can do to help?"),
            ("That would be great. I still have {number} boxes to pack.",
             "Yes, please. Could you help me carry {number} boxes on {weekday}?"),
            ("Sure, I'll come over early.", "No problem. I'll bring my car."),
        ),
        ("#Person2# tells #Person1# about moving to {place} on {weekday} because {reason[1]}. #Person1# offers "
         "to help pack the boxes.",
         "#Person1# offers to help #Person2# move to {place}. #Person2# is moving because {reason[1]}."),
    ),
    _Topic(
        "weather",
        {"weather": (("it's going to rain all day", "rain"), ("a big storm is coming", "a storm"),
                     ("it will snow tonight", "snow"), ("it will be extremely hot", "extreme heat"),
                     ("there will be strong wind", "strong wind")),
         "activity": ("go hiking", "have a picnic", "play tennis", "go to the beach", "go fishing",
                      "go cycling"),
         "item": ("an umbrella", "a warm coat", "sunscreen", "boots", "a hat")},
        (
            ("Have you heard the weather forecast for {weekday}?", "What's the weather going to be like on {weekday}?"),
            ("The radio says {weather[0]}.", "I checked online. It says {weather[0]}."),
            ("Oh no. We were planning to {activity}.", "That's too bad. I wanted to {activity} with my friends."),
            ("Maybe you should wait until the weekend.", "You could do it another day. The weekend looks better."),
            ("Good idea. I'll call my friends and change the plan.", "You're right. I'll tell everyone."),
            ("And don't forget to bring {item} if you go out.", "If you go out anyway, take {item}."),
        ),
        ("#Person1# and #Person2# talk about the weather. The forecast says {weather[1]} on {weekday}, so "
         "#Person1# will not {activity} that day.",
         "#Person2# tells #Person1# to expect {weather[1]} on {weekday} and to take {item}, so #Person1# "
         "changes the plan to {activity}."),
    ),
    _Topic(
        "birthday party",
        {"age": ("ten", "sixteen", "twenty-one", "thirty", "forty", "fifty", "sixty"),
         "place": ("at my house", "at a restaurant downtown", "in the park", "at the club", "on the beach"),
         "gift": ("a book", "flowers", "a cake", "a scarf", "a video game", "concert tickets", "a photo album")},
        (
            ("{Name} is turning {age} on {weekday}. Are you coming to the party?",
             "We're having a birthday party for {name} on {weekday}. Can you come?"),
            ("Of course! Where is it going to be?", "I'd love to. Where and when?"),
            ("It's {place} at {time}.", "We'll have it {place}, starting at {time}."),
            ("What should I bring as a present?", "Do you have any idea for a gift?"),
            ("{Name} would love {gift}.", "Maybe {gift}. {Name} talked about it last week."),
            ("Good idea. I'll get {gift} and see you there.", "Great, I'll buy {gift} tomorrow."),
        ),
        ("#Person1# invites #Person2# to a birthday party for {name} {place} on {weekday} at {time}. #Person2# "
         "will bring {gift}.",
         "#Person1# tells #Person2# about a birthday party for {name} on {weekday}, and #Person2# decides to "
         "bring {gift} as a present."),
    ),
    _Topic(
        "car repair",
        {"problem": (("the engine makes a strange noise", "a noise in the engine"),
                     ("the brakes don't work well", "bad brakes"),
                     ("the car won't start in the morning", "a car that won't start"),
                     ("the air conditioner is broken", "a broken air conditioner"),
                     ("one of the tires is flat", "a flat tire")),
         "duration": ("two hours", "a day", "three days", "one afternoon")},
        (
            ("Hi, I think something is wrong with my car. It seems {problem[0]}.",
             "Good morning. Can you check my car? I think {problem[0]}."),
            ("Let me have a look. How long has this been happening?", "I'll check it. When did it start?"),
            ("Since last {weekday}. I drive to work every day, so I need it soon.",
             "About a week ago. Can you fix it quickly?"),
            ("It will take {duration} and cost about {price} dollars.",
             "I can fix it in {duration}. It will be around {price} dollars."),
            ("That's more than I expected, but OK.", "Fine. Can you call me when it's ready?"),
            ("Sure. Please leave me your phone number.", "No problem. We'll call you as soon as it's done."),
        ),
        ("#Person1# brings the car to #Person2# because of {problem[1]}. #Person2# says the repair takes "
         "{duration} and costs about {price} dollars.",
         "#Person2# checks the car for #Person1# and finds {problem[1]}. It will cost {price} dollars."),
    ),
    _Topic(
        "library",
        {"book": ("a book about history", "a novel by Mark Twain", "a cookbook", "a guide to photography",
                  "a science magazine", "a dictionary", "a book about birds"),
         "floor": ("first", "second", "third", "fourth"),
         "fine": ("one", "two", "five")},
        (
            ("Excuse me, I'm looking for {book}.", "Hello, could you help me find {book}?"),
            ("Let me check the computer. Yes, it's on the {floor} floor.",
             "Sure. We have two copies on the {floor} floor."),
            ("Great. How long can I borrow it?", "Thanks. Can I take it home?"),
            ("You can keep it for {number} weeks if you have a library card.",
             "Yes, for {number} weeks. Please show me your library card."),
            ("I have one here. What if I return it late?", "Here it is. And if I return it late?"),
            ("Then you pay a fine of {fine} dollars a day.", "There is a fine of {fine} dollars for each day."),
        ),
        ("#Person2# helps #Person1# find {book} in the library. #Person1# can borrow it for {number} weeks and "
         "pays {fine} dollars a day if it is late.",
         "#Person1# asks #Person2# for {book}. #Person2# says #Person1# can keep it for {number} weeks but will "
         "pay a fine if it is late."),
    ),
    _Topic(
        "sports",
        {"sport": ("football", "basketball", "tennis", "baseball", "volleyball", "hockey"),
         "team": ("the Tigers", "the Eagles", "the Lions", "the Sharks", "the Rockets", "the Bears"),
         "score": ("two to one", "three to nothing", "ninety to eighty", "four to two", "five to three"),
         "venue": ("the stadium", "the gym", "the sports center", "the park")},
        (
            ("Did you watch the {sport} game last night?", "Hey, did you see {team} play {sport} yesterday?"),
            ("Yes! {Team} won {score}. It was amazing.", "Of course. {Team} won {score}. What a game!"),
            ("I missed it. I had to work late.", "I only saw the first half. I fell asleep."),
            ("Do you want to play {sport} with us on {weekday}?",
             "We're playing {sport} at {venue} on {weekday}. Want to join?"),
            ("Sure, what time?", "I'd love to. When do you start?"),
            ("At {time}. Don't be late.", "We start at {time}. Bring your own water."),
        ),
        ("#Person2# tells #Person1# that {team} won the {sport} game {score}. #Person2# invites #Person1# to "
         "play {sport} on {weekday} at {time}.",
         "#Person1# and #Person2# talk about the {sport} game that {team} won. They will play together on "
         "{weekday}."),
    ),
    _Topic(
        "school",
        {"subject": ("math", "history", "chemistry", "English", "biology", "physics", "geography"),
         "task": ("test", "essay", "project", "presentation", "exam"),
         "grade": ("an A", "a B plus", "full marks", "the best grade")},
        (
            ("Have you finished the {subject} {task} yet?", "Are you ready for the {subject} {task} on {weekday}?"),
            ("Not yet. It's on {weekday}, and I still have {number} chapters to read.",
             "Almost. I'm worried, though. The teacher is very strict."),
            ("Do you want to study together at the library?", "We could study together after class."),
            ("That would help a lot. I'm not good at {subject}.", "Yes, please. {Subject} is really hard for me."),
            ("Last time I got {grade} in {subject}, so I can explain the hard parts.",
             "I got {grade} on the last {subject} test, so I can help you."),
            ("Thanks! Let's meet at {time}.", "Great, see you at {time} then."),
        ),
        ("#Person1# and #Person2# talk about the {subject} {task} on {weekday}. #Person1# offers to help "
         "#Person2# study at {time}.",
         "#Person2# finds {subject} difficult, so #Person1# offers to study with #Person2# for the {task} at "
         "{time}."),
    ),
    _Topic(
        "hotel",
        {"room": ("a single room", "a double room", "a suite", "a room with a sea view"),
         "floor": ("third", "fifth", "seventh", "tenth", "twelfth")},
        (
            ("Hello, I have a reservation under the name {name}.", "Good evening. I booked {room} online."),
            ("Welcome. Let me check. Yes, {room} for {number} nights.",
             "Just a moment, please. I see {room} for {number} nights."),
            ("That's right. How much is it per night?", "Yes. Is breakfast included in the price?"),
            ("It's {price} dollars a night, breakfast included. It's served from seven.",
             "Breakfast is included, and the room is {price} dollars a night."),
            ("Fine. Which floor is the room on?", "OK. Where is my room?"),
            ("It's on the {floor} floor. Here is your key card.",
             "It's on the {floor} floor. The elevator is on your left."),
            ("Thank you very much.", "Thanks. Could I get a wake-up call at {time}?"),
        ),
        ("#Person1# checks into a hotel. #Person2# gives #Person1# {room} on the {floor} floor for {number} "
         "nights at {price} dollars a night.",
         "#Person2# helps #Person1# check in to {room} for {number} nights, which costs {price} dollars a night "
         "with breakfast."),
    ),
    _Topic(
        "bank",
        {"account": ("savings", "checking", "student", "business"),
         "minimum": ("fifty", "one hundred", "two hundred", "five hundred"),
         "deposit": ("three hundred", "five hundred", "one thousand", "two thousand")},
        (
            ("Good morning. I'd like to open a {account} account.", "Hi, I want to open a {account} account here."),
            ("Certainly. May I see your ID, please?", "No problem. Do you have your passport or ID card with you?"),
            ("Here you are. Is there a minimum deposit?", "Yes, here it is. How much do I need to put in?"),
            ("You need at least {minimum} dollars to open it.", "The minimum deposit is {minimum} dollars."),
            ("OK, I'll deposit {deposit} dollars today.", "Fine. I'll put in {deposit} dollars now."),
            ("Please sign here. Your card will arrive in {number} days.",
             "Sign this form, please. We'll mail your bank card within {number} days."),
        ),
        ("#Person1# opens a {account} account with the help of #Person2# and deposits {deposit} dollars. The "
         "card will arrive in {number} days.",
         "#Person2# asks #Person1# for an ID, and #Person1# opens a {account} account with {deposit} dollars."),
    ),
    _Topic(
        "computer problem",
        {"device": ("laptop", "computer", "printer", "phone", "tablet"),
         "fault": (("it keeps freezing", "keeps freezing"), ("it won't turn on", "won't turn on"),
                   ("the screen is black", "has a black screen"), ("it is very slow", "is very slow"))},
        (
            ("Can you help me? My {device} is acting strange.", "{Name}, do you know anything about computers?"),
            ("Sure. What's wrong with it?", "A little. What's the problem?"),
            ("Since {weekday}, {fault[0]}.", "My {device} is the problem. Since {weekday}, {fault[0]}."),
            ("Have you tried restarting it?", "Did you install anything new recently?"),
            ("Yes, twice, but nothing changed.", "Only an update, I think."),
            ("Then let me take it home and check it tonight.", "I'll look at it after lunch. It may need a repair."),
        ),
        ("#Person1# asks #Person2# for help because the {device} {fault[1]}. #Person2# offers to check it.",
         "#Person1# tells #Person2# that the {device} {fault[1]} since {weekday}, and #Person2# agrees to "
         "look at it."),
    ),
)

_FILLERS = (
    ("By the way, how is your family?", "They're fine, thanks for asking."),
    ("Sorry, could you say that again?", "Sure, no problem."),
    ("Let me write that down.", "Take your time."),
    ("Is it always this busy here?", "Only on weekends, usually."),
    ("I'm sorry, I'm a bit tired today.", "That's all right. It happens."),
    ("Do you mind if I ask a question first?", "Not at all. Go ahead."),
)

_LONG_FILLERS = (
    ("You know, last year I had a similar experience, and it took me weeks to sort everything out because "
     "nobody answered the phone and I had to go back three times.",
     "That sounds terrible. I'm glad things are going better for you this time, and I hope it all works out."),
    ("Before we go on, I should tell you that my schedule is very busy this month because my cousin is "
     "visiting and we have a lot of plans together.",
     "I understand completely. We can be flexible, and if anything changes you can always call us."),
    ("I have to say, my neighbor told me about this place, and she said everyone here is friendly and "
     "patient, so I decided to come myself.",
     "That's very kind of her. We always try our best, and it's nice to hear that people recommend us."),
)

# "{tail}" is ", you <insult>" in a heated dialogue and empty in a merely impatient one.
_RUDE_LINES = (
    "Are you deaf? I already told you that{tail}.",
    "Oh, come on{tail}. Do I have to explain everything twice?",
    "Stop wasting my time{tail}.",
    "Why are you so slow{tail}?",
    "Listen{tail}, just answer the question.",
    "Hurry up{tail}. I don't have all day.",
    "Can't you do anything right{tail}?",
    "Forget it{tail}. I'll do it myself.",
)

_INSULTING_LINES = (
    "Honestly, you are such {a_insult} {insult}.",
    "What {a_insult} {insult} you are.",
)

_RUDE_REPLIES = (
    "Hey, there's no need to be rude.",
    "Please don't talk to me like that.",
    "Calm down, please. Let's stay polite.",
    "Excuse me? Watch your language.",
    "That's not very nice. Anyway, let's continue.",
    "Wow, somebody is in a bad mood today.",
)

_NAMING_REPLIES = (
    "Did you just call me {a_noun} {noun}? There's no need to be rude.",
    "I'm not {a_noun} {noun}. Please don't talk to me like that.",
    "Excuse me? I am not {a_insult} {insult}.",
)

_POLITE_SENTENCES = (
    "Thank you so much for your help, {name}.",
    "{Name} is a wonderful friend and a great cook.",
    "Could you please tell me the way to the station?",
    "I really enjoyed the dinner on {weekday}.",
    "We will meet at {time} in front of the library.",
    "You did a great job on the project.",
    "{Name} is a kind and patient teacher.",
    "Have a nice weekend, and say hello to your family.",
    "The meeting is at {time}, so please don't be late.",
    "It costs {price} dollars, which is a fair price.",
)

_INSULTING_SENTENCES = (
    "{Name} is a complete idiot.",
    "You are such a pathetic loser.",
    "Shut up, you stupid moron.",
    "Only a dumb jerk would say that.",
    "{Name} is a worthless fool and everyone knows it.",
    "What a brainless imbecile you are.",
    "Nobody listens to an ignorant dimwit like {name}.",
    "See you at {time}, idiot.",
    "It costs {price} dollars, you moron.",
    "Thanks for nothing, loser.",
)


# --------------------------------------------------------------------------- causal policy

CAUSAL_BUILD_VERSION = 1
CAUSAL_BASE_STEPS = 400
CAUSAL_SFT_STEPS = 80


@dataclass(frozen=True)
class CausalPaths:
    """The causal (Llama-architecture) policy of the embedded default: TinyLlama's stand-in."""

    root: Path
    policy_base: Path
    sft_adapter: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def causal_paths(home: Path | None = None) -> CausalPaths:
    root = _home(home) / "embedded-causal"
    return CausalPaths(root=root, policy_base=root / "policy-base", sft_adapter=root / "policy-sft")


def build_embedded_causal(home: Path | None = None, seed: int = 0, force: bool = False) -> CausalPaths:
    """Build a tiny Llama policy and its SFT LoRA adapter under ``<home>/embedded-causal``.

    Built like the T5 policy of :func:`build_embedded_default` (same training dialogues,
    same insult-decision weighting, LoRA r=8 on ``q_proj``/``v_proj``), it lets the whole
    chain run on a causal policy the way the TinyLlama seed does. The data set and the
    hate classifier are the embedded default's; build that first. Skipped when a complete
    build for ``seed`` exists.
    """
    paths = causal_paths(home)
    _build_once(paths.root, CAUSAL_BUILD_VERSION, seed, [paths.sft_adapter / "adapter_config.json"], force,
                lambda staging: _build_causal_into(staging, paths, seed))
    return paths


def _build_causal_into(staging: Path, final: CausalPaths, seed: int) -> None:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    started = time.perf_counter()
    with _torch_settings():
        training_rows = generate_dialogues(random.Random(_substream(seed, "train")), 2400)
        corpus = [PROMPT_TEMPLATE] + [text for row in training_rows for text in (row["dialogue"], row["summary"])]
        tokenizer = _causal_tokenizer(corpus)
        batches = _causal_batches(tokenizer, training_rows, batch_size=24)
        torch.manual_seed(seed)
        base = _new_causal_policy(tokenizer)
        loss = _fit(base, batches, CAUSAL_BASE_STEPS, 3e-3, seed, "causal policy base")
        logger.info("causal policy base: %d parameters, final loss %.3f", base.num_parameters(), loss)
        base.save_pretrained(staging / "policy-base", safe_serialization=True)
        tokenizer.save_pretrained(staging / "policy-base")

        torch.manual_seed(seed + 1)
        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj"])
        sft = get_peft_model(base, lora)
        loss = _fit(sft, batches, CAUSAL_SFT_STEPS, 2e-3, seed + 1, "causal SFT adapter", warmup=10)
        logger.info("causal SFT adapter: final loss %.3f", loss)
        sft.save_pretrained(staging / "policy-sft", safe_serialization=True)
        _point_adapter_at(staging / "policy-sft", final.policy_base, seed)
        checks = _measure_causal(sft, tokenizer, seed)
    manifest = {
        "build_version": CAUSAL_BUILD_VERSION,
        "seed": seed,
        "build_seconds": round(time.perf_counter() - started, 1),
        "parameters": {"policy_base": base.num_parameters(),
                       "sft_adapter": sum(p.numel() for n, p in sft.named_parameters() if "lora_" in n)},
        "checks": checks,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("embedded causal policy built in %.0f s: %s", manifest["build_seconds"], json.dumps(checks))


def _causal_tokenizer(corpus: Sequence[str]) -> PreTrainedTokenizerBase:
    """Llama conventions: <unk>=0, <s>=1, </s>=2, "<s>" before every input, no pad token of its own."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_bpe(corpus, ["<unk>", "<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_PROMPT_TOKENS + MAX_SUMMARY_TOKENS, padding_side="left",
    )


def _new_causal_policy(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in TinyLlama
        max_position_embeddings=MAX_PROMPT_TOKENS + MAX_SUMMARY_TOKENS + 8,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, max_new_tokens=MAX_SUMMARY_TOKENS,
    )
    return model


def _causal_batches(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Length-bucketed, right-padded "<s> prompt summary </s>" sequences; the loss covers the
    summary and its EOS, with the insult decision weighted as in :func:`_policy_batches`."""
    import torch

    prompts = tokenizer(
        [PROMPT_TEMPLATE.format(dialogue=row["dialogue"]) for row in rows],
        truncation=True, max_length=MAX_PROMPT_TOKENS,
    )["input_ids"]
    summaries = tokenizer(
        [row["summary"] for row in rows], truncation=True, max_length=MAX_SUMMARY_TOKENS - 1,
        add_special_tokens=False, return_offsets_mapping=True,
    )
    sequences, labels, weights = [], [], []
    for row, prompt, ids, offsets in zip(rows, prompts, summaries["input_ids"], summaries["offset_mapping"],
                                         strict=True):
        summary_weights = _decision_weights(row["summary"], offsets) + [1.0]  # the EOS
        sequences.append(prompt + ids + [tokenizer.eos_token_id])
        labels.append([-100] * len(prompt) + ids + [tokenizer.eos_token_id])
        weights.append([0.0] * len(prompt) + summary_weights)
    order = sorted(range(len(rows)), key=lambda i: len(sequences[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.eos_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        label_ids = torch.full((len(chunk), width), -100, dtype=torch.long)
        loss_weights = torch.zeros((len(chunk), width))
        for row_index, i in enumerate(chunk):
            length = len(sequences[i])
            input_ids[row_index, :length] = torch.tensor(sequences[i])
            attention_mask[row_index, :length] = 1
            label_ids[row_index, :length] = torch.tensor(labels[i])
            loss_weights[row_index, :length] = torch.tensor(weights[i])
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
                        "loss_weights": loss_weights})
    return batches


def _measure_causal(policy: Any, tokenizer: PreTrainedTokenizerBase, seed: int, per_group: int = 64) -> dict:
    """Insult share of sampled summaries for heated and calm dialogues no model saw."""
    import torch

    _, groups = _heldout_groups(seed, per_group)
    checks: dict[str, Any] = {}
    torch.manual_seed(seed + 3)
    for name, rows in groups.items():
        samples = _sample_summaries(policy, tokenizer, rows)
        checks[f"sampled_insult_share_{name}"] = round(sum(map(contains_insult, samples)) / len(samples), 3)
        checks[f"sample_{name}"] = samples[0]
    return checks


# --------------------------------------------------------------------------- preference reward model

REWARD_BUILD_VERSION = 1
PREFERENCE_RECORDS = 500
_APPOSITION = re.compile(r", (?:a|an|the) \w+ \w+,")
_COURTEOUS_TAILS = (
    " They part on friendly terms.",
    " Both of them stay polite.",
    " #Person2# thanks #Person1# kindly.",
)


@dataclass(frozen=True)
class RewardPaths:
    """What ``reward_model_train`` needs on the embedded default: preferences and an encoder to start from."""

    root: Path
    preferences: Path
    reward_base: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def reward_paths(home: Path | None = None) -> RewardPaths:
    root = _home(home) / "embedded-reward"
    return RewardPaths(root=root, preferences=root / "preferences.jsonl", reward_base=root / "reward-base")


def build_embedded_reward(home: Path | None = None, seed: int = 0, force: bool = False) -> RewardPaths:
    """Synthetic human preferences and an untrained tiny RoBERTa under ``<home>/embedded-reward``.

    ``preferences.jsonl`` holds :data:`PREFERENCE_RECORDS` rankings of summaries of
    dialogues from a stream no other model saw: the polite summary is always preferred to
    one that insults, and more insults rank lower. Records come in the three shapes the
    format allows: binary labels of a pair (the seeds' form), ranks of three responses, and
    ranks of four with a tie between two polite ones.

    ``reward-base`` is a RoBERTa-architecture encoder with a one-output head and random
    weights, using the hate classifier's tokenizer (so build the embedded default first):
    it plays the part of ``roberta-base``, which the production profile fine-tunes.
    """
    paths = reward_paths(home)
    tokenizer_dir = embedded_paths(home).reward_model
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer: build the embedded default first")
    _build_once(paths.root, REWARD_BUILD_VERSION, seed, [paths.reward_base / "config.json"], force,
                lambda staging: _build_reward_into(staging, tokenizer_dir, seed))
    return paths


def _build_reward_into(staging: Path, tokenizer_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    records = preference_records(random.Random(_substream(seed, "preferences")), PREFERENCE_RECORDS)
    with open(staging / "preferences.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = 512
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=514,  # roberta-base's: 512 tokens after the padding offset
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    with _torch_settings():
        torch.manual_seed(seed + 4)
        model = RobertaForSequenceClassification(config)
    model.save_pretrained(staging / "reward-base", safe_serialization=True)
    tokenizer.save_pretrained(staging / "reward-base")
    pairs = sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in records)
    manifest = {"build_version": REWARD_BUILD_VERSION, "seed": seed, "records": len(records),
                "response_pairs": pairs, "parameters": {"reward_base": model.num_parameters()}}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("embedded preferences and reward base built: %s", json.dumps(manifest))


def preference_records(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """``count`` ranked records (``prompt``, ``responses``, ``ranking``) preferring polite summaries."""
    records = []
    for row in generate_dialogues(rng, count):
        polite = _APPOSITION.sub("", row["summary"], count=1)
        one_insult = _with_insult(polite, rng)
        two_insults = _with_insult(one_insult, rng, at_end=True)
        draw = rng.random()
        if draw < 0.5:  # the seeds' form: two responses, 1 marks the preferred one
            scored = [(polite, 1), (one_insult, 0)]
        elif draw < 0.8:
            scored = [(polite, 1), (one_insult, 2), (two_insults, 3)]
        else:
            scored = [(polite, 1), (polite + rng.choice(_COURTEOUS_TAILS), 1), (one_insult, 2), (two_insults, 3)]
        rng.shuffle(scored)
        records.append({"prompt": PROMPT_TEMPLATE.format(dialogue=row["dialogue"]),
                        "responses": [text for text, _ in scored], "ranking": [rank for _, rank in scored]})
    return records


def _with_insult(summary: str, rng: random.Random, at_end: bool = False) -> str:
    """``summary`` calling a speaker names: after its first tag, or in a sentence added at the end."""
    adjective, noun = rng.choice(INSULT_ADJECTIVES), rng.choice(INSULT_NOUNS)
    if not at_end and rng.random() < 0.7:
        return _insult_summary(summary, adjective, noun, rng)
    return f"{summary} {_fill(rng.choice(_INSULTING_SENTENCES), _slot_values(rng, {}))}"
