"""Tokenizers for Robometer: the tiny/small BPE factory and the tokenizer files of a checkpoint or bundle.

Uses only the ``tokenizers`` library (no torch, no transformers), so the robot-side runtimes can load a
bundle's tokenizer.json. The layout always follows the real one: the normal vocabulary, then the Qwen3-VL
special tokens in their order, then the five Robometer tokens in checkpoint order. Token ids are always read
back from the tokenizer (``token_id``), never assumed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from robometer_ros.model.config import QWEN3VL_SPECIAL_TOKENS, ROBOMETER_SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def qwen3vl_chat_template() -> str:
    """The public Qwen3-VL chat template (shipped with the package; the Robometer prompt goes through it)."""
    return resources.files("robometer_ros.model").joinpath("qwen3vl_chat_template.jinja").read_text()


def _special(token: str) -> AddedToken:
    return AddedToken(token, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)


def add_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> int:
    """Append the tokens that the tokenizer lacks, in the given order; returns how many were added."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens([_special(t) for t in missing])
    return len(missing)


def add_robometer_tokens(tokenizer: Tokenizer) -> int:
    """Add the five Robometer tokens (split, reward, pref, sim, prog) in checkpoint order where missing.

    As the official setup does: a base Qwen3-VL tokenizer of length n gets ids n..n+4.
    """
    return add_special_tokens(tokenizer, ROBOMETER_SPECIAL_TOKENS)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, add_robometer: bool = True) -> Tokenizer:
    """Train a small byte-level BPE on ``texts`` and add the Qwen3-VL and Robometer special tokens after it.

    ``vocab_size`` bounds the learned part (the byte alphabet alone is 256); the special tokens come on top.
    ``add_robometer=False`` gives a "base model" tokenizer (Qwen tokens only), as a released checkpoint's
    base directory has. Deterministic for the same texts and size.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("build_tokenizer needs at least one training text")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 257),
        special_tokens=[],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    add_special_tokens(tokenizer, QWEN3VL_SPECIAL_TOKENS)
    if add_robometer:
        add_robometer_tokens(tokenizer)
    return tokenizer


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """Id of a token, with a clear error when the tokenizer does not have it."""
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise KeyError(f"tokenizer has no token {token!r}")
    return int(tid)


def backbone_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The four vision token ids a Qwen3-VL backbone config needs, read from the tokenizer."""
    return {
        "image_token_id": token_id(tokenizer, "<|image_pad|>"),
        "video_token_id": token_id(tokenizer, "<|video_pad|>"),
        "vision_start_token_id": token_id(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": token_id(tokenizer, "<|vision_end|>"),
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, chat_template: str | None = None) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (loadable by AutoTokenizer too)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = chat_template if chat_template is not None else qwen3vl_chat_template()
    tokenizer.save(str(out / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "padding_side": "right",
        "model_max_length": 262144,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": list(ROBOMETER_SPECIAL_TOKENS),
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / CHAT_TEMPLATE_FILE).write_text(template)
    return [out / TOKENIZER_FILE, out / TOKENIZER_CONFIG_FILE, out / CHAT_TEMPLATE_FILE]


def load_tokenizer(path: str | Path, add_robometer: bool = True) -> Tokenizer:
    """Load tokenizer.json from a file or directory; append the Robometer tokens when it lacks them.

    A base Qwen3-VL-4B-Instruct directory has no Robometer tokens: they are added in checkpoint order, which
    reproduces the ids the released checkpoint was trained with.
    """
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} at {p}")
    tokenizer = Tokenizer.from_file(str(file))
    if add_robometer:
        add_robometer_tokens(tokenizer)
    return tokenizer


def load_chat_template(path: str | Path) -> str:
    """The chat template next to a tokenizer (chat_template.jinja, or tokenizer_config.json's field)."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text()
    cfg_file = directory / TOKENIZER_CONFIG_FILE
    if cfg_file.is_file():
        template = json.loads(cfg_file.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    raise FileNotFoundError(f"no chat template ({CHAT_TEMPLATE_FILE} or tokenizer_config.json) in {directory}")
